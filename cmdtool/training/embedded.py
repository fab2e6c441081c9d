"""``EmbeddedCMD``: online and embedded CMD beside a live PyTorch model (paper §3.3, §3.4)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .._files import temporary_sibling
from ..checkpoints import CheckpointInfo, dtype_name
from ..errors import CmdError
from ..layout import Layout, build_layout, check_same_tensors
from ..modefile import write_embedding, write_mode_file
from ..modes import FitSettings
from ..statistics import Clamped
from ._warmup import warmup_state
from .saved import check_outer, load_state, save_state
from .settings import TrainingSettings
from .state import DeviceState
from .tensors import check_finite_pieces, count_true, nonzero, same_device

STATE_FORMAT = "cmdtool-training-state"


class EmbeddedCMD:
    """Online CMD, and optionally embedded CMD, alongside a model being trained:

        cmd = EmbeddedCMD(model, modes=10, warmup=20, embed_window=10, embed_percent=10)
        cmd.attach(optimizer)            # cmd.step() after every optimizer step (embedded CMD)
        for epoch in range(epochs):
            train_one_epoch(model, optimizer)
            cmd.observe()                # once per epoch: the warm-up, then exact updates of a, b
        model.load_state_dict(cmd.reconstruct())   # the CMD weights at the last observation
        cmd.save("run.cmd.h5")                     # an ordinary mode file

    The first ``warmup`` observations are kept on the CPU (``F · N · 4`` bytes) and decomposed by
    the code of ``cmd fit``; then the state (``a, b`` in float64, labels) lives on the model's device
    and each observation updates it as ``cmd update`` does, in place. With ``embed_percent`` P > 0,
    every ``embed_window`` L observations after the warm-up the P % of the trainable parameters not
    yet embedded (of all of them with ``relative=False``) whose ``(a, b)`` changed least since the
    previous window are embedded: their gradient is masked by a hook and ``step()`` sets them to
    ``a · r(t) + b`` from the live reference parameters. Reference parameters and buffers (BatchNorm
    statistics, modelled like any float tensor) are never embedded.

    Args:
        model: The model being trained (its state dict is observed in place, on its device).
        modes: Most modes (M) to find, as ``cmd fit --modes``.
        warmup: Observations (F) the modes and references are found on.
        embed_window: Observations (L) between embedding windows; the first is at observation F + L.
        embed_percent: Percentage (P) embedded per window; 0 is online CMD only.
        relative: P % of the parameters not yet embedded (True) or of all embeddable ones (False).
        samples: Parameters sampled (K) to find the modes.
        seed: Seed of that sample.
        include: Model only tensors whose name matches one of these globs.
        exclude: Do not model tensors matching these globs (they are carried verbatim).
        every_n_steps: Recorded for the callbacks: observe every n optimizer steps instead of per epoch.
        drop_shared: Leave out tensors that share storage with an earlier one (tied weights).

    Raises:
        CmdError: A setting out of range.
    """

    def __init__(self, model: torch.nn.Module, *, modes: int = 10, warmup: int = 10, embed_window: int = 10,
                 embed_percent: float = 0.0, relative: bool = True, samples: int = 1000, seed: int = 0,
                 include: Sequence[str] = (), exclude: Sequence[str] = (), every_n_steps: int | None = None,
                 drop_shared: bool = False):
        if isinstance(include, str) or isinstance(exclude, str):  # tuple("fc.*") would be four patterns
            FitSettings(include=include, exclude=exclude)  # the one message for it
        self.settings = TrainingSettings(modes, warmup, embed_window, float(embed_percent), bool(relative), samples,
                                         seed, tuple(include), tuple(exclude), every_n_steps)
        self.model = model
        self.drop_shared = drop_shared  # leave out tensors sharing storage with an earlier one (tied weights)
        self.layout: Layout | None = None
        self.state: DeviceState | None = None
        self._rows: list[np.ndarray] = []
        self._warmup_carried: dict[str, list[np.ndarray]] = {}
        self._times: list[int] = []
        self._names: list[str] = []
        self._infos: list[CheckpointInfo] = []
        self.attachments: dict[str, bytes] = {}
        self._hooks: list = []
        self._embedded_tensors: list = []  # (name, positions, lo, hi) of tensors with embedded parameters
        self._shapes: dict = {}  # name -> shape of the tensors step() reads or writes
        self._frozen_labels: torch.Tensor | None = None  # int32, of the embedded columns
        self._work: torch.Tensor | None = None
        self._embeddable: torch.Tensor | None = None
        self._references: list[tuple[str, int]] = []

    # -- what the model holds

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The model's state, live (no copy): parameters and buffers by state-dict name."""
        tensors, kept = {}, {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if self.drop_shared and tensor.numel() and tensor.device.type != "meta":
                alike = kept.setdefault((tensor.dtype, tuple(tensor.shape), tensor.device), [])
                if any(tensor.is_set_to(other) for other in alike):  # the same memory as an earlier one
                    continue
                alike.append(tensor)
            tensors[name] = tensor
        return tensors

    def tensor_names(self) -> list[str]:
        """The state-dict names observed (with ``drop_shared``, without the later names of tied tensors)."""
        return list(self._tensors())

    @property
    def last_time(self) -> int | None:
        """The time of the latest observation, None before the first."""
        return self.state.time[-1] if self.state is not None else (self._times[-1] if self._times else None)

    @property
    def T(self) -> int:
        """Observations so far."""
        return self.state.T if self.state is not None else len(self._rows)

    @property
    def ready(self) -> bool:
        """Whether the warm-up is over and the modes exist."""
        return self.state is not None

    @property
    def embeddable_count(self) -> int:
        return 0 if self._embeddable is None else count_true(self._embeddable)

    @property
    def embedded_fraction(self) -> float:
        """Embedded parameters over the embeddable ones (trainable, not references); 0 before any window."""
        total = self.embeddable_count
        return count_true(self.state.embedded) / total if self.state is not None and total else 0.0

    @property
    def rel_error(self) -> float | None:
        """The fit's relative error over the observations so far (least squares), None in the warm-up."""
        return None if self.state is None else self.state.least_squares_rel_error()

    # -- the training loop's events

    def observe(self, name: str | None = None, time: int | None = None, info: CheckpointInfo | None = None) -> None:
        """Absorb the model's current weights (e.g. once per epoch).

        Args:
            name: The file name ``cmd reconstruct`` writes it under (default ``checkpoint_{t}.safetensors``).
            time: Its step or epoch (default the count of observations); must increase.
            info: How it is written back (default: a plain safetensors file).

        Raises:
            CmdError: A tensor whose name, shape or dtype changed, NaN or Inf weights, a time that
                does not increase, a model moved to another device.
        """
        t = self.T
        name = name or f"checkpoint_{t}.safetensors"
        time = t if time is None else int(time)
        where = f"observation {t} ({name})"
        tensors = self._tensors()
        signature = {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in tensors.items()}
        if self.layout is None:
            self.layout = build_layout(signature, self.settings.include, self.settings.exclude)
            self._warmup_carried = {spec.name: [] for spec in self.layout.carried}
        check_same_tensors(where, signature, self.layout.signature, "the first observation")
        last = self.last_time
        if last is not None and time <= last:
            raise CmdError(f"{where}: time {time} does not come after {last}")
        with torch.no_grad():  # the model's own values, flat views (a copy only of a non-contiguous tensor)
            pieces = [tensors[s.name].detach().reshape(-1) for s in self.layout.modelled]
            if self.state is not None:
                same_device(pieces, self.state.device, where)
            check_finite_pieces(pieces, self.layout.modelled, where)
        carried = {s.name: tensors[s.name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().copy()
                   for s in self.layout.carried}
        info = info or CheckpointInfo("safetensors")
        if self.state is not None:
            self.state.observe(pieces, name, time, info, carried)
            settings = self.settings
            window = settings.embed_percent > 0 and (self.T - self.state.warmup) % settings.embed_window == 0
            if window:
                self.state.embed(settings.embed_percent, settings.relative, self._embeddable_mask())
            self._bind(rebuild=window)
            return
        with torch.no_grad():
            w = torch.cat([p.to(torch.float32) for p in pieces])
        self._rows.append(w.cpu().numpy())
        self._times.append(time)
        self._names.append(name)
        self._infos.append(info)
        for key, rows in self._warmup_carried.items():
            rows.append(carried[key])
        if len(self._rows) == self.settings.warmup:
            online = warmup_state(np.stack(self._rows), self.layout, self._times, self._names, self._infos,
                                  {k: np.stack(v) for k, v in self._warmup_carried.items()},
                                  self.settings.fit_settings(), self.attachments)
            self.state = DeviceState.from_online(online, w.device)
            self._rows, self._warmup_carried, self._times, self._names, self._infos = [], {}, [], [], []
            self._bind()

    def step(self) -> None:
        """Set every embedded parameter to ``a · r(t) + b`` from the live reference parameters: call
        it after every optimizer step (``attach`` does), so that momentum or weight decay cannot
        move an embedded parameter."""
        if not self._embedded_tensors:
            return
        state, tensors = self.state, self._tensors()
        for name, shape in self._shapes.items():  # positions index the observed shapes
            now = "missing" if name not in tensors else list(tensors[name].shape)
            if now != list(shape):
                raise CmdError(f"EmbeddedCMD.step: tensor {name!r} is {now} now, but {list(shape)} when observed")
        same_device([tensors[name] for name in self._shapes], state.device, "EmbeddedCMD.step")
        with torch.no_grad():
            live = torch.stack([tensors[n].detach().reshape(-1)[p] for n, p in self._references]).to(torch.float64)
            a, b, labels = state.frozen_a, state.frozen_b, self._frozen_labels
            for name, positions, lo, hi in self._embedded_tensors:
                parameter = tensors[name].detach()
                # positions are in the tensor's logical order: a channels_last weight is set through a copy
                target = parameter.view(-1) if parameter.is_contiguous() else parameter.reshape(-1)
                work = self._work
                for start in range(lo, hi, work.numel()):  # in blocks whose work buffer stays in the CPU cache
                    stop = min(start + work.numel(), hi)
                    values = torch.index_select(live, 0, labels[start:stop], out=work[:stop - start])
                    values.mul_(a[start:stop]).add_(b[start:stop])
                    target.index_copy_(0, positions[start - lo:stop - lo], values.to(target.dtype))
                if not parameter.is_contiguous():
                    parameter.copy_(target.view(parameter.shape))

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call ``step()`` after every ``optimizer.step()``.

        Args:
            optimizer: The model's optimizer.

        Returns:
            handle (torch.utils.hooks.RemovableHandle): The hook's handle (``handle.remove()`` detaches it).
        """
        return optimizer.register_step_post_hook(lambda *args: self.step())

    # -- embedding bookkeeping

    def _embeddable_mask(self) -> torch.Tensor:
        """Trainable parameters (``requires_grad``) that are not references, (N,) bool on the device."""
        if self._embeddable is None:
            trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
            mask = torch.zeros(self.layout.n_parameters, dtype=torch.bool, device=self.state.device)
            for spec in self.layout.modelled:
                if spec.name in trainable:
                    mask[spec.columns] = True
            mask[torch.as_tensor(self.state.reference_index, device=mask.device)] = False
            self._embeddable = mask
        return self._embeddable

    def _bind(self, rebuild: bool = True) -> None:
        """When the embedded set changed (``rebuild``): find the embedded parameters per tensor, mask
        their gradients, and set them to their frozen fits (``DeviceState.frozen_a, frozen_b``, against
        the raw references, so that nothing needs redoing when the frame moves at an observation)."""
        if not rebuild:
            return
        state = self.state
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._embedded_tensors = [], []
        offsets = {spec.name: spec.offset for spec in self.layout.modelled}
        names = [self.layout.locate(int(i))[0] for i in state.reference_index]
        self._references = [(name, int(i) - offsets[name]) for name, i in zip(names, state.reference_index)]
        self._shapes = {name: tuple(self.layout.signature[name][0]) for name in names}
        if self.settings.embed_percent > 0:
            self._embeddable_mask()
        columns = nonzero(state.embedded)  # sorted, as frozen_a and frozen_b
        self._frozen_labels = torch.index_select(state.labels, 0, columns).to(torch.int32)
        self._work = torch.empty(max(1, min(state.block, columns.numel())), dtype=torch.float64, device=state.device)
        parameters = dict(self.model.named_parameters())
        bounds = torch.tensor([[s.offset, s.offset + s.size] for s in self.layout.modelled], device=columns.device)
        bounds = torch.searchsorted(columns, bounds.reshape(-1)).reshape(-1, 2).tolist()
        for spec, (lo, hi) in zip(self.layout.modelled, bounds):
            if hi == lo or spec.name not in parameters:
                continue
            self._embedded_tensors.append((spec.name, columns[lo:hi] - spec.offset, lo, hi))
            self._shapes[spec.name] = tuple(spec.shape)
            parameter = parameters[spec.name]
            # Times the free mask, in place, once the gradient is accumulated: masked_fill was 11× slower
            free = (~state.embedded[spec.columns]).view(spec.shape).to(parameter.dtype)
            self._hooks.append(parameter.register_post_accumulate_grad_hook(partial(_mask_gradient, free=free)))
        self.step()

    def close(self) -> None:
        """Remove the gradient hooks (the embedded parameters are trained again from here)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._embedded_tensors = [], []

    # -- results

    def _require(self, what: str) -> DeviceState:
        if self.state is None:
            raise CmdError(f"EmbeddedCMD.{what}: no modes yet; the warm-up needs {self.settings.warmup} "
                           f"observations and the run has made {self.T} (a warm-up longer than the run?)")
        return self.state

    def reconstruct(self) -> dict[str, torch.Tensor]:
        """The CMD state dict at the latest observation.

        Returns:
            CPU tensors in the model's dtypes, loadable with ``model.load_state_dict``; a running
            variance clamped at 0, as ``cmd reconstruct`` writes it.

        Raises:
            CmdError: The warm-up is not over yet.
        """
        state = self._require("reconstruct")
        values = state.values()
        clamped = Clamped()
        out = {}
        for spec in self.layout.tensors:
            if spec.modelled:
                value = clamped.tensor(spec.name, values[spec.columns].view(spec.shape))
                out[spec.name] = value.to(getattr(torch, spec.dtype)).cpu()
            else:
                raw = torch.from_numpy(state.carried[spec.name][-1].copy())
                out[spec.name] = raw.view(getattr(torch, spec.dtype)).reshape(spec.shape)
        return out

    @contextmanager
    def cmd_weights(self) -> Iterator[None]:
        """Inside the block the model holds the CMD weights (e.g. to validate them), then its own."""
        self._require("cmd_weights")
        tensors = self._tensors()
        saved = {s.name: tensors[s.name].detach().clone() for s in self.layout.modelled}
        try:
            self.load_cmd_weights()
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    tensors[name].detach().copy_(value)

    def load_cmd_weights(self) -> int:
        """Put the CMD weights of the latest observation into the model, in place; returns how many
        running-variance values were clamped at 0 (a reconstruction can dip below zero)."""
        values, tensors = self._require("load_cmd_weights").values(), self._tensors()
        clamped = Clamped()
        with torch.no_grad():
            for spec in self.layout.modelled:
                target = tensors[spec.name].detach()
                target.copy_(clamped.tensor(spec.name, values[spec.columns].view(spec.shape)).to(target.dtype))
        return clamped.total

    def save(self, path: str | Path) -> Path:
        """Write (or atomically replace) the mode file; with embedding, its ``embedding`` group.

        Args:
            path: The mode file to write.

        Returns:
            The path written.
        """
        state, path = self._require("save"), Path(path)
        if not path.parent.is_dir():
            raise CmdError(f"{path.parent}: no such folder for the mode file")
        tmp = temporary_sibling(path, "training")
        try:
            write_mode_file(tmp, state.to_online().to_modes())
            if self.settings.embed_percent > 0:
                write_embedding(tmp, state.embedded_at.cpu().numpy(), warmup=state.warmup,
                                window=self.settings.embed_window, percent=self.settings.embed_percent,
                                relative=self.settings.relative, embeddable=self.embeddable_count)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    # -- resuming

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: tensors, numbers and strings only."""
        out = dict(format=STATE_FORMAT, version=1, settings=self.settings.to_dict(),
                   layout=None if self.layout is None else self.layout.to_json(),
                   attachments={k: torch.frombuffer(bytearray(v), dtype=torch.uint8)
                                for k, v in self.attachments.items()})
        if self.state is not None:
            out["state"] = save_state(self.state)
        else:
            out["warmup"] = dict(rows=[torch.from_numpy(r) for r in self._rows], time=list(self._times),
                                 names=list(self._names), infos=[i.to_json() for i in self._infos],
                                 carried={k: [torch.from_numpy(r) for r in v]
                                          for k, v in self._warmup_carried.items()})
        return out

    def load_state_dict(self, saved: dict) -> None:
        """Continue from ``state_dict()``.

        Args:
            saved: What ``state_dict()`` returned (e.g. read back with ``torch.load(..., weights_only=True)``).

        Raises:
            CmdError: Other settings than this object's (each difference named), or a corrupt state.
        """
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
            raise CmdError("the saved CMD state is not an EmbeddedCMD state")
        if not isinstance(saved.get("settings"), dict):
            raise CmdError(f"the saved CMD state is incomplete or corrupt (its settings are "
                           f"{type(saved.get('settings')).__name__}, not a dict)")
        ours = self.settings.to_dict()
        changed = [f"{k} is {shown(saved['settings'].get(k))} in the saved state, {v!r} now"
                   for k, v in ours.items() if not _same(saved["settings"].get(k), v)]
        if changed:
            raise CmdError("resuming with other CMD settings: " + "; ".join(changed))
        if self.model is None:
            raise CmdError("EmbeddedCMD.load_state_dict: no model to resume into")
        tensors = self._tensors()
        device = next((t.device for t in tensors.values()), torch.device("cpu"))
        try:  # everything read is checked before this object changes (a refused state leaves it as it was)
            signature = {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in tensors.items()}
            check_outer(saved, build_layout(signature, self.settings.include, self.settings.exclude),
                        self.settings.warmup)
            layout = None if saved["layout"] is None else Layout.from_json(saved["layout"])
            attachments = {k: v.numpy().tobytes() for k, v in saved["attachments"].items()}
            if "state" not in saved:
                warm = saved["warmup"]
                rows = [r.detach().numpy().copy() for r in warm["rows"]]
                times, names = [int(t) for t in warm["time"]], list(warm["names"])
                infos = [CheckpointInfo.from_json(s) for s in warm["infos"]]
                carried = {k: [r.detach().numpy().copy() for r in v] for k, v in warm["carried"].items()}
        except (KeyError, AttributeError, TypeError, ValueError, IndexError, RuntimeError, OverflowError,
                RecursionError) as e:
            text = " ".join(str(e).split())[:300]
            raise CmdError(f"the saved CMD state is incomplete or corrupt ({type(e).__name__}: {text})") from None
        state = load_state(saved["state"], device) if "state" in saved else None
        self.close()  # the hooks of what this object held before
        self.layout, self.attachments, self._embeddable, self.state = layout, attachments, None, state
        if state is not None:
            self._rows, self._warmup_carried, self._times, self._names, self._infos = [], {}, [], [], []
            self._embeddable_mask()
            self._bind()
        else:
            self._rows, self._times, self._names, self._infos = rows, times, names, infos
            self._warmup_carried = carried


def _same(saved, ours) -> bool:
    """A saved setting equals ours, of the same kind (``True`` is not the seed 1; a tensor is compared to nothing)."""
    if type(saved) is not type(ours) and not (type(ours) is float and type(saved) is int):
        return False
    if isinstance(ours, list):
        return len(saved) == len(ours) and all(type(x) is str and x == y for x, y in zip(saved, ours))
    return saved == ours


def shown(value) -> str:
    """A saved value in a message: its repr, at most 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

def _mask_gradient(parameter: torch.nn.Parameter, free: torch.Tensor) -> None:
    """Zero the embedded entries of the accumulated gradient (times the free mask, in place)."""
    parameter.grad.mul_(free)
