"""Lightning callback for online and embedded CMD: ``Trainer(callbacks=[CMDCallback(warmup=10)])``.

Works with the ``lightning`` and the ``pytorch_lightning`` packages: ``CMDCallback`` subclasses the
``Callback`` of each one already imported (of each one installed when neither is), so either
``Trainer`` accepts it. Only events are forwarded here; the logic is ``cmdtool.training.EmbeddedCMD``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Sequence

from ..checkpoints import CheckpointInfo
from ..errors import CmdError
from ..training import EmbeddedCMD


def _callback_bases() -> tuple[type, ...]:
    packages = [p for p in ("lightning", "pytorch_lightning") if p in sys.modules]
    packages = packages or [p for p in ("lightning", "pytorch_lightning") if importlib.util.find_spec(p)]
    if not packages:
        raise ImportError("cmdtool.integrations.lightning needs the lightning or the pytorch_lightning package")
    modules = [importlib.import_module("lightning.pytorch" if p == "lightning" else p) for p in packages]
    return tuple(m.Callback for m in modules)


def _plain(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


class _CMDCallback:
    """Online CMD (paper §3.3) and, with ``embed_percent`` > 0, embedded CMD (§3.4) in a Lightning run.

    Observes the module's weights after the last training batch of every epoch (or every
    ``every_n_steps`` optimizer steps), before validation and before ``ModelCheckpoint`` saves, and
    resets the embedded parameters after every training batch. ``validate_with_cmd`` validates the
    CMD weights of the latest observation (as ``WeightAveraging`` validates the average), and
    ``swap_at_end`` leaves them in the module when training ends. ``mode_file`` is written when
    training ends. The state is stored in Lightning checkpoints, so a run resumed with
    ``ckpt_path=`` continues exactly. Logs ``cmd/rel_error`` and ``cmd/embedded_fraction``.

    Import it from ``cmdtool.integrations.lightning``: it subclasses the ``Callback`` of the
    ``lightning`` and of the ``pytorch_lightning`` package, whichever are installed.
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
        self._pending: dict | None = None
        self._observed_step = -1
        self._saved_cmd_weights = None
        self._continuing = False  # whether the CMD state goes on from an earlier fit or a loaded state

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.cmd is None or self.cmd.model is not pl_module:
            self.cmd = EmbeddedCMD(pl_module, **self.options)
            self._continuing = False  # a fresh state: only right at step 0 (on_train_start checks)
        if self._pending is not None:
            try:
                self.cmd.load_state_dict(self._pending["cmd"])
            except CmdError as e:
                where = getattr(trainer, "ckpt_path", None)
                raise CmdError(f"{where}: {e}" if where else str(e)) from None
            self._observed_step = self._pending["observed_step"]
            self._pending = None
            self._continuing = True

    def on_train_start(self, trainer, pl_module) -> None:
        """Refuse to start CMD afresh in the middle of a run: a checkpoint resumed without this callback's
        state (saved without it, or emptied) would silently restart the warm-up at a later step."""
        if trainer.global_step > 0 and not self._continuing:
            where = getattr(trainer, "ckpt_path", None) or "the checkpoint resumed"
            raise CmdError(f"{where}: resuming at step {trainer.global_step}, but the CMD state of that checkpoint "
                           f"is missing or empty (was it written with CMDCallback?)")
        self._continuing = True  # a later fit of the same module goes on from here

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.cmd.step()
        step = trainer.global_step
        n = self.options["every_n_steps"]
        due = step % n == 0 if n else batch_idx + 1 >= trainer.num_training_batches
        if not due or step == self._observed_step:
            return
        self._observed_step = step
        self.cmd.observe(f"epoch={trainer.current_epoch}-step={step}.ckpt", step, self._info(trainer, pl_module))
        if self.cmd.ready:
            pl_module.log("cmd/rel_error", self.cmd.rel_error, on_step=False, on_epoch=True)
            pl_module.log("cmd/embedded_fraction", self.cmd.embedded_fraction, on_step=False, on_epoch=True)

    def _info(self, trainer, pl_module) -> CheckpointInfo:
        """What ``cmd reconstruct`` writes back: a Lightning ``.ckpt`` that ``load_from_checkpoint`` loads."""
        package = sys.modules[type(trainer).__module__.split(".")[0]]
        extras = {"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                  "pytorch-lightning_version": package.__version__}
        hparams = dict(getattr(pl_module, "hparams", {}) or {})
        if hparams and _plain(hparams):
            extras["hyper_parameters"] = hparams
        return CheckpointInfo("torch", wrapper="state_dict", extras=extras)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.validate_with_cmd and self.cmd is not None and self.cmd.ready and not trainer.sanity_checking:
            self._saved_cmd_weights = self.cmd.cmd_weights()
            self._saved_cmd_weights.__enter__()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._saved_cmd_weights is not None:
            self._saved_cmd_weights.__exit__(None, None, None)
            self._saved_cmd_weights = None

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.cmd.ready:
            raise CmdError(f"CMDCallback: the warm-up of {self.options['warmup']} observations is longer than the "
                           f"run, which made {self.cmd.T}; no modes were found and no mode file is written")
        if self.mode_file is not None and trainer.is_global_zero:
            self.cmd.save(self.mode_file)
        if self.swap_at_end:
            clamped = self.cmd.load_cmd_weights()
            if clamped:
                print(f"CMDCallback: swap_at_end clamped {clamped} negative running-variance value"
                      f"{'s' * (clamped > 1)} to 0", file=sys.stderr)
        self.cmd.close()

    def state_dict(self) -> dict:
        if self.cmd is None:
            return {} if self._pending is None else dict(self._pending)
        return {"cmd": self.cmd.state_dict(), "observed_step": self._observed_step}

    def load_state_dict(self, state_dict: dict) -> None:
        """The state ``state_dict`` saved, checked for its kinds here (the CMD state by ``EmbeddedCMD``);
        an empty one is left for ``on_train_start`` to refuse mid-run."""
        if isinstance(state_dict, dict) and not state_dict:
            return
        if not (isinstance(state_dict, dict) and set(state_dict) == {"cmd", "observed_step"}
                and type(state_dict["observed_step"]) is int and -1 <= state_dict["observed_step"] < 2**63):
            raise CmdError("the checkpoint's CMDCallback state is not a CMD state and an observed step")
        self._pending = dict(state_dict)
        if self.cmd is not None:  # already bound to the module: continue from here
            self.on_fit_start(None, self.cmd.model)


CMDCallback = type("CMDCallback", (_CMDCallback, *_callback_bases()), {"__doc__": _CMDCallback.__doc__,
                                                                        "__module__": __name__})
