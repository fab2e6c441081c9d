"""Resuming a training run: the ``DeviceState`` as plain tensors, numbers and strings, and back."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch

from .._files import plain_name
from ..checkpoints import CheckpointInfo
from ..errors import CmdError
from ..layout import Layout
from ..modefile_checks import check_info, check_settings
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
    """``save_state``'s dict back on ``device``; kinds, sizes, ranges and values are checked first
    (``check_saved``: it is read from a file, and ``step()`` writes the frozen fits into the model at
    once). Every tensor is copied: two keys saved as one storage (``a`` and ``b``) stay two."""
    try:
        check_saved(state)

        def dev(key, dtype):  # contiguous: torch.save keeps a view's strides, which would slow every update
            return state[key].detach().to(device=device, dtype=dtype, copy=True).contiguous()

        def host(key):
            return state[key].detach().cpu().numpy().copy()

        return DeviceState(
            layout=Layout.from_json(state["layout"]), settings=FitSettings.from_json(state["settings"]),
            warmup=int(state["warmup"]),
            labels=dev("labels", torch.int64), a=dev("a", torch.float64), b=dev("b", torch.float64),
            first=dev("first", torch.float64), references=host("references").astype(np.float64),
            offset=host("offset").astype(np.float64), scale=host("scale").astype(np.float64),
            reference_index=host("reference_index").astype(np.int64), mode_sizes=host("mode_sizes").astype(np.int64),
            mode_sse=host("mode_sse").astype(np.float64), sq_norm=float(state["sq_norm"]),
            sq_displacement=float(state["sq_displacement"]), sq_centred=float(state["sq_centred"]),
            time=[int(t) for t in state["time"]], names=list(state["names"]),
            infos=[CheckpointInfo.from_json(s) for s in state["infos"]],
            carried={k: list(v.detach().cpu().numpy().copy()) for k, v in state["carried"].items()},
            attachments={k: v.detach().cpu().numpy().tobytes() for k, v in state["attachments"].items()},
            embedded_at=dev("embedded_at", torch.int32), snapshot_a=dev("snapshot_a", torch.float64),
            snapshot_b=dev("snapshot_b", torch.float64),
            # states saved before the frozen fits were kept: made from a, b (the same up to rounding)
            frozen_a=dev("frozen_a", torch.float64) if "frozen_a" in state else None,
            frozen_b=dev("frozen_b", torch.float64) if "frozen_b" in state else None)
    except (KeyError, AttributeError, TypeError, ValueError, IndexError, RuntimeError, OverflowError,
            RecursionError) as e:
        text = " ".join(str(e).split())[:300]
        raise CmdError(f"the saved CMD state is incomplete or corrupt ({type(e).__name__}: {text})") from None


_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# key -> (kind, dimensions, length: "N", "M", "T" or None) of the tensors of a saved state
_TENSORS = {"labels": ("integers", 1, "N"), "a": ("floats", 1, "N"), "b": ("floats", 1, "N"),
            "first": ("floats", 1, "N"), "embedded_at": ("integers", 1, "N"), "snapshot_a": ("floats", 1, "N"),
            "snapshot_b": ("floats", 1, "N"), "references": ("floats", 2, "M"), "offset": ("floats", 1, "M"),
            "scale": ("floats", 1, "M"), "reference_index": ("integers", 1, "M"), "mode_sizes": ("integers", 1, "M"),
            "mode_sse": ("floats", 1, "M"), "frozen_a": ("floats", 1, None), "frozen_b": ("floats", 1, None)}
_OPTIONAL = ("frozen_a", "frozen_b")
_SHA256 = re.compile(r"[0-9a-f]{64}")
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_saved(state: Any) -> None:
    """Refuse a saved state (``ValueError`` saying what is wrong) unless it is what ``save_state``
    writes: each key of its kind; the per-parameter tensors as long as the layout's N, and the
    layout checked against them before anything of its size is made (a layout may declare 2³³
    parameters); references ``(M, T)`` with ``T`` the observations (at least the warm-up ``F``,
    at least 2) and ``M`` rows of offset, scale, index, size and error; labels, indices and
    ``embedded_at`` in range (never a reference, never before the warm-up); ``mode_sizes`` counting
    the labels; finite, non-negative sums and errors; ``T`` plain, unique names with checkpoint
    infos the mode file reader accepts; carried rows and attachments of bytes."""
    if not isinstance(state, dict):
        raise ValueError(f"the state is {type(state).__name__}, not a dict")
    for key, (kind, dimensions, _) in _TENSORS.items():
        if key not in state and key in _OPTIONAL:
            continue
        value = state.get(key)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{key} is {type(value).__name__}, not a tensor" if key in state else f"no {key!r}")
        if value.layout != torch.strided or value.dim() != dimensions:
            raise ValueError(f"{key} is a {value.dim()}-dimensional {value.layout} tensor, expected {dimensions} "
                             "dimension(s)")
        if value.dtype not in (_INTEGERS if kind == "integers" else _FLOATS):
            raise ValueError(f"{key} is {value.dtype}, not {kind}")
    layout = _parsed(state, "layout", str, Layout.from_json)
    _parsed(state, "settings", dict, lambda data: (check_settings(data), FitSettings.from_json(data)))  # as read back
    N, (M, T) = layout.n_parameters, tuple(state["references"].shape)
    lengths = {"N": N, "M": M}
    wrong = [f"{key} has {state[key].numel()} values, not {lengths[length]} ({length})"
             for key, (_, _, length) in _TENSORS.items() if length and state[key].shape[0] != lengths[length]]
    if wrong:
        raise ValueError("; ".join(wrong))
    for key in ("time", "names", "infos"):
        if not isinstance(state.get(key), list) or len(state[key]) != T:
            shown = f"{len(state[key])} entries" if isinstance(state.get(key), list) else type(state.get(key)).__name__
            raise ValueError(f"{key} is {shown}, expected a list of the T = {T} observations")
    warmup = state.get("warmup")
    if not _integer(warmup) or not 2 <= warmup <= T or M < 1:
        raise ValueError(f"warmup {warmup!r} is not an integer from 2 to the T = {T} observations, or no modes")
    _check_names_and_times(state["names"], state["time"])
    _check_sums(state)
    labels = state["labels"].detach().to(torch.int64)
    if N and not (0 <= int(labels.min()) and int(labels.max()) < M):
        raise ValueError(f"labels range from {int(labels.min())} to {int(labels.max())}, outside 0..{M - 1}")
    index = state["reference_index"].detach().to(torch.int64)
    if N == 0 or not (0 <= int(index.min()) and int(index.max()) < N):
        raise ValueError("a reference index lies outside the parameters")
    if not torch.equal(torch.bincount(labels, minlength=M).cpu(), state["mode_sizes"].detach().to(torch.int64).cpu()):
        raise ValueError("mode_sizes do not count the labels")
    embedded_at = state["embedded_at"].detach().to(torch.int64)
    embedded = embedded_at != -1
    if bool(((embedded_at[embedded] < warmup) | (embedded_at[embedded] >= T)).any()):
        raise ValueError(f"embedded_at holds positions other than -1 and {warmup} … {T - 1}")
    if bool(embedded[index.to(embedded.device)].any()):
        raise ValueError("a reference parameter is embedded")
    _check_bytes(state, layout, T)


def _parsed(state: dict, key: str, kind: type, parse):
    if not isinstance(state.get(key), kind):
        raise ValueError(f"{key} is {type(state.get(key)).__name__}, not {kind.__name__}")
    return parse(state[key])


def _integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_sums(state: dict) -> None:
    """The sums of squares and the per-mode errors: finite numbers, not negative (a square root and
    a ratio are taken of them)."""
    for key in ("sq_norm", "sq_displacement", "sq_centred"):
        value = state.get(key)
        if not (_integer(value) or isinstance(value, (float, np.floating))):
            raise ValueError(f"{key} is {type(value).__name__}, not a number")
        try:
            finite = math.isfinite(float(value)) and float(value) >= 0
        except OverflowError:
            finite = False
        if not finite:
            raise ValueError(f"{key} is not a finite number of at least 0")
    wrong = [k for k in ("a", "b", "first", "references", "offset", "scale", "mode_sse", "snapshot_a", "snapshot_b",
                         *(k for k in _OPTIONAL if k in state))
             if not bool(torch.isfinite(state[k].detach()).all())]
    if wrong:
        raise ValueError("; ".join(f"{k} holds NaN or Inf values" for k in wrong))
    # weights are float32 and the mode file stores a, b, first and the references so: larger values
    # (a reference scale or offset of 1e308) overflow in the next update or in the file
    big = [k for k in ("a", "b", "first", "offset", "scale", "snapshot_a", "snapshot_b",
                       *(k for k in _OPTIONAL if k in state))
           if state[k].numel() and float(state[k].detach().abs().max()) > FLOAT32_MAX]
    if big:
        raise ValueError("; ".join(f"{k} holds values beyond float32" for k in big))
    if not bool((state["scale"].detach() > 0).all()):
        raise ValueError("a reference scale is not positive")
    references = state["references"].detach().double()
    if references.shape[1] and not (bool((references.mean(1).abs() <= 1e-6).all())
                                    and bool(((references.norm(dim=1) - 1).abs() <= 1e-6).all())):
        raise ValueError("the references are not normalised (zero mean, unit norm)")
    if bool((state["mode_sse"].detach() < 0).any()):
        raise ValueError("a mode's error is negative")
    if not math.isfinite(float(state["mode_sse"].detach().double().sum())):
        raise ValueError("the modes' errors sum beyond any float")


def _check_bytes(state: dict, layout: Layout, T: int) -> None:
    """Checkpoint infos as the mode-file reader checks them, carried rows ``(T, bytes)`` of every
    carried tensor, attachments as SHA-256 named byte arrays."""
    attachments, carried = state.get("attachments"), state.get("carried")
    if not isinstance(carried, dict):
        raise ValueError("carried and attachments must be dicts")
    _check_attachments(attachments)
    expected = {spec.name: spec.nbytes for spec in layout.carried}
    if set(carried) != set(expected):
        raise ValueError("the carried tensors are not those of the layout")
    for name, rows in carried.items():
        if not (isinstance(rows, torch.Tensor) and rows.dtype == torch.uint8
                and tuple(rows.shape) == (T, expected[name])):
            raise ValueError(f"carried tensor {name!r} is not {T} rows of {expected[name]} bytes")
    _check_infos(state["names"], state["infos"], layout, attachments)


def _check_attachments(attachments: Any) -> None:
    if not isinstance(attachments, dict):
        raise ValueError("carried and attachments must be dicts")
    for digest, data in attachments.items():
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest) and isinstance(data, torch.Tensor)
                and data.layout == torch.strided and data.dtype == torch.uint8 and data.dim() == 1):
            raise ValueError(f"attachment {str(digest)[:80]!r} is not a SHA-256 named byte array")


def _check_infos(names: list, infos: list, layout: Layout, attachments: dict) -> None:
    tensors = [spec.name for spec in layout.tensors]
    for name, text in zip(names, infos):
        if not isinstance(text, str):
            raise ValueError(f"checkpoint_info of {name!r} is not a string")
        check_info(CheckpointInfo.from_json(text), tensors, attachments, name)


def _check_names_and_times(names: list, times: list) -> None:
    if not all(_integer(t) and -2**63 <= t < 2**63 for t in times):
        raise ValueError("time holds a value that is not a 64-bit integer")
    for name in names:
        plain_name(name, "checkpoint name")
    if len(set(names)) != len(names):
        raise ValueError("checkpoint names are not unique")


def check_outer(saved: Any, expected: Layout, warmup: int) -> None:
    """Refuse (``ValueError`` saying what is wrong) the outer parts of ``EmbeddedCMD.state_dict()``
    unless they are what it writes, before anything of their size is made: ``version`` 1; the
    ``layout`` None (nothing observed yet) or ``expected``, the one the live model's tensors make
    (a stored one may declare 2³³ parameters), and the same as the inner state's; attachments of
    bytes; either a ``state`` (``check_saved`` checks it) or a ``warmup`` of fewer than ``warmup``
    observations: float32 rows of the layout's N finite values, increasing times, plain unique names,
    checkpoint infos the mode-file reader accepts and the carried tensors' bytes."""
    if not _integer(saved.get("version")) or saved["version"] != 1:
        raise ValueError(f"version {str(saved.get('version'))[:40]} is not 1")
    layout_text = saved.get("layout")
    if layout_text is not None and not isinstance(layout_text, str):
        raise ValueError(f"layout is {type(layout_text).__name__}, not str")
    layout = None if layout_text is None else Layout.from_json(layout_text)
    if layout is not None and layout != expected:
        raise ValueError("the layout is not the one of the model's tensors")
    _check_attachments(saved.get("attachments"))
    if ("state" in saved) == ("warmup" in saved):
        raise ValueError("it holds " + ("both a state and a warm-up" if "state" in saved else "neither a state nor "
                                                                                              "a warm-up"))
    if "state" in saved:
        if layout is None or not isinstance(saved["state"], dict) or saved["state"].get("layout") != layout_text:
            raise ValueError("the layout of the state is not the run's")
        return
    warm = saved["warmup"]
    if not isinstance(warm, dict) or set(warm) != {"rows", "time", "names", "infos", "carried"}:
        raise ValueError("the warm-up is not a dict of rows, time, names, infos and carried")
    lists = [warm[key] for key in ("rows", "time", "names", "infos")]
    if not all(isinstance(value, list) for value in lists) or len({len(value) for value in lists}) != 1:
        raise ValueError("the warm-up's rows, time, names and infos are not lists of one length")
    rows, times, names, infos = lists
    if len(rows) >= warmup or layout is None and rows:
        raise ValueError(f"the warm-up holds {len(rows)} observations, for a warm-up of {warmup}"
                         + (" and no layout" if layout is None else ""))
    N = 0 if layout is None else layout.n_parameters
    for row in rows:
        if not (isinstance(row, torch.Tensor) and row.layout == torch.strided and row.dtype == torch.float32
                and tuple(row.shape) == (N,)):
            raise ValueError(f"a warm-up row is not {N} float32 values (N)")
        if not bool(torch.isfinite(row.detach()).all()):
            raise ValueError("a warm-up row holds NaN or Inf values")
    _check_names_and_times(names, times)
    if any(later <= earlier for earlier, later in zip(times, times[1:])):
        raise ValueError("the warm-up's times do not increase")
    carried = warm["carried"]
    expected_bytes = {} if layout is None else {spec.name: spec.nbytes for spec in layout.carried}
    if not isinstance(carried, dict) or set(carried) != set(expected_bytes):
        raise ValueError("the warm-up's carried tensors are not those of the layout")
    for name, kept in carried.items():
        if not (isinstance(kept, list) and len(kept) == len(rows)
                and all(isinstance(r, torch.Tensor) and r.layout == torch.strided and r.dtype == torch.uint8
                        and tuple(r.shape) == (expected_bytes[name],) for r in kept)):
            raise ValueError(f"carried tensor {name!r} is not {len(rows)} rows of {expected_bytes[name]} bytes")
    if layout is not None:
        _check_infos(names, infos, layout, saved["attachments"])
