"""Online and embedded CMD state of a live model: ``O(N)`` torch tensors on the model's device.

After the warm-up (``_warmup.warmup_state``, the code of ``cmd fit``) every observation updates
``a, b`` by ``online.least_squares.update_parameters``, the one update of online CMD (paper §3.3), which ``cmd
update`` runs on numpy arrays and this state runs on the model's tensors, on any device, with the
same operations. Embedded CMD (§3.4): every ``L`` observations the ``P`` % of the embeddable
parameters whose ``(a, b)`` moved least since the previous window are frozen; their fit is then only
re-expressed as the references are renormalised (``frozen`` in ``update_parameters``), so each stays
the same affine function of its raw reference. No code is compiled or loaded at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checkpoints import CheckpointInfo
from ..layout import Layout
from ..modes import FitSettings, ModesShape
from ..online.least_squares import BLOCK, update_frame, update_parameters
from ..online.state import OnlineState
from ._warmup import carried_rows
from .tensors import count_true, nonzero

NEVER = -1  # embedded_at of a parameter that was never embedded
LANES = 8  # partial sums per mode of the update's Σ e²


@dataclass
class DeviceState(ModesShape):
    """What ``OnlineState`` holds, with the per-parameter part as device tensors, plus the embedding."""
    layout: Layout
    settings: FitSettings
    warmup: int
    labels: torch.Tensor          # (N,) int64
    a: torch.Tensor               # (N,) float64, against the normalised references
    b: torch.Tensor               # (N,) float64
    first: torch.Tensor           # (N,) float64 (exactly the float32 values): the first observation
    references: np.ndarray        # (M, T) float64, normalised
    offset: np.ndarray            # (M,)
    scale: np.ndarray             # (M,)
    reference_index: np.ndarray   # (M,) int64
    mode_sizes: np.ndarray
    mode_sse: np.ndarray          # (M,) least-squares error per mode, summed over time
    sq_norm: float
    sq_displacement: float
    sq_centred: float
    time: list[int]
    names: list[str]
    infos: list[CheckpointInfo]
    carried: dict[str, list[np.ndarray]]
    attachments: dict[str, bytes]
    embedded_at: torch.Tensor     # (N,) int32: position of the observation after which it was embedded, or NEVER
    snapshot_a: torch.Tensor      # (N,) float64: a, b against the raw reference at the previous window
    snapshot_b: torch.Tensor
    frozen_a: torch.Tensor        # (E,) float64: a, b of the embedded columns (sorted) against the raw
    frozen_b: torch.Tensor        # reference, set at each window: step() holds them at a · r(t) + b
    embedded: torch.Tensor = field(init=False)  # (N,) bool, embedded_at != NEVER
    block: int = field(init=False, default=BLOCK, repr=False)  # columns per pass of the update (any device)
    _change: torch.Tensor | None = field(init=False, default=None, repr=False)
    _where: torch.Tensor | None = field(init=False, default=None, repr=False)

    def __post_init__(self):
        self.embedded = self.embedded_at != NEVER
        _refuse(self._problems())
        if self.frozen_a is None or self.frozen_b is None:
            self._freeze()
        E = count_true(self.embedded)
        _refuse([f"{k} has {getattr(self, k).numel()} values, not {E}" for k in ("frozen_a", "frozen_b")
                 if getattr(self, k).shape != (E,)])

    def _problems(self) -> list[str]:
        """Sizes and ranges that are wrong (a saved state is read from a file; the update indexes with it)."""
        N, M = self.layout.n_parameters, self.M
        wrong = [f"{k} has {v.numel()} values, not {N}" for k, v in (
            ("labels", self.labels), ("a", self.a), ("b", self.b), ("first", self.first),
            ("embedded_at", self.embedded_at), ("snapshot_a", self.snapshot_a), ("snapshot_b", self.snapshot_b))
            if v.shape != (N,)]
        if self.references.ndim != 2 or self.references.shape[0] != M or any(
                np.shape(v) != (M,) for v in (self.offset, self.scale, self.reference_index, self.mode_sse)):
            wrong.append(f"the references are not {M} rows with an offset, scale, index and error each")
        if wrong or not N:
            return wrong
        low, high = (int(v) for v in torch.aminmax(self.labels))
        if low < 0 or high >= M:
            wrong.append(f"labels range from {low} to {high}, outside 0..{M - 1}")
        index = np.asarray(self.reference_index)
        if index.size and not (0 <= index.min() and index.max() < N):
            wrong.append("a reference index lies outside the parameters")
        return wrong

    @property
    def device(self) -> torch.device:
        return self.a.device

    @classmethod
    def from_online(cls, state: OnlineState, device: torch.device) -> "DeviceState":
        def put(array, dtype):
            # a copy: the update works in place, and the online state keeps its arrays
            return torch.as_tensor(np.ascontiguousarray(array)).to(device=device, dtype=dtype, copy=True)
        carried = {name: [np.asarray(row, dtype=np.uint8) for row in rows]
                   for name, rows in carried_rows(state).items()}
        N = state.layout.n_parameters
        out = cls(layout=state.layout, settings=state.settings, warmup=state.warmup,
                  labels=put(state.labels, torch.int64), a=put(state.a, torch.float64), b=put(state.b, torch.float64),
                  first=put(state.first, torch.float64), references=state.references.copy(),
                  offset=state.offset.copy(), scale=state.scale.copy(), reference_index=state.reference_index.copy(),
                  mode_sizes=state.mode_sizes.copy(), mode_sse=state.mode_sse_least_squares.copy(),
                  sq_norm=state.sq_norm, sq_displacement=state.sq_displacement, sq_centred=state.sq_centred,
                  time=list(state.time), names=list(state.names), infos=list(state.infos), carried=carried,
                  attachments=dict(state.attachments),
                  embedded_at=torch.full((state.layout.n_parameters,), NEVER, dtype=torch.int32, device=device),
                  snapshot_a=torch.empty(N, dtype=torch.float64, device=device),  # the raw fit, below
                  snapshot_b=torch.empty(N, dtype=torch.float64, device=device),
                  frozen_a=torch.zeros(0, dtype=torch.float64, device=device),
                  frozen_b=torch.zeros(0, dtype=torch.float64, device=device))
        out.snapshot_a, out.snapshot_b = out.raw_fit()
        return out

    def observe(self, w, name: str, time: int, info: CheckpointInfo, carried: dict[str, np.ndarray]) -> None:
        """Absorb one observation: ``w`` is the (N,) observation (on the device, laid out as
        ``self.layout``) or the modelled tensors' flat values in layout order (views of the model's
        own tensors: nothing is concatenated). Values are observed as float32: a float64 tensor is
        rounded first. ``online.least_squares.update_parameters`` updates ``a, b`` in place."""
        pieces = [w] if isinstance(w, torch.Tensor) else list(w)
        if sum(p.numel() for p in pieces) != self.labels.numel():
            raise ValueError(f"the observation has {sum(p.numel() for p in pieces)} values, the state "
                             f"{self.labels.numel()}")
        pieces = [p.to(torch.float32) if p.dtype == torch.float64 else p for p in pieces]
        frame = update_frame(self.references, self.offset, self.scale, self._reference_values(pieces))
        sums = update_parameters(self.a, self.b, self.first, self._lanes(), pieces, frame,
                                 frozen=self.embedded if self.frozen_a.numel() else None, lanes=LANES,
                                 block=self.block)
        self.sq_norm += sums.sq_norm
        self.sq_displacement += sums.sq_displacement
        self.sq_centred += sums.sq_centred
        self.mode_sse += sums.mode_sse
        self.references, self.offset, self.scale = frame.references, frame.offset, frame.scale
        self.time.append(int(time))
        self.names.append(name)
        self.infos.append(info)
        for key, rows in self.carried.items():
            rows.append(np.asarray(carried[key], dtype=np.uint8))

    def _lanes(self) -> torch.Tensor:
        """``label · LANES + column % LANES`` per parameter, int32 (cached: labels are fixed): the index
        of the update's per-mode factors, repeated LANES times, and of its partial sums."""
        if self._where is None:
            lane = torch.arange(self.labels.numel(), dtype=torch.int32, device=self.device).remainder_(LANES)
            self._where = lane.add_(self.labels.to(torch.int32), alpha=LANES)
        return self._where

    def _reference_values(self, pieces: list[torch.Tensor]) -> np.ndarray:
        """The reference parameters' values in ``pieces`` (rounded to float32 as the observation is), (M,)."""
        ends = np.cumsum([p.numel() for p in pieces])
        found = np.searchsorted(ends, self.reference_index, side="right")
        starts = ends - [p.numel() for p in pieces]
        values = torch.stack([pieces[i][int(c - starts[i])] for i, c in zip(found, self.reference_index)])
        return values.to(torch.float32).to(torch.float64).cpu().numpy()

    def raw_fit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``a, b`` against the raw reference (``w ≈ a · r + b``), the frame the authors measure
        the change of a fit in."""
        a_raw, b_raw = torch.empty_like(self.a), torch.empty_like(self.b)
        for _ in self._raw_blocks_into((a_raw, b_raw), whole=True):
            pass
        return a_raw, b_raw

    def _raw_blocks(self):
        """Per block of columns ``(lo, hi, scale[labels], offset[labels])``, the last two in work buffers."""
        size = max(1, min(self.block, self.labels.numel()))
        scale, offset = (torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).to(self.device)
                         for v in (self.scale, self.offset))
        y, z = (torch.empty(size, dtype=torch.float64, device=self.device) for _ in "yz")
        for lo in range(0, self.labels.numel(), size):
            hi = min(lo + size, self.labels.numel())
            labels = self.labels[lo:hi]
            yield lo, hi, torch.index_select(scale, 0, labels, out=y[:hi - lo]), \
                torch.index_select(offset, 0, labels, out=z[:hi - lo])

    def embed(self, percent: float, relative: bool, embeddable: torch.Tensor) -> int:
        """One window of embedded CMD: freeze the ``percent`` % of the embeddable, not yet embedded
        parameters (of all embeddable ones when not ``relative``) whose raw ``(a, b)`` changed least,
        by ``sqrt(Δa² + Δb²)``, since the previous window. Returns how many were embedded."""
        if self._change is None:   # kept: a fresh (N,) buffer costs its page faults at every window
            self._change = torch.empty_like(self.a)
        change = self._change
        work = [torch.empty(max(1, min(self.block, self.labels.numel())), dtype=torch.float64, device=self.device)
                for _ in "ab"]
        for lo, hi, a, b in self._raw_blocks_into(work):
            snap_a, snap_b = self.snapshot_a[lo:hi], self.snapshot_b[lo:hi]
            # Δa² + Δb² (the square root would not change the order); the new raw fit becomes the snapshot
            torch.sub(snap_a, a, out=change[lo:hi]).square_().add_(snap_b.sub_(b).square_())
            snap_a.copy_(a)
            snap_b.copy_(b)
        return self._select(change, embeddable, percent, relative)

    def _select(self, change: torch.Tensor, embeddable: torch.Tensor, percent: float, relative: bool) -> int:
        """Embed the count smallest ``change`` among the candidates: all below the count-th value, then
        ties at it in column order (a linear-time selection among the candidates, ``kthvalue``; topk of
        a million out of ten took seconds and breaks ties arbitrarily). ``change`` is overwritten (+inf
        where a column is no candidate)."""
        candidates = embeddable & ~self.embedded
        free, total = count_true(candidates), count_true(embeddable)
        change.masked_fill_(~candidates, float("inf"))
        count = min(free, math.ceil((free if relative else total) * percent / 100))
        if count == 0:
            return 0
        threshold = torch.kthvalue(change, count).values
        below, ties = nonzero(change < threshold), nonzero(change == threshold)
        chosen = torch.cat([below, ties[:count - below.shape[0]]])   # columns are sorted: ties in column order
        self.embedded_at[chosen] = self.T - 1
        self.embedded[chosen] = True
        self._freeze()
        return count

    def _freeze(self) -> None:
        """The raw ``a, b`` of every embedded column (sorted), into ``frozen_a, frozen_b``."""
        columns = nonzero(self.embedded)
        labels = torch.index_select(self.labels, 0, columns)
        scale, offset = (torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).to(self.device)
                         for v in (self.scale, self.offset))
        self.frozen_a = torch.index_select(self.a, 0, columns).div_(torch.index_select(scale, 0, labels))
        self.frozen_b = torch.index_select(self.b, 0, columns).sub_(
            torch.index_select(offset, 0, labels).mul_(self.frozen_a))

    def _raw_blocks_into(self, work, whole: bool = False):
        """``raw_fit`` block by block into the two work buffers (into columns ``lo:hi`` of two (N,)
        tensors when ``whole``): yields ``(lo, hi, a_raw, b_raw)``."""
        for lo, hi, scale, offset in self._raw_blocks():
            a, b = (work[0][lo:hi], work[1][lo:hi]) if whole else (work[0][:hi - lo], work[1][:hi - lo])
            torch.div(self.a[lo:hi], scale, out=a)
            torch.sub(self.b[lo:hi], torch.mul(offset, a, out=b), out=b)
            yield lo, hi, a, b

    def values(self) -> torch.Tensor:
        """The CMD weights at the latest observation, ``a · r̃(T) + b``, float64 (N,) on the device."""
        last = torch.from_numpy(np.ascontiguousarray(self.references[:, -1])).to(self.device)
        return torch.index_select(last, 0, self.labels).mul_(self.a).add_(self.b)

    def least_squares_rel_error(self) -> float:
        """``rel_error`` of the fit so far, without the float32 rounding a saved file adds."""
        return math.sqrt(float(self.mode_sse.sum()) / self.sq_norm) if self.sq_norm > 0 else 0.0

    def to_online(self) -> OnlineState:
        """The numpy ``OnlineState`` ``cmd update`` works on: it writes the mode file."""
        return OnlineState(
            layout=self.layout, labels=self.labels.cpu().numpy().copy(), a=self.a.cpu().numpy().copy(),
            b=self.b.cpu().numpy().copy(),
            first=self.first.cpu().numpy().astype(np.float32), references=self.references, offset=self.offset,
            scale=self.scale, reference_index=self.reference_index, time=list(self.time), names=list(self.names),
            infos=list(self.infos), mode_sizes=self.mode_sizes, settings=self.settings, warmup=self.warmup,
            mode_sse_least_squares=self.mode_sse.copy(), sq_norm=self.sq_norm, sq_displacement=self.sq_displacement,
            sq_centred=self.sq_centred, attachments=dict(self.attachments),
            carried_before={k: np.stack(v[:1]) for k, v in self.carried.items()},
            carried_new={k: list(v[1:]) for k, v in self.carried.items()})


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))
