"""Online and embedded CMD state of a live model: ``O(N)`` torch tensors on the model's device.

After the warm-up (``_warmup.warmup_state``, the code of ``cmd fit``) every observation updates
``a, b`` by the recursive least squares of ``decompose.update_parameters``, the function ``cmd
update`` runs on numpy arrays (paper §3.3), rearranged into fewer operations (``observe``) and on
the CPU run as one compiled loop (``fused``). Embedded CMD (§3.4): every ``L`` observations the
``P`` % of the embeddable parameters whose ``(a, b)`` moved least since the previous window are
frozen; their fit is then only re-expressed as the references are renormalised (``frozen`` in
``update_parameters``), so each stays the same affine function of its raw reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checkpoints import CheckpointInfo
from ..decompose import update_frame
from ..layout import Layout
from ..modes import FitSettings, ModesShape
from ..online.state import OnlineState
from . import fused as compiled
from ._warmup import carried_rows
from .tensors import address, count_true, nonzero

NEVER = -1  # embedded_at of a parameter that was never embedded
LANES = 8  # accumulators per mode of the CPU update's Σ e²
CHUNK = 1 << 16  # columns per block of the torch update on the CPU: four float64 buffers of 512 KiB, in the cache


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
    _work: list | None = field(init=False, default=None, repr=False)
    _plan: tuple | None = field(init=False, default=None, repr=False)
    _masked: tuple | None = field(init=False, default=None, repr=False)
    _change: torch.Tensor | None = field(init=False, default=None, repr=False)
    _where: torch.Tensor | None = field(init=False, default=None, repr=False)
    _scratch: np.ndarray | None = field(init=False, default=None, repr=False)

    def __post_init__(self):
        self.embedded = self.embedded_at != NEVER
        _refuse(self._problems())
        if self.frozen_a is None or self.frozen_b is None:
            self._freeze()
        E = count_true(self.embedded)
        _refuse([f"{k} has {getattr(self, k).numel()} values, not {E}" for k in ("frozen_a", "frozen_b")
                 if getattr(self, k).shape != (E,)])

    def _problems(self) -> list[str]:
        """Sizes and ranges that are wrong (a saved state is read from a file; the compiled loop indexes with it)."""
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
            return torch.as_tensor(np.ascontiguousarray(array)).to(device=device, dtype=dtype)
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
        """Absorb one observation: ``w`` is the (N,) observation (float32, on the device, laid out as
        ``self.layout``) or the modelled tensors' flat values in layout order (views of the model's
        own tensors: nothing is concatenated).

        The recursive least squares of ``decompose.update_parameters`` (``cmd update``), in place and
        rearranged into fewer passes. With ``y = w − b`` (``b`` is each parameter's mean) and ``ρ`` the
        new point in the old frame, the prediction error is ``e = y − aρ``; the least-squares error of
        the mode grows by ``e² / (1 + ρ² + 1/T)``, and the fit over the ``T + 1`` points, re-expressed
        against the renormalised references, is ``a ← (a + ρ·T/(T+1)·y) / ratio``, ``b ← b + y/(T+1)``
        (algebraically the same as ``[a b] += e · x G_new⁻¹`` followed by the change of frame; a test
        holds the two equal to 1e-12). Frozen (embedded) fits get ``e = 0`` and ``y − e`` (aρ). On the CPU
        it runs over blocks of ``CHUNK`` columns, so that its work buffers stay in the cache and each
        parameter's state is read and written once."""
        pieces = [w] if isinstance(w, torch.Tensor) else list(w)
        T, M, device = self.T, self.M, self.device
        frame = update_frame(self.references, self.offset, self.scale, self._reference_values(pieces))
        # Per-mode factors repeated LANES times: Σ e² goes into LANES accumulators per mode (column c into lane
        # c % LANES), as most parameters are often in one mode and adding into one address is a dependent chain.
        rho, inverse_ratio = (torch.from_numpy(np.repeat(np.asarray(v, dtype=np.float64), LANES)).to(device)
                              for v in (frame.rho, 1.0 / frame.ratio))
        grow, mean_step = T / (T + 1), 1.0 / (T + 1)
        where = self._lanes()
        squares = torch.zeros(M * LANES, dtype=torch.float64, device=device)
        fused = compiled.library() if device.type == "cpu" else None
        if fused is not None:
            sums = self._observe_fused(fused, pieces, where, rho, inverse_ratio, grow, mean_step, squares)
        else:
            sums = self._observe_blocks(pieces, where, rho, inverse_ratio, grow, mean_step, squares)
        self.sq_norm += sums[0]
        self.sq_displacement += sums[1]
        self.sq_centred += sums[2] * T / (T + 1)   # Welford
        squares = squares.view(M, LANES).sum(1).cpu().numpy()
        self.mode_sse += squares / frame.sse_weight   # the error grows by e² / (1 + x G⁻¹ xᵀ)
        self.references, self.offset, self.scale = frame.references, frame.offset, frame.scale
        self.time.append(int(time))
        self.names.append(name)
        self.infos.append(info)
        for key, rows in self.carried.items():
            rows.append(np.asarray(carried[key], dtype=np.uint8))

    def _observe_fused(self, fused, pieces, where, rho, inverse_ratio, grow, mean_step, squares) -> list[float]:
        """The update through the compiled loop (``fused``), one call per tensor."""
        if sum(p.numel() for p in pieces) != self.labels.numel():
            raise ValueError(f"the observation has {sum(p.numel() for p in pieces)} values, the state "
                             f"{self.labels.numel()}")
        sums = torch.zeros(3, dtype=torch.float64)
        frozen = self.embedded.data_ptr() if count_true(self.embedded) else None
        lo = 0
        for piece in pieces:
            n = piece.numel()
            if piece.dtype != torch.float32 or not piece.is_contiguous():  # observed as float32
                piece = piece.to(torch.float32).contiguous()
            fused.cmd_observe(piece.data_ptr(), n, address(self.a, lo), address(self.b, lo), address(self.first, lo),
                              address(where, lo), None if frozen is None else frozen + lo, rho.data_ptr(),
                              inverse_ratio.data_ptr(), grow, mean_step, squares.data_ptr(), sums.data_ptr())
            lo += n
        return sums.tolist()

    def _observe_blocks(self, pieces, where, rho, inverse_ratio, grow, mean_step, squares) -> list[float]:
        """The update in torch operations over blocks of columns (any device)."""
        device = self.device
        size = min(CHUNK if device.type == "cpu" else self.labels.numel(), self.labels.numel())
        if self._work is None or self._work[0].numel() != size:
            self._work = [torch.empty(size, dtype=torch.float64, device=device) for _ in range(4)]
        x, y, z, u = self._work
        on_cpu = device.type == "cpu"
        sums = []   # (‖w‖², ‖w − w₀‖², ‖w − b‖²) per block
        masked = self._masked_blocks(size)
        for k, (lo, hi, segments) in enumerate(self._blocks(pieces, size)):
            n = hi - lo
            xv, yv, zv, uv = x[:n], y[:n], z[:n], u[:n]
            a, b, at = self.a[lo:hi], self.b[lo:hi], where[lo:hi]
            for piece, start, stop, to in segments:
                values = pieces[piece][start:stop]
                xv[to:to + stop - start].copy_(values if values.dtype != torch.float64 else values.float())
            torch.sub(xv, self.first[lo:hi], out=yv)
            s_disp = torch.dot(yv, yv)
            torch.sub(xv, b, out=yv)                          # y = w − b
            sums.append((torch.dot(xv, xv), s_disp, torch.dot(yv, yv)))
            torch.index_select(rho, 0, at, out=zv)            # ρ of each parameter's mode
            torch.addcmul(yv, zv, a, value=-1.0, out=xv)      # e = y − aρ, the prediction error
            if masked[k]:  # frozen fits: e = 0 and y = aρ (y − e, exact for the others)
                if on_cpu:   # times the mask: masked_fill_ branches per value, 4× slower on a random mask
                    np.multiply(xv.numpy(), self.embedded[lo:hi].numpy(), out=uv.numpy())
                else:
                    torch.mul(xv, self.embedded[lo:hi], out=uv)
                yv.sub_(uv)
                xv.sub_(uv)
            squares.index_add_(0, at, torch.mul(xv, xv, out=uv))
            a.addcmul_(yv, zv, value=grow).mul_(torch.index_select(inverse_ratio, 0, at, out=zv))
            b.add_(yv, alpha=mean_step)
        return torch.stack([torch.stack(v) for v in sums]).sum(0).tolist()

    def _lanes(self) -> torch.Tensor:
        """``label · LANES + column % LANES`` per parameter, int32 (cached: labels are fixed): the
        accumulator of the per-mode sums, and the index of the per-mode factors repeated LANES times."""
        if self._where is None:
            if self.device.type == "cpu":  # numpy: torch's int64 arange and add over 11 M took 0.3 s each
                where = np.arange(self.labels.numel(), dtype=np.int32) % LANES
                where += self.labels.numpy().astype(np.int32) * LANES
                self._where = torch.from_numpy(where)
            else:
                lane = torch.arange(self.labels.numel(), device=self.device).remainder_(LANES)
                self._where = torch.add(lane, self.labels, alpha=LANES).to(torch.int32)
        return self._where

    def _reference_values(self, pieces: list[torch.Tensor]) -> np.ndarray:
        """The reference parameters' values in ``pieces`` (rounded to float32 as the observation is), (M,)."""
        ends = np.cumsum([p.numel() for p in pieces])
        found = np.searchsorted(ends, self.reference_index, side="right")
        starts = ends - [p.numel() for p in pieces]
        values = torch.stack([pieces[i][int(c - starts[i])] for i, c in zip(found, self.reference_index)])
        return values.to(torch.float32).to(torch.float64).cpu().numpy()

    def _blocks(self, pieces: list[torch.Tensor], size: int) -> list:
        """Columns ``[lo, hi)`` per block of ``size``, with the ``(piece, start, stop, at)`` segments
        of ``pieces`` that fill it (cached: the layout does not change)."""
        key = (size, tuple(p.numel() for p in pieces))
        if self._plan is None or self._plan[0] != key:
            blocks, starts = [], [int(v) for v in np.concatenate([[0], np.cumsum(key[1])])]
            for lo in range(0, starts[-1], size):
                hi, segments = min(lo + size, starts[-1]), []
                first = int(np.searchsorted(starts, lo, side="right")) - 1
                for i in range(first, int(np.searchsorted(starts, hi, side="left"))):
                    begin, end = max(lo, starts[i]), min(hi, starts[i + 1])
                    if end > begin:
                        segments.append((i, begin - starts[i], end - starts[i], begin - lo))
                blocks.append((lo, hi, segments))
            self._plan = (key, blocks)
        return self._plan[1]

    def _masked_blocks(self, size: int) -> list[bool]:
        """Per block of ``size`` columns, whether it holds embedded parameters (cached until ``embed``)."""
        if self._masked is None or self._masked[0] != size:
            starts = range(0, self.labels.numel(), size)
            if self.device.type == "cpu":
                flags = np.logical_or.reduceat(self.embedded.numpy(), list(starts)).tolist()
            else:
                flags = torch.stack([self.embedded[lo:lo + size].any() for lo in starts]).tolist()
            self._masked = (size, flags)
        return self._masked[1]

    def raw_fit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``a, b`` against the raw reference (``w ≈ a · r + b``), the frame the authors measure
        the change of a fit in."""
        a_raw, b_raw = torch.empty_like(self.a), torch.empty_like(self.b)
        for _ in self._raw_blocks_into((a_raw, b_raw), whole=True):
            pass
        return a_raw, b_raw

    def _raw_blocks(self):
        """Per block of columns ``(lo, hi, scale[labels], offset[labels])``, the last two in work buffers."""
        size = CHUNK if self.device.type == "cpu" else self.labels.numel()
        scale, offset = (torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).to(self.device)
                         for v in (self.scale, self.offset))
        y, z = (torch.empty(min(size, self.labels.numel()), dtype=torch.float64, device=self.device) for _ in "yz")
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
        fused = compiled.library() if self.device.type == "cpu" else None
        if fused is not None:
            scale, offset = (torch.from_numpy(np.repeat(np.asarray(v, dtype=np.float64), LANES))
                             for v in (self.scale, self.offset))
            fused.cmd_change(self.labels.numel(), self.a.data_ptr(), self.b.data_ptr(), self._lanes().data_ptr(),
                             scale.data_ptr(), offset.data_ptr(), self.snapshot_a.data_ptr(),
                             self.snapshot_b.data_ptr(), change.data_ptr())
        else:
            size = CHUNK if self.device.type == "cpu" else self.labels.numel()
            work = [torch.empty(min(size, self.labels.numel()), dtype=torch.float64, device=self.device) for _ in "ab"]
            for lo, hi, a, b in self._raw_blocks_into(work):
                snap_a, snap_b = self.snapshot_a[lo:hi], self.snapshot_b[lo:hi]
                # Δa² + Δb² (the square root would not change the order); the new raw fit becomes the snapshot
                torch.sub(snap_a, a, out=change[lo:hi]).square_().add_(snap_b.sub_(b).square_())
                snap_a.copy_(a)
                snap_b.copy_(b)
        if self.device.type == "cpu":   # numpy: torch's bool reductions and masked indexing are slow there
            return self._select(change.numpy(), embeddable.numpy(), self.embedded.numpy(), self.embedded_at.numpy(),
                                percent, relative, np)
        return self._select(change, embeddable, self.embedded, self.embedded_at, percent, relative, torch)

    def _select(self, change, embeddable, embedded, embedded_at, percent, relative, xp) -> int:
        """Embed the count smallest ``change`` among the candidates: all below the count-th value, then
        ties at it in column order (a linear-time selection among the candidates: np.partition on the
        CPU, kthvalue elsewhere; topk of a million out of ten took seconds and breaks ties arbitrarily).
        ``change`` is overwritten (+inf where a column is no candidate)."""
        candidates = embeddable & ~embedded
        if xp is np:   # in place and into a kept buffer: fresh (N,) arrays cost their page faults every window
            free, total = int(np.count_nonzero(candidates)), int(np.count_nonzero(embeddable))
            np.copyto(change, np.inf, where=~candidates)
        else:
            free, total = int(candidates.sum()), int(embeddable.sum())
            change.masked_fill_(~candidates, float("inf"))
        count = min(free, math.ceil((free if relative else total) * percent / 100))
        if count == 0:
            return 0
        if xp is np:
            if self._scratch is None or self._scratch.shape != change.shape:
                self._scratch = np.empty_like(change)
            np.copyto(self._scratch, change)
            self._scratch.partition(count - 1)
            threshold = self._scratch[count - 1]
            below = np.flatnonzero(change < threshold)
            ties = np.flatnonzero(change == threshold)
        else:
            threshold = torch.kthvalue(change, count).values
            below, ties = torch.nonzero(change < threshold).reshape(-1), torch.nonzero(change == threshold).reshape(-1)
        chosen = xp.concatenate([below, ties[:count - below.shape[0]]])   # columns are sorted: ties in column order
        embedded_at[chosen] = self.T - 1
        embedded[chosen] = True
        self._masked = None
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
            layout=self.layout, labels=self.labels.cpu().numpy(), a=self.a.cpu().numpy(), b=self.b.cpu().numpy(),
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
