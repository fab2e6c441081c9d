"""The state of an online fit (paper §3.3), its warm-up, and one observation as a trajectory row.

Modes and references are found once, on the first ``F`` checkpoints (the warm-up: post-hoc CMD,
``fitting.decompose``, as in ``cmd fit``); after that they stay fixed, every new checkpoint appends
``r_m(t) = w_ref_m(t)`` to the references and updates every parameter's ``a, b`` exactly through the
normal equations (``least_squares.update_fit``; in place, ``update_parameters``). An update needs one
checkpoint plus ``O(N)`` per-parameter state, all of it in the mode file: ``a, b, labels`` and, in the
``online`` group, the first checkpoint's values (for ``rel_error_displacement``) and the
least-squares error per mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import numpy as np

from ..checkpoints.schema import CheckpointInfo
from ..decompose import label_dtype
from ..errors import CmdError
from ..fitting import fit_trajectory
from ..layout import Layout, check_same_tensors
from ..modes import CarriedRows, FitMetrics, FitSettings, Modes, ModesShape, OnlineInfo, model_values
from ..progress import Progress, no_progress
from ..trajectory import InMemoryTrajectory, Trajectory, check_finite, moving_parameters
from .least_squares import update_frame, update_parameters

if TYPE_CHECKING:
    import torch

    from ..checkpoints.discover import Checkpoint


def flatten(source: str, values: Callable[[str], np.ndarray], raw_bytes: Callable[[str], np.ndarray],
            layout: Layout) -> tuple[np.ndarray, dict]:
    """One checkpoint as the trajectory store would hold it: the modelled values as one float32
    row ``(N,)`` (``values(name)``, flat float32) and each carried tensor's raw bytes
    (``raw_bytes(name)``). Non-finite values are an error naming ``source``."""
    w = np.empty(layout.n_parameters, dtype=np.float32)
    carried = {}
    for spec in layout.tensors:
        if spec.modelled:
            row = values(spec.name)
            check_finite(row, source, spec.name)
            w[spec.columns] = row
        else:
            carried[spec.name] = raw_bytes(spec.name).copy()
    return w, carried


def read_checkpoint(checkpoint: Checkpoint, layout: Layout, first_name: str,
                    ema: bool = False) -> tuple[np.ndarray, dict, CheckpointInfo, dict[str, bytes]]:
    """One checkpoint (file or Hugging Face folder; timm's EMA weights with ``ema``): its row,
    carried tensors, write-back info and the files its folder copies back (by SHA-256)."""
    with checkpoint.open(ema) as reader:
        check_same_tensors(checkpoint.path, reader.signature, layout.signature, first_name)
        w, carried = flatten(str(checkpoint.path), reader.float32_values, reader.raw_bytes, layout)
        return w, carried, reader.info, reader.attachments


def appended_rows(before: np.ndarray | CarriedRows, new: list[np.ndarray]) -> CarriedRows:
    """A carried tensor's rows: those of the fit it started from (an array, or ``CarriedRows`` read
    from the mode file in blocks when written) and those observed since, one row each."""
    def blocks() -> Iterator[np.ndarray]:
        head = before.blocks() if isinstance(before, CarriedRows) else [before]
        return chain(head, [np.stack(new)] if new else [])

    return CarriedRows((before.shape[0] + len(new), before.shape[1]), blocks)


@dataclass
class OnlineState(ModesShape):
    """Everything an update needs: ``O(N)`` per parameter plus the ``M × T`` references.

    ``a, b`` are float64 while in memory; the mode file stores them as float32 (one rounding per
    save, which the reported error includes as in ``cmd fit``).
    """
    layout: Layout
    labels: np.ndarray            # (N,) int64, fixed after the warm-up
    a: np.ndarray                 # (N,) float64, against the normalised references
    b: np.ndarray                 # (N,) float64
    first: np.ndarray             # (N,) float32, the first checkpoint's values
    references: np.ndarray        # (M, T) float64, normalised
    offset: np.ndarray            # (M,)
    scale: np.ndarray             # (M,)
    reference_index: np.ndarray   # (M,)
    time: list[int]
    names: list[str]
    infos: list[CheckpointInfo]
    mode_sizes: np.ndarray
    settings: FitSettings
    warmup: int
    mode_sse_least_squares: np.ndarray  # (M,) least-squares error of each mode over the T checkpoints
    sq_norm: float                # Σ w², Σ (w − w(0))², Σ (w − mean w)² over all parameters and checkpoints
    sq_displacement: float
    sq_centred: float
    carried_before: dict = field(default_factory=dict)  # name -> rows of the modes it started from
    carried_new: dict = field(default_factory=dict)     # name -> rows observed since
    attachments: dict = field(default_factory=dict)     # SHA-256 -> bytes of files copied back (HF configs)
    error_curve: dict | None = None                     # the warm-up's --modes auto curve, kept as it was

    @classmethod
    def from_modes(cls, modes: Modes, first: np.ndarray | None = None) -> "OnlineState":
        """The state of a fit. A plain ``cmd fit`` has no online state, so the first checkpoint's
        values must be given; its warm-up is all its checkpoints."""
        if modes.online is not None:
            first, mode_sse, warmup = modes.online.first, modes.online.mode_sse_least_squares, modes.online.warmup
        else:
            if first is None:
                raise ValueError("the first checkpoint's values are needed for modes without online state")
            # The fit's per-mode error includes the float32 rounding of its a, b (relative size 1e-14).
            mode_sse, warmup = np.asarray(modes.metrics.mode_sse, dtype=np.float64), modes.T
        return cls(
            layout=modes.layout, labels=modes.labels.astype(np.int64), a=modes.a.astype(np.float64),
            b=modes.b.astype(np.float64), first=np.asarray(first, dtype=np.float32),
            references=modes.references.astype(np.float64), offset=modes.reference_offset.astype(np.float64),
            scale=modes.reference_scale.astype(np.float64), reference_index=modes.reference_index.astype(np.int64),
            time=[int(t) for t in modes.time], names=list(modes.names), infos=list(modes.infos),
            mode_sizes=modes.mode_sizes.copy(), settings=modes.settings, warmup=warmup,
            mode_sse_least_squares=np.array(mode_sse, dtype=np.float64), sq_norm=modes.metrics.sq_norm,
            sq_displacement=modes.metrics.sq_displacement, sq_centred=modes.metrics.sq_centred,
            carried_before=dict(modes.carried), carried_new={spec.name: [] for spec in modes.layout.carried},
            attachments=dict(modes.attachments), error_curve=modes.metrics.error_curve)

    def observe(self, w: np.ndarray, name: str, time: int, info: CheckpointInfo, carried: Mapping[str, np.ndarray],
                attachments: Mapping[str, bytes] = {}) -> None:
        """Absorb one checkpoint: ``w`` (N,) float32 as ``flatten`` returns it (``update_parameters``,
        the one update of online CMD, in place)."""
        frame = update_frame(self.references, self.offset, self.scale, w[self.reference_index])
        sums = update_parameters(self.a, self.b, self.first, self.labels, [w], frame)
        self.sq_norm += sums.sq_norm
        self.sq_displacement += sums.sq_displacement
        self.sq_centred += sums.sq_centred
        self.mode_sse_least_squares += sums.mode_sse
        self.references, self.offset, self.scale = frame.references, frame.offset, frame.scale
        self.time.append(int(time))
        self.names.append(name)
        self.infos.append(info)
        self.attachments.update(attachments)
        for key, rows in self.carried_new.items():
            rows.append(np.asarray(carried[key], dtype=np.uint8))

    def _carried(self, name: str) -> CarriedRows:
        return appended_rows(self.carried_before[name], self.carried_new[name])

    def to_modes(self) -> Modes:
        """The fit as a mode file stores it: float32 ``a, b`` and references, and the metrics of
        that stored model (the least-squares error plus the float32 rounding, as ``cmd fit``)."""
        a32, b32 = self.a.astype(np.float32), self.b.astype(np.float32)
        rounding = (self.a - a32) ** 2 + self.T * (self.b - b32) ** 2
        mode_sse = self.mode_sse_least_squares + np.bincount(self.labels, weights=rounding, minlength=self.M)
        metrics = FitMetrics.of(sse=float(mode_sse.sum()), mode_sse=mode_sse, sq_norm=self.sq_norm,
                                sq_displacement=self.sq_displacement, sq_centred=self.sq_centred,
                                error_curve=self.error_curve)
        return Modes(
            layout=self.layout, references=self.references.astype(np.float32), reference_offset=self.offset,
            reference_scale=self.scale, reference_index=self.reference_index,
            labels=self.labels.astype(label_dtype(self.M)), a=a32, b=b32, mode_sizes=self.mode_sizes,
            time=np.asarray(self.time, dtype=np.int64), names=list(self.names), infos=list(self.infos),
            settings=self.settings, metrics=metrics,
            carried={spec.name: self._carried(spec.name) for spec in self.layout.carried},
            attachments=dict(self.attachments),
            online=OnlineInfo(self.warmup, self.first, self.mode_sse_least_squares.copy()))

    def state_dict(self, carried: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The CMD state dict at the latest checkpoint (float64 ``a·r + b``, cast per tensor)."""
        from ..reconstruct import assemble_state_dict
        r = self.references[:, -1]
        return assemble_state_dict(self.layout, lambda spec: model_values(
            self.labels[spec.columns], self.a[spec.columns], self.b[spec.columns], r),
            lambda spec: carried[spec.name])


def warmup_trajectory(W: np.ndarray, layout: Layout, time: list[int], names: list[str], infos: list[CheckpointInfo],
                      carried: Mapping[str, np.ndarray], attachments: Mapping[str, bytes]) -> InMemoryTrajectory:
    """Warm-up rows held in memory (``OnlineCMD``) as a trajectory the fit reads."""
    return InMemoryTrajectory(layout, np.asarray(time, dtype=np.int64), list(names), list(infos),
                              moving_parameters(W), W, dict(carried), dict(attachments))


def fit_warmup(trajectory: Trajectory, settings: FitSettings, tile_columns: int | None = None,
               progress: Progress = no_progress) -> Modes:
    """``cmd fit --warmup F``: modes and references from the first ``F = settings.warmup``
    checkpoints of the trajectory (the very fit of ``cmd fit``), then one exact update per later one."""
    F, T = settings.warmup, trajectory.T
    if F is None or not 2 <= F <= T:
        raise CmdError(f"warmup {F}: the warm-up needs at least 2 checkpoints and at most the {T} selected",
                       parameter="warmup")
    carried = {spec.name: trajectory.carried(spec.name) for spec in trajectory.layout.carried}
    head = InMemoryTrajectory(trajectory.layout, trajectory.time[:F], trajectory.names[:F], trajectory.infos[:F],
                              moving_parameters(trajectory.W[:F]), trajectory.W[:F],
                              {name: rows[:F] for name, rows in carried.items()}, trajectory.attachments())
    state = OnlineState.from_modes(fit_trajectory(head, settings, tile_columns=tile_columns, progress=progress),
                                   np.asarray(trajectory.W[0]))
    with progress("updating modes", T - F) as advance:
        for t in range(F, T):
            state.observe(np.asarray(trajectory.W[t]), trajectory.names[t], int(trajectory.time[t]),
                          trajectory.infos[t], {name: rows[t] for name, rows in carried.items()})
            advance(1)
    return state.to_modes()
