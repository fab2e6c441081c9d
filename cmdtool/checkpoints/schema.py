"""What write-back needs besides the tensors (``CheckpointInfo``, stored per checkpoint in the
mode file and the trajectory store), and the wrapper conventions of training stacks. No I/O."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

# Keys under which training scripts commonly nest the state dict, in order of preference.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module",
                "model_state", "weights", "params", "state")
# timm's --model-ema weights, chosen with ``ema=True`` (``cmd fit --ema``).
EMA_KEY = "state_dict_ema"
# Lightning's WeightAveraging callback (Lightning >= 2.5) saves the average under ``state_dict`` and the
# trained weights under this key; the trained weights are modelled, the average with ``ema=True``.
CURRENT_MODEL_KEY = "current_model_state"
# Wrapper entries that describe the training state of the original weights: never written back.
TRAINING_STATE_KEYS = ("optimizer", "optimizer_states", "optimizer_state_dict", "scheduler", "lr_scheduler",
                       "lr_schedulers", "scheduler_state_dict", "scaler", "amp_scaler", "grad_scaler")


@dataclass
class CheckpointInfo:
    """What write-back needs besides the tensors.

    ``format`` is how the tensors are stored (``"safetensors"``, ``"torch"``, or ``"dcp"``: a
    ``torch.distributed.checkpoint`` folder, whose ``wrapper`` is the top-level key of the model's
    tensors and ``extras`` its plain top-level values); ``wrapper`` the key
    of a torch wrapper dict and ``extras`` its plain values; ``dropped`` what is not written back.
    A Hugging Face folder also has ``shards`` (weight file -> its tensor names, in order), ``index``
    (the index file's name and its ``metadata``, when the source had one) and ``files`` (the other
    files copied back, such as ``config.json``: name -> SHA-256 of the bytes kept beside the modes).
    ``aliases`` are other top-level keys written with the same tensors as ``wrapper`` (Lightning
    WeightAveraging's ``state_dict`` and ``current_model_state``: both get the written weights, so
    that no loader finds a stale copy beside them).
    """
    format: str
    wrapper: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    metadata: dict[str, str] | None = None
    shards: dict[str, list[str]] | None = None
    index: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)

    @property
    def is_folder(self) -> bool:
        return self.shards is not None or self.format == "dcp"

    @property
    def stack(self) -> str:
        """Which training stack wrote it, as far as its content tells."""
        if self.format == "dcp":
            return "torch.distributed.checkpoint"
        if self.is_folder:
            return "huggingface"
        if "pytorch-lightning_version" in self.extras:
            return "lightning"
        if self.wrapper == EMA_KEY or (self.wrapper == "state_dict"
                                       and ("arch" in self.extras or EMA_KEY in self.dropped)):
            return "timm"
        return "plain"

    def to_json(self) -> str:
        return json.dumps({"format": self.format, "wrapper": self.wrapper, "extras": self.extras,
                           "dropped": self.dropped, "metadata": self.metadata, "shards": self.shards,
                           "index": self.index, "files": self.files, "aliases": self.aliases})

    @classmethod
    def from_json(cls, text: str) -> "CheckpointInfo":
        return cls(**json.loads(text))  # fields added later have defaults: older files still read


MAX_DEPTH = 64  # nesting of kept wrapper values; deeper ones are dropped, not recursed into


def is_plain(value: Any, depth: int = 0) -> bool:
    """A value JSON can keep: None, bool, int, finite float, str, and lists, tuples (they come back
    as lists) and string-keyed dicts of them (Lightning's ``hyper_parameters``, ``loops``), nested
    at most ``MAX_DEPTH`` deep; strings must be valid Unicode (no lone surrogates)."""
    if value is None or isinstance(value, (bool, int)):
        return True
    if isinstance(value, str):
        return _is_text(value)
    if isinstance(value, float):
        return math.isfinite(value)
    if depth >= MAX_DEPTH:
        return False
    if isinstance(value, (list, tuple)):
        return all(is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_text(k) and is_plain(v, depth + 1) for k, v in value.items())
    return False


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
