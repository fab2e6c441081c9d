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
from ..modes import FitSettings
from ..online.state import OnlineState

NEVER = -1  # embedded_at of a parameter that was never embedded


@dataclass
class DeviceState:
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
    _labels32: np.ndarray | None = field(init=False, default=None, repr=False)
    _work: list | None = field(init=False, default=None, repr=False)

    def __post_init__(self):
        self.embedded = self.embedded_at != NEVER

    @property
    def T(self) -> int:
        return self.references.shape[1]

    @property
    def M(self) -> int:
        return self.references.shape[0]

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

    def per_parameter(self, per_mode: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """``per_mode[labels]`` as an (N,) float64 tensor on the device (into ``out``)."""
        if self.device.type == "cpu" and self._labels32 is None:
            self._labels32 = self.labels.numpy().astype(np.int32)
        return gather(per_mode, self.labels, self._labels32, out)

    def observe(self, w: torch.Tensor, name: str, time: int, info: CheckpointInfo,
                carried: dict[str, np.ndarray]) -> None:
        """Absorb one observation: ``w`` (N,) float32 on the device, laid out as ``self.layout``.

        ``decompose.update_fit`` ported to torch and written in place, with three (N,) float64
        work buffers kept between observations: the same recursive least squares (``e = w − aρ − b``,
        ``[a b] += e · x G_new⁻¹``, then re-expressed against the renormalised references), with the
        per-mode factors of ``decompose.update_frame``. Frozen (embedded) fits get ``e = 0``."""
        T = self.T
        if self._work is None:
            self._work = [torch.empty(self.labels.shape, dtype=torch.float64, device=self.device) for _ in range(3)]
        w64, e, factor = self._work
        w64.copy_(w)
        frame = update_frame(self.references, self.offset, self.scale,
                             w64[torch.as_tensor(self.reference_index, device=self.device)].cpu().numpy())
        torch.sub(w64, e.copy_(self.first), out=e)  # float64 by float64: mixed dtypes take a slow path
        self.sq_displacement += float(torch.dot(e, e))
        torch.sub(w64, self.b, out=e)               # b is each parameter's mean over the T observations
        self.sq_centred += float(torch.dot(e, e)) * T / (T + 1)   # Welford
        self.sq_norm += float(torch.dot(w64, w64))
        torch.mul(self.a, self.per_parameter(frame.rho, factor), out=e)
        torch.sub(w64, e, out=e).sub_(self.b)       # e = w − aρ − b, the prediction error
        if bool(self.embedded.any()):
            e.masked_fill_(self.embedded, 0.0)
        torch.mul(e, e, out=w64)
        squares = torch.zeros(self.M, dtype=torch.float64, device=self.device).index_add_(0, self.labels, w64)
        self.mode_sse += squares.cpu().numpy() / frame.sse_weight   # the error grows by e² / (1 + x G⁻¹ xᵀ)
        self.a.addcmul_(e, self.per_parameter(frame.gain_a, factor))
        self.b.addcmul_(e, self.per_parameter(frame.gain_b, factor))
        self.b.addcmul_(self.a, self.per_parameter(frame.shift, factor))
        self.a.mul_(self.per_parameter(frame.ratio, factor))
        self.references, self.offset, self.scale = frame.references, frame.offset, frame.scale
        self.time.append(int(time))
        self.names.append(name)
        self.infos.append(info)
        for key, rows in self.carried.items():
            rows.append(np.asarray(carried[key], dtype=np.uint8))

    def raw_fit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``a, b`` against the raw reference (``w ≈ a · r + b``), the frame the authors measure
        the change of a fit in."""
        scale = self.per_parameter(self.scale)
        a = torch.div(self.a, scale, out=scale)
        b = self.per_parameter(self.offset).mul_(a)
        return a, torch.sub(self.b, b, out=b)

    def embed(self, percent: float, relative: bool, embeddable: torch.Tensor) -> int:
        """One window of embedded CMD: freeze the ``percent`` % of the embeddable, not yet embedded
        parameters (of all embeddable ones when not ``relative``) whose raw ``(a, b)`` changed least,
        by ``sqrt(Δa² + Δb²)``, since the previous window. Returns how many were embedded."""
        a, b = self.raw_fit()
        change = self.snapshot_a.sub_(a).square_()   # Δa² + Δb², in the old snapshot's memory; the
        change.add_(self.snapshot_b.sub_(b).square_())  # square root would not change the order
        self.snapshot_a, self.snapshot_b = a, b
        candidates = embeddable & ~self.embedded
        free = int(candidates.sum())
        count = min(free, math.ceil((free if relative else int(embeddable.sum())) * percent / 100))
        if count == 0:
            return 0
        change.masked_fill_(~candidates, math.inf)
        # The count smallest: all below the count-th value, then ties at it in column order (kthvalue
        # selects in linear time; topk of a million out of ten took seconds and breaks ties arbitrarily).
        threshold = torch.kthvalue(change, count).values
        below = torch.nonzero(change < threshold).reshape(-1)
        ties = torch.nonzero(change == threshold).reshape(-1)[:count - below.numel()]
        chosen = torch.cat([below, ties])
        self.embedded_at[chosen] = self.T - 1
        self.embedded[chosen] = True
        return count

    def values(self) -> torch.Tensor:
        """The CMD weights at the latest observation, ``a · r̃(T) + b``, float64 (N,) on the device."""
        return self.a * self.per_parameter(self.references[:, -1]) + self.b

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


def gather(per_mode, labels: torch.Tensor, labels32: np.ndarray | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``per_mode[labels]``, float64, on the labels' device (into ``out``). On the CPU through
    ``np.take`` with the int32 copy ``labels32``, several times faster than torch's gather there."""
    if labels.device.type == "cpu":
        out = out if out is not None else torch.empty(labels.shape, dtype=torch.float64)
        per_mode = per_mode.numpy() if isinstance(per_mode, torch.Tensor) else np.asarray(per_mode, dtype=np.float64)
        # mode="clip": with the default "raise" numpy buffers ``out``, five times slower
        np.take(per_mode, labels32 if labels32 is not None else labels.numpy(), out=out.numpy(), mode="clip")
        return out
    values = torch.as_tensor(per_mode, dtype=torch.float64, device=labels.device)
    return torch.index_select(values, 0, labels, out=out) if out is not None else values[labels]
