"""Reading and writing one checkpoint file, safetensors or torch, without executing code.

A torch file holds either a state dict or a dict wrapping one (``{"state_dict": ..., "epoch": 3}``);
the wrapper's small plain values (numbers, strings) are kept so that write-back can restore them.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from safetensors import safe_open

from .._lazy import save_file, torch  # imported on first use
from ..errors import CmdError

# Keys under which training scripts commonly nest the state dict, in order of preference.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module",
                "model_state", "weights", "params", "state")

Signature = dict[str, tuple[tuple[int, ...], str]]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sniff_format(path: Path) -> str | None:
    """``"safetensors"``, ``"torch"`` or None, judged by the file's first bytes, not its name."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive, or legacy pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < path.stat().st_size:
            return "safetensors"
    return None


@dataclass
class CheckpointInfo:
    """What write-back needs besides the tensors: wrapper key, plain wrapper values, metadata."""
    format: str
    wrapper: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    metadata: dict[str, str] | None = None

    def to_json(self) -> str:
        return json.dumps({"format": self.format, "wrapper": self.wrapper, "extras": self.extras,
                           "dropped": self.dropped, "metadata": self.metadata})

    @classmethod
    def from_json(cls, text: str) -> "CheckpointInfo":
        return cls(**json.loads(text))


class CheckpointReader:
    """Open one checkpoint; ``signature`` lists its tensors, ``tensor(name)`` reads one."""

    def __init__(self, path: Path, fmt: str):
        self.path = path
        self._handle = None
        try:
            if fmt == "safetensors":
                self._open_safetensors()
            else:
                self._open_torch()
        except CmdError:
            raise
        except pickle.UnpicklingError as e:
            unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            if unsafe is None:
                raise CmdError(f"{path}: cannot read checkpoint, truncated or corrupt ({_first_sentence(e)})") from None
            raise CmdError(f"{path}: refused: the file holds a pickled {unsafe.group(1)}, and loading it "
                           f"could run code; keep only tensors and plain values in checkpoints") from None
        except Exception as e:  # torch and safetensors raise assorted types on corrupt input
            raise CmdError(f"{path}: cannot read checkpoint, truncated or corrupt ({_first_sentence(e)})") from None

    def _open_safetensors(self) -> None:
        self._handle = safe_open(str(self.path), framework="pt")
        self.info = CheckpointInfo("safetensors", metadata=self._handle.metadata())
        self.signature: Signature = {}
        for name in self._handle.keys():
            sl = self._handle.get_slice(name)
            dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower())
            self.signature[name] = (tuple(sl.get_shape()), dtype)

    def _open_torch(self) -> None:
        with warnings.catch_warnings():  # torch warns about odd pickles; the error says what matters
            warnings.simplefilter("ignore")
            try:
                if self.path.name.endswith(".safetensors"):  # torch.load would route it by name
                    with open(self.path, "rb") as f:
                        obj = torch.load(f, map_location="cpu", weights_only=True)
                else:
                    obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy format
        self._state, self.info = unwrap_state_dict(obj, self.path)
        self.signature = {name: (tuple(t.shape), dtype_name(t.dtype)) for name, t in self._state.items()}

    def tensor(self, name: str) -> torch.Tensor:
        if self._handle is not None:
            return self._handle.get_tensor(name)
        return self._state[name]

    def close(self) -> None:
        self._handle = None
        self._state = None

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_sentence(error: Exception) -> str:
    text = str(error).strip().split("\n")[0]
    return f"{type(error).__name__}: {text.split('. ')[0].rstrip('.')[:200]}"


_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
                       "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8",
                       "BOOL": "bool"}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def unwrap_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Find the state dict in what ``torch.load`` returned: the dict itself, or under a wrapper key."""
    if _is_state_dict(obj):
        return dict(obj), CheckpointInfo("torch")
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                extras = {k: v for k, v in obj.items() if k != key and _is_plain(v)}
                dropped = [str(k) for k, v in obj.items() if k != key and not _is_plain(v)]
                return dict(obj[key]), CheckpointInfo("torch", wrapper=key, extras=extras,
                                                      dropped=dropped)
        if not obj:
            raise CmdError(f"{path}: no state dict found (the file holds an empty dict)")
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CmdError(f"{path}: no state dict found (top-level keys: {keys}; "
                       f"expected tensors, or one of {', '.join(WRAPPER_KEYS[:4])}, ...)")
    raise CmdError(f"{path}: no state dict found (the file holds a {type(obj).__name__})")


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], info: CheckpointInfo) -> None:
    """Write a state dict in the source's format, restoring its wrapper and metadata."""
    if info.format == "safetensors":
        save_file(state, str(path), metadata=info.metadata)
    else:
        obj = {info.wrapper: state, **info.extras} if info.wrapper else state
        torch.save(obj, path)
