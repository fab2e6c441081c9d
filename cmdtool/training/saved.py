"""Resuming a training run: the ``DeviceState`` as plain tensors, numbers and strings, and back."""

from __future__ import annotations

import numpy as np
import torch

from ..checkpoints import CheckpointInfo
from ..errors import CmdError
from ..layout import Layout
from ..modes import FitSettings
from .state import DeviceState


def save_state(state: DeviceState) -> dict:
    """The state as plain tensors, numbers and strings (``torch.load(weights_only=True)`` reads it): a
    copy, which training does not change afterwards (an asynchronous checkpoint writer may hold it)."""
    return dict(
        layout=state.layout.to_json(), settings=state.settings.to_json(), warmup=state.warmup,
        labels=state.labels.clone(), a=state.a.clone(), b=state.b.clone(), first=state.first.float(),
        references=torch.from_numpy(state.references.copy()),
        offset=torch.from_numpy(state.offset.copy()), scale=torch.from_numpy(state.scale.copy()),
        reference_index=torch.from_numpy(state.reference_index.copy()),
        mode_sizes=torch.from_numpy(np.asarray(state.mode_sizes).copy()),
        mode_sse=torch.from_numpy(state.mode_sse.copy()),
        sq_norm=state.sq_norm, sq_displacement=state.sq_displacement, sq_centred=state.sq_centred,
        time=list(state.time), names=list(state.names), infos=[i.to_json() for i in state.infos],
        carried={k: torch.from_numpy(np.stack(v)) for k, v in state.carried.items()},
        attachments={k: torch.frombuffer(bytearray(v), dtype=torch.uint8) for k, v in state.attachments.items()},
        embedded_at=state.embedded_at.clone(), snapshot_a=state.snapshot_a.clone(),
        snapshot_b=state.snapshot_b.clone(), frozen_a=state.frozen_a.clone(), frozen_b=state.frozen_b.clone())

def load_state(state: dict, device: torch.device) -> DeviceState:
    """``save_state``'s dict back on ``device``; sizes, ranges and values are checked (it is read from
    a file, and ``step()`` writes the frozen fits into the model at once)."""
    try:
        _check_values(state)
        def dev(key, dtype):  # contiguous: torch.save keeps a view's strides, which would slow every update
            return state[key].to(device=device, dtype=dtype).contiguous()
        return DeviceState(
            layout=Layout.from_json(state["layout"]), settings=FitSettings.from_json(state["settings"]),
            warmup=int(state["warmup"]),
            labels=dev("labels", torch.int64), a=dev("a", torch.float64), b=dev("b", torch.float64),
            first=dev("first", torch.float64), references=state["references"].numpy().copy(),
            offset=state["offset"].numpy().copy(), scale=state["scale"].numpy().copy(),
            reference_index=state["reference_index"].numpy().copy(), mode_sizes=state["mode_sizes"].numpy().copy(),
            mode_sse=state["mode_sse"].numpy().copy(), sq_norm=float(state["sq_norm"]),
            sq_displacement=float(state["sq_displacement"]), sq_centred=float(state["sq_centred"]),
            time=[int(t) for t in state["time"]], names=list(state["names"]),
            infos=[CheckpointInfo.from_json(s) for s in state["infos"]],
            carried={k: list(v.numpy()) for k, v in state["carried"].items()},
            attachments={k: v.numpy().tobytes() for k, v in state["attachments"].items()},
            embedded_at=dev("embedded_at", torch.int32), snapshot_a=dev("snapshot_a", torch.float64),
            snapshot_b=dev("snapshot_b", torch.float64),
            # states saved before the frozen fits were kept: made from a, b (the same up to rounding)
            frozen_a=dev("frozen_a", torch.float64) if "frozen_a" in state else None,
            frozen_b=dev("frozen_b", torch.float64) if "frozen_b" in state else None)
    except (KeyError, AttributeError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CmdError(f"the saved CMD state is incomplete or corrupt ({type(e).__name__}: {e})") from None


def _check_values(state: dict) -> None:
    """Finite fits and references, positive scales, integer labels and indices (sizes: ``DeviceState``)."""
    wrong = [k for k in ("a", "b", "frozen_a", "frozen_b", "references", "offset", "scale", "first")
             if k in state and not bool(torch.isfinite(torch.as_tensor(state[k])).all())]
    wrong = [f"{k} holds NaN or Inf values" for k in wrong]
    if "scale" in state and not bool((torch.as_tensor(state["scale"]) > 0).all()):
        wrong.append("a reference scale is not positive")
    integers = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    wrong += [f"{k} is {state[k].dtype}, not integers" for k in ("labels", "reference_index", "embedded_at")
              if torch.as_tensor(state[k]).dtype not in integers]
    if wrong:
        raise ValueError("; ".join(wrong))
