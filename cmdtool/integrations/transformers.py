"""Hugging Face ``Trainer`` callback for online and embedded CMD:
``Trainer(..., callbacks=[CMDCallback(warmup=10, mode_file="run.cmd.h5")])``.

Only events are forwarded here; the logic is ``cmdtool.training.EmbeddedCMD``.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import re
import sys
import uuid
from pathlib import Path
from typing import Mapping, Sequence

import torch
from transformers import TrainerCallback

from .._files import temporary_sibling
from ..checkpoints import CheckpointInfo, dtype_name
from ..errors import CmdError
from ..layout import Layout, check_same_tensors
from ..training import EmbeddedCMD

STATE_FILE = "cmdtool_state.pt"  # beside the Trainer's files in each checkpoint-<step>/ folder
RUN_KEY = "cmdtool_callback"     # in the state file: which run, at which step, with which weights it was saved


class CMDCallback(TrainerCallback):
    """Online CMD (paper §3.3) and, with ``embed_percent`` > 0, embedded CMD (§3.4) in a ``Trainer`` run.

    Observes the model's weights at the end of every epoch (or every ``every_n_steps`` optimizer
    steps), before the Trainer evaluates or saves; resets the embedded parameters after every
    optimizer step. Each observation is named ``checkpoint-<global_step>`` and written back by
    ``cmd reconstruct`` as a folder ``from_pretrained`` loads (``model.safetensors`` and
    ``config.json``; tied weights are left out, as ``save_pretrained`` does). ``validate_with_cmd``
    evaluates the CMD weights of the latest observation; ``swap_at_end`` leaves them in the model.
    The state is saved as ``cmdtool_state.pt`` in every ``checkpoint-<step>/`` folder (to a temporary
    name, then renamed) and read back from the checkpoint the Trainer resumes from
    (``train(resume_from_checkpoint=...)``, see ``resumed_checkpoint``); a state saved by another run,
    at another step, with other weights, settings or tensors is refused. ``cmd/rel_error`` and
    ``cmd/embedded_fraction`` go to ``state.log_history`` and to the Trainer's logs.
    Args:
        modes: Most modes (M) to find, as ``cmd fit --modes``.
        warmup: Observations (F) the modes and references are found on.
        embed_window: Observations (L) between embedding windows; the first is at observation F + L.
        embed_percent: Percentage (P) embedded per window; 0 is online CMD only.
        mode_file: Where the mode file is written when training ends (None: not written).
        relative: P % of the parameters not yet embedded (True) or of all embeddable ones (False).
        samples: Parameters sampled (K) to find the modes, as ``cmd fit --samples``.
        seed: Seed of that sample.
        include: Model only tensors whose name matches one of these globs.
        exclude: Do not model tensors matching these globs (they are carried verbatim).
        every_n_steps: Observe every n optimizer steps instead of once per epoch.
        validate_with_cmd: Validate the CMD weights of the latest observation instead of the model's.
        swap_at_end: Leave the CMD weights in the model when training ends.

    Raises:
        CmdError: A setting out of range (when the callback is made, before training starts), or a
            warm-up longer than the run (when training ends; no mode file is written then).
    """

    def __init__(self, *, modes: int = 10, warmup: int = 10, embed_window: int = 10, embed_percent: float = 0.0,
                 mode_file: str | Path | None = None, relative: bool = True, samples: int = 1000, seed: int = 0,
                 include: Sequence[str] = (), exclude: Sequence[str] = (), every_n_steps: int | None = None,
                 validate_with_cmd: bool = False, swap_at_end: bool = False):
        self.options = dict(modes=modes, warmup=warmup, embed_window=embed_window, embed_percent=embed_percent,
                            relative=relative, samples=samples, seed=seed, include=include, exclude=exclude,
                            every_n_steps=every_n_steps)
        EmbeddedCMD(None, **self.options)  # bad settings fail here, before training starts
        self.mode_file = None if mode_file is None else Path(mode_file)
        self.validate_with_cmd, self.swap_at_end = validate_with_cmd, swap_at_end
        self.cmd: EmbeddedCMD | None = None
        self._run = None  # this run's id, kept across resumes
        self._swapped = None
        self._latest: dict[str, float] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.cmd = EmbeddedCMD(model, drop_shared=True, **self.options)
        config = getattr(model, "config", None)
        if config is not None:
            data = config.to_json_string().encode()
            self._config = (hashlib.sha256(data).hexdigest(), data)
            self.cmd.attachments[self._config[0]] = data
        else:
            self._config = None
        self._run = uuid.uuid4().hex
        if state.global_step > 0:  # resumed: the state saved with that checkpoint
            path = resumed_checkpoint(args, state) / STATE_FILE
            if not path.is_file():
                raise CmdError(f"{path}: resuming at step {state.global_step}, but the CMD state of that "
                               f"checkpoint is missing (was it written with CMDCallback?)")
            try:  # weights_only: tensors, numbers and strings; a pickle that calls anything is refused unrun
                saved = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # empty, truncated, not a torch file, or a pickle with code in it
                raise CmdError(f"{path}: not a readable CMD state ({unreadable(path, e)})") from None
            self._check_resumed(path, saved, state.global_step)
            try:
                self.cmd.load_state_dict(saved)
            except CmdError as e:
                raise CmdError(f"{path}: {e}") from None
            mark = saved.get(RUN_KEY)
            if isinstance(mark, dict) and isinstance(mark.get("run"), str):
                self._run = mark["run"]

    def _check_resumed(self, path: Path, saved, step: int) -> None:
        """Refuse a saved state that is not the one of the checkpoint being resumed: saved at another step,
        for other tensors, or with other weights than the Trainer has just loaded (another run's state)."""
        if not isinstance(saved, dict):
            raise CmdError(f"{path}: not a CMD state")
        mark = saved.get(RUN_KEY)
        if mark is not None and not (isinstance(mark, dict) and type(mark.get("step")) is int
                                     and type(mark.get("weights")) is str):
            raise CmdError(f"{path}: its {RUN_KEY} entry is not a step and a fingerprint of the weights")
        if mark is not None and mark["step"] != step:
            raise CmdError(f"{path}: saved at step {mark['step']}, but the Trainer resumes at step {step}; "
                           f"this state belongs to another checkpoint")
        if isinstance(saved.get("layout"), str):
            tensors = self.cmd.tensor_names()
            live = self.cmd.model.state_dict()
            signature = {name: (tuple(live[name].shape), dtype_name(live[name].dtype)) for name in tensors}
            try:
                layout = Layout.from_json(saved["layout"])
            except (ValueError, TypeError) as e:
                raise CmdError(f"{path}: the saved CMD state is incomplete or corrupt ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:200]})") from None
            check_same_tensors(path, signature, layout.signature, "the saved CMD state")
        if mark is not None and mark["weights"] != self._weights():
            raise CmdError(f"{path}: saved with other weights than those of the checkpoint being resumed at step "
                           f"{step} (another run's state?); resume from the checkpoint folder this state was saved "
                           f"in, or leave it out of output_dir")

    def _weights(self) -> str:
        """A fingerprint of the model's weights: exact bytes of up to 64 evenly spaced values per tensor."""
        digest = hashlib.sha256()
        for name, tensor in self.cmd.model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            where = torch.linspace(0, max(flat.numel() - 1, 0), min(flat.numel(), 64)).long().to(flat.device)
            digest.update(name.encode() + b"\0" + flat[where].cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _info(self) -> CheckpointInfo:
        names = self.cmd.tensor_names()
        files = {"config.json": self._config[0]} if self._config else {}
        return CheckpointInfo("safetensors", metadata={"format": "pt"}, shards={"model.safetensors": names},
                              files=files)

    def _observe(self, state, control) -> None:
        step = state.global_step
        if self.cmd.last_time == step:
            return
        self.cmd.observe(f"checkpoint-{step}", step, self._info())
        if self.cmd.ready:
            self._latest = {"cmd/rel_error": self.cmd.rel_error, "cmd/embedded_fraction": self.cmd.embedded_fraction}
            state.log_history.append({**self._latest, "epoch": state.epoch, "step": step})
        if self.validate_with_cmd and self.cmd.ready and control.should_evaluate:
            self._swapped = self.cmd.cmd_weights()
            self._swapped.__enter__()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.cmd.step()

    def on_step_end(self, args, state, control, **kwargs):
        n = self.options["every_n_steps"]
        if n and state.global_step % n == 0:
            self._observe(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self.options["every_n_steps"]:
            self._observe(state, control)

    def on_evaluate(self, args, state, control, **kwargs):
        if self._swapped is not None:
            self._swapped.__exit__(None, None, None)
            self._swapped = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._latest:
            logs.update(self._latest)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                saved = {**self.cmd.state_dict(),
                         RUN_KEY: {"run": self._run, "step": state.global_step, "weights": self._weights()}}
                target = folder / STATE_FILE
                tmp = temporary_sibling(target)
                try:
                    torch.save(saved, tmp)
                    os.replace(tmp, target)
                finally:
                    tmp.unlink(missing_ok=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.on_evaluate(args, state, control)
        if not self.cmd.ready:
            raise CmdError(f"CMDCallback: the warm-up of {self.options['warmup']} observations is longer than the "
                           f"run, which made {self.cmd.T}; no modes were found and no mode file is written")
        if self.mode_file is not None and state.is_world_process_zero:
            self.cmd.save(self.mode_file)
        if self.swap_at_end:
            clamped = self.cmd.load_cmd_weights()
            if clamped:
                print(f"CMDCallback: swap_at_end clamped {clamped} negative running-variance value"
                      f"{'s' * (clamped > 1)} to 0", file=sys.stderr)
        self.cmd.close()


def unreadable(path: Path, error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a state file, in a few words on one line (not torch's
    advice to load it with ``weights_only=False``, which would run the code a pickle may hold)."""
    try:
        if path.stat().st_size == 0:
            return "an empty file"
    except OSError:
        pass
    text = " ".join(str(error).split())
    if isinstance(error, pickle.UnpicklingError):
        called = re.search(r"GLOBAL ([\w.]+)", text)
        what = f"it would call {called.group(1)}" if called else "not a torch file"
        return f"UnpicklingError: {what}; only tensors, numbers and strings are loaded, and nothing was run"
    return f"{type(error).__name__}: {text[:200]}"


def resumed_checkpoint(args, state) -> Path:
    """The checkpoint folder the Trainer resumes from.

    No callback event is given it, so it is read where the Trainer keeps it: the
    ``resume_from_checkpoint`` argument of its training loop (a frame up the stack; ``True`` already
    resolved to the latest checkpoint), else ``args.resume_from_checkpoint``, else
    ``output_dir/checkpoint-<global_step>``. The state found there is checked against the weights
    the Trainer loaded (``CMDCallback._check_resumed``), so a wrong guess is refused, never used."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "_inner_training_loop":
                found = frame.f_locals.get("resume_from_checkpoint")
                if isinstance(found, (str, os.PathLike)):
                    return Path(found)
                break
            frame = frame.f_back
    finally:
        del frame
    named = getattr(args, "resume_from_checkpoint", None)
    if isinstance(named, (str, os.PathLike)) and named:
        return Path(named)
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def load_state_dict_into(model, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into a Transformers model the way ``from_pretrained`` does, for ``cmd report
    --eval`` functions and notebooks.

    A Hugging Face checkpoint leaves out the weights the model ties to another one (GPT-2's
    ``lm_head.weight`` is ``transformer.wte.weight``), so ``model.load_state_dict(state,
    strict=True)`` fails on them. Here the model's ties are made first (``tie_weights``); a key may
    then be absent only when a tensor tied to it is present; every other key must match exactly, both
    ways, and the names are checked before anything is loaded (a refused state leaves the model as
    it was).

    Args:
        model (torch.nn.Module): a ``transformers.PreTrainedModel`` (or any ``torch.nn.Module`` with
            ``tie_weights``).
        state: tensors by name, as ``cmdtool.reconstruct`` or the ``--eval`` function receive them.

    Raises:
        ValueError: keys that do not match (missing, unexpected or wrongly shaped), named.
    """
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    aliases: dict[int, set[str]] = {}  # one tensor, all the names it is reachable by
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        aliases.setdefault(id(tensor), set()).add(name)
    tied_to = {name: names - {name} for names in aliases.values() for name in names}
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not tied_to.get(k, set()) & set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(f"{k} {tuple(state[k].shape)} for {tuple(own[k].shape)}" for k in set(state) & set(own)
                      if tuple(state[k].shape) != tuple(own[k].shape))
    problems = [f"{what} {', '.join(keys[:5])}" + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", reshaped)) if keys]
    if problems:
        raise ValueError(f"state dict does not fit {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(dict(state), strict=False)
    if callable(tie):
        tie()
