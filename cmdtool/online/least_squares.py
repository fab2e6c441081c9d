"""The online update of CMD (paper §3.3) on arrays: recursive least squares of every parameter's
``a, b`` against its mode's reference as one more checkpoint arrives.

``update_fit`` states it; ``update_frame`` (per mode) and ``update_parameters`` (per parameter, in
place) are its two halves, and ``update_parameters`` is the one update every online fit runs:
``cmd fit --warmup`` and the estimator on numpy arrays of every parameter (``state.OnlineState``),
``cmd update`` and ``cmd watch`` on numpy arrays a column tile at a time (``update.py``, the sums
carried from tile to tile in ``RunningSums``), ``OnlineCMD`` and ``EmbeddedCMD`` on torch tensors
on the model's device (``cmdtool.training``).
Pure functions: no files, no printing; torch is imported only when given torch tensors.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np


class OnlineUpdate(NamedTuple):
    a: np.ndarray           # (n,) float64 slope against the new normalised reference
    b: np.ndarray           # (n,) float64 intercept
    references: np.ndarray  # (M, T + 1) float64, normalised over the T + 1 checkpoints
    offset: np.ndarray      # (M,) new mean of the raw reference
    scale: np.ndarray       # (M,) new norm of the centred raw reference
    mode_sse: np.ndarray    # (M,) increase of each mode's least-squares error, summed over time


class FrameUpdate(NamedTuple):
    """The per-mode part of one online update (``update_frame``): ``(M,)`` float64 each, plus the
    renormalised references."""
    rho: np.ndarray         # the new point in the old normalised frame
    gain_a: np.ndarray      # x G_new⁻¹, first and second entry
    gain_b: np.ndarray
    sse_weight: np.ndarray  # 1 / (1 + x G⁻¹ xᵀ) is 1 / sse_weight
    ratio: np.ndarray       # scale_new / scale
    shift: np.ndarray       # (offset_new − offset) / scale
    references: np.ndarray  # (M, T + 1) normalised over the T + 1 checkpoints
    offset: np.ndarray
    scale: np.ndarray


def update_frame(references: np.ndarray, offset: np.ndarray, scale: np.ndarray,
                 reference_values: np.ndarray) -> FrameUpdate:
    """The ``O(M · T)`` half of ``update_fit``: where the new point lies in the old frame, the gains
    of the recursive least squares, and the renormalised references (see ``update_fit``)."""
    M, T = references.shape
    reference_values = np.asarray(reference_values, dtype=np.float64)
    rho = (reference_values - offset) / scale           # (M,) the new point in the old frame
    det = T + 1 + T * rho ** 2                          # det G_new, G_new = [[1 + ρ², ρ], [ρ, T + 1]]
    # Renormalise over T + 1 points: r̃_new = (scale · r̃ + offset − offset_new) / scale_new.
    # The mean moves by deviation / (T + 1); that difference is used as such, never as
    # offset_new − offset, whose rounding (1e-16 of the offset) is large against a small scale.
    deviation = reference_values - offset
    moved = deviation / (T + 1)
    new_scale = np.sqrt(scale ** 2 + deviation ** 2 * T / (T + 1))
    raw_shifted = np.column_stack([scale[:, None] * references, deviation]) - moved[:, None]
    return FrameUpdate(rho, T * rho / det, 1.0 / det, 1.0 + rho ** 2 + 1.0 / T, new_scale / scale, moved / scale,
                       raw_shifted / new_scale[:, None], offset + moved, new_scale)


class ObservationSums(NamedTuple):
    """What one observation adds to the error sums of an online fit (``update_parameters``)."""
    mode_sse: np.ndarray    # (M,) to each mode's least-squares error
    sq_norm: float          # Σ w²
    sq_displacement: float  # Σ (w − w(0))² (0 without the first observation)
    sq_centred: float       # to Σ (w − mean w)² over all observations: Σ (w − b)² · T / (T + 1) (Welford)


BLOCK = 1 << 16  # columns per block of update_parameters: its four float64 work buffers stay in the CPU cache


class RunningSums(NamedTuple):
    """The sums ``update_parameters`` adds up block by block for one observation, carried from one
    call to the next when the columns come in ranges (``cmd update`` streams them tile by tile)."""
    squares: object   # (M · lanes,) float64 Σ e² per lane of each mode, numpy or torch where ``a`` lives
    blocks: tuple     # three lists of 0-d sums per block: Σ w², Σ (w − w(0))², Σ (w − b)²


def running_sums(like, modes: int, lanes: int = 1) -> RunningSums:
    """Empty ``RunningSums`` for ``modes`` modes, on the device (or numpy) of the array ``like``."""
    return RunningSums(_operations(like).zeros(modes * lanes, like), ([], [], []))


def update_parameters(a, b, first, index, w, frame: FrameUpdate, frozen=None, lanes: int = 1,
                      block: int = BLOCK, running: RunningSums | None = None) -> ObservationSums:
    """The ``O(N)`` half of ``update_fit``, in place: ``a, b`` move to the new frame, and the sums
    of squares the metrics need are returned. The one update of online CMD: ``cmd update``, ``cmd
    watch`` and ``cmd fit --warmup`` run it on numpy arrays, ``OnlineCMD`` and ``EmbeddedCMD`` on
    torch tensors on the model's device (the same operations, in the same order).

    With ``y = w − b`` (``b`` is each parameter's mean) and ``ρ`` the new point in the old frame, the
    prediction error is ``e = y − aρ``; the mode's least-squares error grows by ``e² / (1 + ρ² +
    1/T)``, and the fit over the ``T + 1`` points, re-expressed against the renormalised references,
    is ``a ← (a + ρ·T/(T+1)·y) / ratio``, ``b ← b + y/(T+1)`` (algebraically ``[a b] += e · x G_new⁻¹``
    of ``update_fit`` followed by the change of frame). ``frozen`` (bool, optional) marks fits that
    are frozen (embedded CMD, §3.4): their error counts as 0 (``y − e``, i.e. ``aρ``, in place of
    ``y``), so they are only re-expressed in the new frame and stay the same function of the raw
    reference.

    Args:
        a, b: (N,) float64, updated in place.
        first: (N,) the first observation, for ``sq_displacement``, or None.
        index: (N,) integers: each parameter's mode times ``lanes`` plus a lane (``lanes`` partial
            sums per mode shorten the dependent chain of adding into one accumulator).
        w: the new observation as 1-D pieces in column order (views of a model's tensors: nothing is
            concatenated), together N values, read exactly as they are.
        frame: ``update_frame`` of the references and the new reference values.
        block: columns per pass: the work buffers of a block stay in the cache, and each parameter's
            state is read and written once.
        running: the sums of the earlier calls for this observation, on the columns before these
            (``running_sums``; added to in place), or None for all columns in one call. The result
            covers every call so far: calls on consecutive ranges of a multiple of ``block`` columns
            each (the last one any length) return the sums of one call on all of them, bit for bit.
    """
    ops = _operations(a)
    xp, N, M = ops.xp, a.shape[0], len(frame.rho)
    T = frame.references.shape[1] - 1
    grow, mean_step = T / (T + 1), 1.0 / (T + 1)
    rho, shrink = (ops.table(np.repeat(np.asarray(v, dtype=np.float64), lanes), a)
                   for v in (frame.rho, 1.0 / frame.ratio))
    squares, sums = running if running is not None else running_sums(a, M, lanes)
    mask = None if frozen is None else ops.as_bytes(frozen)
    size = max(1, min(block, N))
    x, y, z, u = (ops.empty(size, a) for _ in range(4))
    for lo, hi, segments in _blocks([len(piece) for piece in w], size):
        n = hi - lo
        xv, yv, zv, uv = x[:n], y[:n], z[:n], u[:n]
        a_, b_, at = a[lo:hi], b[lo:hi], index[lo:hi]
        for piece, start, stop, to in segments:
            ops.copy(xv[to:to + stop - start], w[piece][start:stop])
        sums[0].append(xp.dot(xv, xv))
        if first is not None:
            xp.subtract(xv, first[lo:hi], out=uv)
            sums[1].append(xp.dot(uv, uv))
        xp.subtract(xv, b_, out=yv)                # y = w − b
        sums[2].append(xp.dot(yv, yv))
        ops.take(rho, at, zv)                      # ρ of each parameter's mode
        ops.sub_product(xv, yv, zv, a_)            # e = y − ρa, the prediction error
        if mask is not None:                       # frozen: e = 0 and y − e (times the mask: no branch per value)
            xp.multiply(xv, mask[lo:hi], out=uv)
            yv -= uv
            xv -= uv
        xp.multiply(xv, xv, out=xv)
        ops.add_at(squares, at, xv)
        ops.add_product(a_, yv, zv, grow, uv)      # a + ρ·T/(T+1)·y
        ops.take(shrink, at, zv)
        a_ *= zv                                   # ... / ratio
        ops.add_scaled(b_, yv, mean_step, uv)      # b ← b + y / (T + 1)
    return observation_sums(RunningSums(squares, sums), frame, lanes)


def observation_sums(running: RunningSums, frame: FrameUpdate, lanes: int = 1) -> ObservationSums:
    """What one observation adds to the error sums, from those ``update_parameters`` ran up over all
    its calls for it (``running``, with ``lanes`` per mode) in the frame ``frame``."""
    ops = _operations(running.squares)
    M, T = len(frame.rho), frame.references.shape[1] - 1
    squares = ops.to_numpy(running.squares)
    sq_norm, sq_displacement, sq_centred = (ops.total(v) for v in running.blocks)
    return ObservationSums(squares.reshape(M, lanes).sum(axis=1) / frame.sse_weight, sq_norm, sq_displacement,
                           sq_centred * T / (T + 1))


def _blocks(sizes: Sequence[int], size: int):
    """Per block of ``size`` columns ``(lo, hi, segments)``: the ``(piece, start, stop, at)`` parts of
    the pieces of ``sizes`` (in column order) that fill it, ``at`` the position in the block."""
    starts = [0, *np.cumsum(sizes, dtype=np.int64).tolist()]
    piece = 0
    for lo in range(0, starts[-1], size):
        hi, segments = min(lo + size, starts[-1]), []
        while piece < len(sizes) and starts[piece] < hi:
            begin, end = max(lo, starts[piece]), min(hi, starts[piece + 1])
            if end > begin:
                segments.append((piece, begin - starts[piece], end - starts[piece], begin - lo))
            if starts[piece + 1] > hi:
                break
            piece += 1
        yield lo, hi, segments


class _Operations(NamedTuple):
    """What ``update_parameters`` needs beyond the functions numpy and torch share (``subtract``,
    ``multiply``, ``dot``, in-place operators): torch has fused forms of three steps."""
    xp: object
    empty: Callable        # (n, like) -> float64 (n,) where ``like`` lives
    zeros: Callable
    table: Callable        # (numpy values, like) -> the same where ``like`` lives
    take: Callable         # (table, index, out): out = table[index]
    copy: Callable         # (destination, source)
    as_bytes: Callable     # a bool array as 0/1 bytes (multiplying by bools is slow in torch)
    sub_product: Callable  # (out, y, z, a): out = y − z·a
    add_product: Callable  # (target, y, z, value, scratch): target += value·y·z
    add_scaled: Callable   # (target, y, value, scratch): target += value·y
    add_at: Callable       # (sums, index, values): sums[index] += values, repeated indices adding up
    total: Callable        # a list of 0-d sums -> float
    to_numpy: Callable


def _numpy_sub_product(out, y, z, a):
    np.multiply(z, a, out=out)
    np.subtract(y, out, out=out)


def _numpy_add_product(target, y, z, value, scratch):
    np.multiply(y, z, out=scratch)
    scratch *= value
    target += scratch


def _numpy_add_scaled(target, y, value, scratch):
    np.multiply(y, value, out=scratch)
    target += scratch


def _numpy_add_at(sums, index, values):
    sums += np.bincount(index, weights=values, minlength=len(sums))  # np.add.at is 10× slower


def _operations(like) -> _Operations:
    """numpy's or torch's (imported only for torch tensors: ``cmd update`` runs without torch)."""
    if isinstance(like, np.ndarray):
        return _Operations(np, lambda n, _: np.empty(n), lambda n, _: np.zeros(n), lambda v, _: v,
                           lambda table, index, out: np.take(table, index, out=out, mode="clip"), np.copyto,
                           lambda mask: mask.view(np.uint8), _numpy_sub_product, _numpy_add_product,
                           _numpy_add_scaled, _numpy_add_at, lambda sums: float(np.sum(sums)), np.asarray)
    import torch
    return _Operations(
        torch, lambda n, like: torch.empty(n, dtype=torch.float64, device=like.device),
        lambda n, like: torch.zeros(n, dtype=torch.float64, device=like.device),
        lambda v, like: torch.from_numpy(v).to(like.device),
        lambda table, index, out: torch.index_select(table, 0, index, out=out), lambda out, v: out.copy_(v),
        lambda mask: mask.view(torch.uint8), lambda out, y, z, a: torch.addcmul(y, z, a, value=-1.0, out=out),
        lambda target, y, z, value, _: target.addcmul_(y, z, value=value),
        lambda target, y, value, _: target.add_(y, alpha=value),
        lambda sums, index, values: sums.index_add_(0, index, values),  # deterministic on CUDA too (bincount is not)
        lambda sums: float(torch.stack(sums).sum()) if sums else 0.0, lambda v: v.cpu().numpy())


def update_fit(a: np.ndarray, b: np.ndarray, labels: np.ndarray, w: np.ndarray, references: np.ndarray,
               offset: np.ndarray, scale: np.ndarray, reference_values: np.ndarray) -> OnlineUpdate:
    """Online CMD (paper §3.3): absorb checkpoint ``T + 1`` into a fit of ``T`` checkpoints.

    Modes, labels and reference parameters stay fixed; ``w`` (n,) are the parameters' new values and
    ``reference_values`` (M,) the reference parameters' new values ``r_m(T + 1)``. In the old
    normalised frame ``x(t) = [r̃(t), 1]`` with ``r̃ = (r − offset) / scale``, so ``G = Σ xᵀx`` is
    ``[[1, 0], [0, T]]`` for every mode and ``[a b]`` is the state of the normal equations. The new
    point ``x = [ρ, 1]`` gives ``[a b]_new = ([a b] G + w x) G_new⁻¹ = [a b] + e · x G_new⁻¹`` with
    the prediction error ``e = w − aρ − b`` (recursive least squares: no cancellation, and the
    least-squares error grows by ``e² / (1 + x G⁻¹ xᵀ)``). The references are then renormalised over
    ``T + 1`` checkpoints (running mean and centred norm, exact in float64) and ``a, b`` re-expressed
    against them, so the stored frame keeps its precision when a reference barely moves.
    Two halves: ``update_frame`` (per mode) and ``update_parameters`` (per parameter, in place;
    here on copies of ``a, b``).
    """
    a, b = (np.array(v, dtype=np.float64) for v in (a, b))
    frame = update_frame(references, offset, scale, reference_values)
    sums = update_parameters(a, b, None, np.asarray(labels, dtype=np.int64), [np.asarray(w, dtype=np.float64)], frame)
    return OnlineUpdate(a, b, frame.references, frame.offset, frame.scale, sums.mode_sse)
