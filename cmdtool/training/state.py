"""Online and embedded CMD state of a live model: ``O(N)`` torch tensors on the model's device.

After the warm-up (``_warmup.warmup_state``, the code of ``cmd fit``) every observation updates
``a, b`` with ``decompose.update_parameters``, the same function ``cmd update`` runs on numpy
arrays (paper §3.3). Embedded CMD (§3.4): every ``L`` observations the ``P`` % of the embeddable
parameters whose ``(a, b)`` moved least since the previous window are frozen; their fit is then
only re-expressed as the references are renormalised (``frozen`` in ``update_parameters``), so each
stays the same affine function of its raw reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checkpoints import CheckpointInfo
from ..decompose import update_frame
from ..errors import CmdError
from ..layout import Layout
from ..modes import FitSettings, ModesShape
from ..online.state import OnlineState

NEVER = -1  # embedded_at of a parameter that was never embedded
LANES = 8  # accumulators per mode of the CPU update's Σ e²
CHUNK = 1 << 16  # columns per block of the CPU update: its three float64 work buffers (512 KiB each) stay in the cache


@dataclass
class DeviceState(ModesShape):
    """What ``OnlineState`` holds, with the per-parameter part as device tensors, plus the embedding."""
    layout: Layout
    settings: FitSettings
    warmup: int
    labels: torch.Tensor          # (N,) int64
    a: torch.Tensor               # (N,) float64, against the normalised references
    b: torch.Tensor               # (N,) float64
    first: torch.Tensor           # (N,) float32, the first observation
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
    embedded: torch.Tensor = field(init=False)  # (N,) bool, embedded_at != NEVER
    _work: list | None = field(init=False, default=None, repr=False)
    _plan: tuple | None = field(init=False, default=None, repr=False)
    _masked: tuple | None = field(init=False, default=None, repr=False)
    _change: torch.Tensor | None = field(init=False, default=None, repr=False)

    def __post_init__(self):
        self.embedded = self.embedded_at != NEVER

    @property
    def device(self) -> torch.device:
        return self.a.device

    @classmethod
    def from_online(cls, state: OnlineState, device: torch.device) -> "DeviceState":
        def put(array, dtype):
            return torch.as_tensor(np.ascontiguousarray(array)).to(device=device, dtype=dtype)
        carried = {name: [np.asarray(row, dtype=np.uint8) for row in rows]
                   for name, rows in _carried_rows(state).items()}
        out = cls(layout=state.layout, settings=state.settings, warmup=state.warmup,
                  labels=put(state.labels, torch.int64), a=put(state.a, torch.float64), b=put(state.b, torch.float64),
                  first=put(state.first, torch.float32), references=state.references.copy(),
                  offset=state.offset.copy(), scale=state.scale.copy(), reference_index=state.reference_index.copy(),
                  mode_sizes=state.mode_sizes.copy(), mode_sse=state.mode_sse_least_squares.copy(),
                  sq_norm=state.sq_norm, sq_displacement=state.sq_displacement, sq_centred=state.sq_centred,
                  time=list(state.time), names=list(state.names), infos=list(state.infos), carried=carried,
                  attachments=dict(state.attachments),
                  embedded_at=torch.full((state.layout.n_parameters,), NEVER, dtype=torch.int32, device=device),
                  snapshot_a=torch.zeros(0, dtype=torch.float64, device=device),
                  snapshot_b=torch.zeros(0, dtype=torch.float64, device=device))
        out.snapshot_a, out.snapshot_b = out.raw_fit()
        return out

    def observe(self, w, name: str, time: int, info: CheckpointInfo, carried: dict[str, np.ndarray]) -> None:
        """Absorb one observation: ``w`` is the (N,) observation (float32, on the device, laid out as
        ``self.layout``) or the modelled tensors' flat values in layout order (views of the model's
        own tensors: nothing is concatenated).

        ``decompose.update_parameters`` ported to torch and written in place: the same recursive
        least squares (``e = w − aρ − b``, ``[a b] += e · x G_new⁻¹``, then re-expressed against the
        renormalised references), with the per-mode factors of ``decompose.update_frame``, in the same
        order of operations. On the CPU it runs over blocks of ``CHUNK`` columns, so that its three
        float64 work buffers stay in the cache and each parameter's state is read and written once.
        Frozen (embedded) fits get ``e = 0``."""
        pieces = [w] if isinstance(w, torch.Tensor) else list(w)
        T, M, device = self.T, self.M, self.device
        frame = update_frame(self.references, self.offset, self.scale, self._reference_values(pieces))
        factors = torch.from_numpy(np.stack([frame.rho, frame.gain_a, frame.gain_b, frame.shift, frame.ratio]))
        rho, gain_a, gain_b, shift, ratio = factors.to(device)
        size = min(CHUNK if device.type == "cpu" else self.labels.numel(), self.labels.numel())
        if self._work is None or self._work[0].numel() != size:
            self._work = [torch.empty(size, dtype=torch.float64, device=device) for _ in range(3)]
        x, y, z = self._work
        on_cpu = device.type == "cpu"
        keep = np.empty(size, dtype=bool) if on_cpu else None
        # Σ e² per mode. On the CPU into LANES accumulators per mode, column c into lane c % LANES: most
        # parameters are often in one mode, and index_add_ into one address is a chain of dependent adds.
        lanes = LANES if on_cpu else 1
        if on_cpu:
            lane = torch.arange(size, device=device).remainder_(LANES)
            into = torch.empty(size, dtype=torch.int64, device=device)
        squares = torch.zeros(M * lanes, dtype=torch.float64, device=device)
        sums = []   # (‖w‖², ‖w − w₀‖², ‖w − b‖²) per block
        masked = self._masked_blocks(size)
        for k, (lo, hi, segments) in enumerate(self._blocks(pieces, size)):
            n = hi - lo
            xv, yv, zv = x[:n], y[:n], z[:n]
            a, b, labels = self.a[lo:hi], self.b[lo:hi], self.labels[lo:hi]
            for piece, start, stop, at in segments:
                values = pieces[piece][start:stop]
                xv[at:at + stop - start].copy_(values if values.dtype != torch.float64 else values.float())
            torch.sub(xv, yv.copy_(self.first[lo:hi]), out=yv)  # float64 by float64: mixed dtypes are slow
            s_disp = torch.dot(yv, yv)
            torch.sub(xv, b, out=yv)                 # b is each parameter's mean over the T observations
            sums.append((torch.dot(xv, xv), s_disp, torch.dot(yv, yv)))
            torch.mul(a, torch.index_select(rho, 0, labels, out=zv), out=yv)
            torch.sub(xv, yv, out=xv).sub_(b)        # e = w − aρ − b, the prediction error
            if masked[k] and on_cpu:  # times the free mask: masked_fill_ branches per value,
                free = np.logical_not(self.embedded[lo:hi].numpy(), out=keep[:n])   # 4× slower on a random mask
                np.multiply(xv.numpy(), free, out=xv.numpy())
            elif masked[k]:
                xv.masked_fill_(self.embedded[lo:hi], 0.0)
            where = torch.add(lane[:n], labels, alpha=LANES, out=into[:n]) if on_cpu else labels
            squares.index_add_(0, where, torch.mul(xv, xv, out=yv))
            a.addcmul_(xv, torch.index_select(gain_a, 0, labels, out=zv))
            b.addcmul_(xv, torch.index_select(gain_b, 0, labels, out=zv))
            b.addcmul_(a, torch.index_select(shift, 0, labels, out=zv))
            a.mul_(torch.index_select(ratio, 0, labels, out=zv))
        totals = torch.stack([torch.stack(s) for s in sums]).sum(0).tolist()
        self.sq_norm += totals[0]
        self.sq_displacement += totals[1]
        self.sq_centred += totals[2] * T / (T + 1)   # Welford
        squares = squares.view(M, lanes).sum(1).cpu().numpy()
        self.mode_sse += squares / frame.sse_weight   # the error grows by e² / (1 + x G⁻¹ xᵀ)
        self.references, self.offset, self.scale = frame.references, frame.offset, frame.scale
        self.time.append(int(time))
        self.names.append(name)
        self.infos.append(info)
        for key, rows in self.carried.items():
            rows.append(np.asarray(carried[key], dtype=np.uint8))

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
        for lo, hi, scale, offset in self._raw_blocks():
            a, b = a_raw[lo:hi], b_raw[lo:hi]
            torch.div(self.a[lo:hi], scale, out=a)
            torch.sub(self.b[lo:hi], torch.mul(offset, a, out=b), out=b)
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
        CPU, kthvalue elsewhere; topk of a million out of ten took seconds and breaks ties arbitrarily)."""
        candidates = embeddable & ~embedded
        columns = np.flatnonzero(candidates) if xp is np else torch.nonzero(candidates).reshape(-1)  # sorted
        free = int(columns.shape[0])
        total = int(np.count_nonzero(embeddable)) if xp is np else int(embeddable.sum())
        count = min(free, math.ceil((free if relative else total) * percent / 100))
        if count == 0:
            return 0
        change = change[columns]
        if xp is np:
            threshold = np.partition(change, count - 1)[count - 1]
        else:
            threshold = torch.kthvalue(change, count).values
        below = columns[change < threshold]
        chosen = xp.concatenate([below, columns[change == threshold][:count - below.shape[0]]])
        embedded_at[chosen] = self.T - 1
        embedded[chosen] = True
        self._masked = None
        return count

    def _raw_blocks_into(self, work):
        """``raw_fit`` block by block into the two work buffers: yields ``(lo, hi, a_raw, b_raw)``."""
        for lo, hi, scale, offset in self._raw_blocks():
            a, b = work[0][:hi - lo], work[1][:hi - lo]
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
            first=self.first.cpu().numpy(), references=self.references, offset=self.offset, scale=self.scale,
            reference_index=self.reference_index, time=list(self.time), names=list(self.names),
            infos=list(self.infos), mode_sizes=self.mode_sizes, settings=self.settings, warmup=self.warmup,
            mode_sse_least_squares=self.mode_sse.copy(), sq_norm=self.sq_norm, sq_displacement=self.sq_displacement,
            sq_centred=self.sq_centred, attachments=dict(self.attachments),
            carried_before={k: np.stack(v[:1]) for k, v in self.carried.items()},
            carried_new={k: list(v[1:]) for k, v in self.carried.items()})

    # -- resuming: plain tensors, numbers and strings only (torch.load(weights_only=True) reads them)

    def state_dict(self) -> dict:
        return dict(
            layout=self.layout.to_json(), settings=self.settings.to_json(), warmup=self.warmup, labels=self.labels,
            a=self.a, b=self.b, first=self.first, references=torch.from_numpy(self.references.copy()),
            offset=torch.from_numpy(self.offset.copy()), scale=torch.from_numpy(self.scale.copy()),
            reference_index=torch.from_numpy(self.reference_index.copy()),
            mode_sizes=torch.from_numpy(np.asarray(self.mode_sizes).copy()),
            mode_sse=torch.from_numpy(self.mode_sse.copy()),
            sq_norm=self.sq_norm, sq_displacement=self.sq_displacement, sq_centred=self.sq_centred,
            time=list(self.time), names=list(self.names), infos=[i.to_json() for i in self.infos],
            carried={k: torch.from_numpy(np.stack(v)) for k, v in self.carried.items()},
            attachments={k: torch.frombuffer(bytearray(v), dtype=torch.uint8) for k, v in self.attachments.items()},
            embedded_at=self.embedded_at, snapshot_a=self.snapshot_a, snapshot_b=self.snapshot_b)

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device) -> "DeviceState":
        try:
            def dev(key, dtype):
                return state[key].to(device=device, dtype=dtype)
            return cls(
                layout=Layout.from_json(state["layout"]), settings=FitSettings.from_json(state["settings"]),
                warmup=int(state["warmup"]),
                labels=dev("labels", torch.int64), a=dev("a", torch.float64), b=dev("b", torch.float64),
                first=dev("first", torch.float32), references=state["references"].numpy().copy(),
                offset=state["offset"].numpy().copy(), scale=state["scale"].numpy().copy(),
                reference_index=state["reference_index"].numpy().copy(), mode_sizes=state["mode_sizes"].numpy().copy(),
                mode_sse=state["mode_sse"].numpy().copy(), sq_norm=float(state["sq_norm"]),
                sq_displacement=float(state["sq_displacement"]), sq_centred=float(state["sq_centred"]),
                time=[int(t) for t in state["time"]], names=list(state["names"]),
                infos=[CheckpointInfo.from_json(s) for s in state["infos"]],
                carried={k: list(v.numpy()) for k, v in state["carried"].items()},
                attachments={k: v.numpy().tobytes() for k, v in state["attachments"].items()},
                embedded_at=dev("embedded_at", torch.int32), snapshot_a=dev("snapshot_a", torch.float64),
                snapshot_b=dev("snapshot_b", torch.float64))
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            raise CmdError(f"the saved CMD state is incomplete or corrupt ({type(e).__name__}: {e})") from None


def _carried_rows(state: OnlineState) -> dict[str, list[np.ndarray]]:
    """Every carried tensor's rows of an online state held in memory (a warm-up's), per checkpoint."""
    out = {}
    for name, before in state.carried_before.items():
        blocks = before.blocks() if hasattr(before, "blocks") else [before]
        out[name] = [row for block in blocks for row in np.asarray(block)] + list(state.carried_new[name])
    return out


def count_true(mask: torch.Tensor) -> int:
    """The number of True in a bool tensor (numpy on the CPU: torch's sum of bools is 100× slower there)."""
    return int(np.count_nonzero(mask.numpy())) if mask.device.type == "cpu" else int(mask.sum())


def nonzero(mask: torch.Tensor) -> torch.Tensor:
    """The positions of True in a 1-D bool tensor, sorted, int64 (numpy on the CPU: 4× faster there)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask).reshape(-1)
