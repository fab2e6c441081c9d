"""Hugging Face ``Trainer`` callback for online and embedded CMD:
``Trainer(..., callbacks=[CMDCallback(warmup=10, mode_file="run.cmd.h5")])``.

Only events are forwarded here; the logic is ``cmdtool.training.EmbeddedCMD``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Sequence

import torch
from transformers import TrainerCallback

from ..checkpoints import CheckpointInfo
from ..errors import CmdError
from ..training import EmbeddedCMD

STATE_FILE = "cmdtool_state.pt"  # beside the Trainer's files in each checkpoint-<step>/ folder


class CMDCallback(TrainerCallback):
    """Online CMD (paper §3.3) and, with ``embed_percent`` > 0, embedded CMD (§3.4) in a ``Trainer`` run.

    Observes the model's weights at the end of every epoch (or every ``every_n_steps`` optimizer
    steps), before the Trainer evaluates or saves; resets the embedded parameters after every
    optimizer step. Each observation is named ``checkpoint-<global_step>`` and written back by
    ``cmd reconstruct`` as a folder ``from_pretrained`` loads (``model.safetensors`` and
    ``config.json``; tied weights are left out, as ``save_pretrained`` does). ``validate_with_cmd``
    evaluates the CMD weights of the latest observation; ``swap_at_end`` leaves them in the model.
    The state is saved as ``cmdtool_state.pt`` in every ``checkpoint-<step>/`` folder and read back
    when the Trainer resumes from one (``train(resume_from_checkpoint=...)``). ``cmd/rel_error`` and
    ``cmd/embedded_fraction`` go to ``state.log_history`` and to the Trainer's logs.
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
        if state.global_step > 0:  # resumed: the state saved with that checkpoint
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if not path.is_file():
                raise CmdError(f"{path}: resuming at step {state.global_step}, but the CMD state of that "
                               f"checkpoint is missing (was it written with CMDCallback?)")
            self.cmd.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

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
                torch.save(self.cmd.state_dict(), folder / STATE_FILE)

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
