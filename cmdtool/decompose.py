"""Correlation Mode Decomposition (Brokman et al., ICLR 2024, post-hoc CMD, §3.2) on arrays.

Notation: ``T`` checkpoints, ``N`` modelled parameters, ``K`` sampled parameters, ``M`` modes.
A trajectory is one parameter's values over the ``T`` checkpoints. Every parameter ``i`` is
modelled as an affine copy of its mode's reference trajectory::

    w_i(t) ≈ a_i · r_{labels[i]}(t) + b_i

Steps (each a function below): 1 ``sample_parameters``, 2 ``correlation_matrix``,
3 ``cluster``, 4 ``choose_references``, then 5–6 ``fit_tile`` (assign and fit) streamed over column
tiles. References are normalised (``normalise_references``: zero mean, unit norm over time) and
``a, b`` are expressed against the normalised reference, so that float32 storage loses nothing
when a reference barely moves. Against a normalised reference the least-squares fit is simply
``a = <w − mean(w), r̃>`` and ``b = mean(w)``. Pure functions: no files, no printing.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


def _allocate(total: int, capacity: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Split ``total`` draws over bins in proportion to ``weight``, never above ``capacity``.

    Largest-remainder rounding; when a bin is full, what it cannot take is shared again among
    the others in proportion to their weights.
    """
    counts = np.zeros(len(capacity), dtype=np.int64)
    remaining = min(int(total), int(capacity.sum()))
    while remaining > 0:
        room = capacity - counts
        w = np.where(room > 0, weight, 0.0).astype(np.float64)
        quota = remaining * w / w.sum()
        floor = np.floor(quota).astype(np.int64)
        share = np.minimum(floor, room)
        if (floor <= room).all():  # no bin overflowed: round the rest by largest remainder
            order = np.argsort(-(quota - floor), kind="stable")
            order = order[share[order] < room[order]]
            share[order[:remaining - int(share.sum())]] += 1
        counts += share
        remaining -= int(share.sum())
    return counts


def sample_parameters(tensor_sizes: Sequence[int], varies: np.ndarray, K: int, seed: int) -> np.ndarray:
    """Step 1: choose ``K`` parameters, layer-balanced, never a constant one.

    Half of ``K`` is spread evenly over the tensors, the rest in proportion to their size (both
    capped by the number of non-constant parameters in each tensor). Returns sorted indices into
    ``0 .. N``; reproducible for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(tensor_sizes)]).astype(np.int64)
    tensors = [slice(offsets[j], offsets[j + 1]) for j in range(len(tensor_sizes))]
    capacity = np.array([np.count_nonzero(varies[s]) for s in tensors], dtype=np.int64)
    K = min(K, int(capacity.sum()))
    even = _allocate(K // 2, capacity, np.ones(len(capacity)))
    proportional = _allocate(K - int(even.sum()), capacity - even, capacity.astype(np.float64))
    chosen = []
    for s, size, n in zip(tensors, capacity, even + proportional):
        if n > 0:  # the n-th non-constant parameter of one tensor at a time
            positions = rng.choice(int(size), size=int(n), replace=False)
            if size < s.stop - s.start:  # skip the constant ones
                positions = _moving_at(varies[s], positions)
            chosen.append(positions + s.start)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _moving_at(varies: np.ndarray, positions: np.ndarray, block: int = 1 << 20) -> np.ndarray:
    """``np.flatnonzero(varies)[positions]`` (the ``positions``-th True of ``varies``), found a
    block at a time: memory is one block's indices, not 8 bytes for every value of the tensor
    (GPT-2's embedding alone is 38.6 M)."""
    counts = np.array([np.count_nonzero(varies[i:i + block]) for i in range(0, len(varies), block)], dtype=np.int64)
    ends = np.cumsum(counts)
    holder = np.searchsorted(ends, positions, side="right")  # the block holding each position
    out = np.empty(len(positions), dtype=np.int64)
    for b in np.unique(holder):
        mine = holder == b
        moving = np.flatnonzero(varies[b * block:(b + 1) * block])
        out[mine] = moving[positions[mine] - (ends[b] - counts[b])] + b * block
    return out


def correlation_matrix(trajectories: np.ndarray) -> np.ndarray:
    """Step 2: ``C = |pearson|`` between the columns of a ``(T, K)`` array; NaN (constant) -> 0."""
    X = trajectories.astype(np.float64)
    X = X - X.mean(axis=0)
    norms = np.linalg.norm(X, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        X = X / norms
    C = np.abs(X.T @ X)
    C = np.nan_to_num(C, nan=0.0)
    np.fill_diagonal(C, np.where(norms > 0, 1.0, 0.0))
    return np.clip(C, 0.0, 1.0)


def linkage_tree(C: np.ndarray) -> np.ndarray:
    """Step 3's hierarchy, which ``cluster`` cuts: scipy's complete linkage of the rows of ``C``
    (Euclidean, ``pdist``). scipy is imported here, not by ``import cmdtool`` (a third of a second)."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist

    return linkage(pdist(np.asarray(C, dtype=np.float64)), method="complete")


def cluster(C: np.ndarray, M: int, tree: np.ndarray | None = None) -> np.ndarray:
    """Step 3: complete-linkage clustering of the rows of ``C`` (Euclidean), cut into ``<= M`` modes
    (``fcluster(maxclust)`` of ``tree``, the caller's ``linkage_tree(C)`` if it has made it).

    Returns a mode label per sampled parameter, modes numbered by size, largest first (ties: the
    mode whose first member comes first).
    """
    K = C.shape[0]
    if K == 1 or M == 1:
        return np.zeros(K, dtype=np.int64)
    from scipy.cluster.hierarchy import fcluster

    raw = fcluster(linkage_tree(C) if tree is None else tree, t=M, criterion="maxclust")
    ids, first, sizes = np.unique(raw, return_index=True, return_counts=True)
    order = np.lexsort((first, -sizes))  # by size descending, then by first member
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids))
    return rank[np.searchsorted(ids, raw)]


def choose_references(C: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Step 4: per mode, the member with the largest mean ``|corr|`` to the other members.

    Returns positions into the sample, one per mode (a mode of one is its own reference).
    """
    references = []
    for m in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == m)
        if len(members) == 1:
            references.append(members[0])
            continue
        block = C[np.ix_(members, members)]
        mean_corr = (block.sum(axis=1) - np.diag(block)) / (len(members) - 1)
        references.append(members[int(np.argmax(mean_corr))])
    return np.array(references, dtype=np.int64)


class NormalisedReferences(NamedTuple):
    references: np.ndarray  # (M, T) float64, zero mean and unit norm over time
    offset: np.ndarray      # (M,) mean of the raw reference
    scale: np.ndarray       # (M,) norm of the centred raw reference: raw = references·scale + offset


def normalise_references(raw: np.ndarray) -> NormalisedReferences:
    """Zero-mean, unit-norm reference trajectories (raw ``(M, T)``, each non-constant)."""
    raw = raw.astype(np.float64)
    offset = raw.mean(axis=1)
    centred = raw - offset[:, None]
    scale = np.linalg.norm(centred, axis=1)
    return NormalisedReferences(centred / scale[:, None], offset, scale)


class TileFit(NamedTuple):
    labels: np.ndarray        # (n,) mode of each parameter
    a: np.ndarray             # (n,) float64 slope against the normalised reference
    b: np.ndarray             # (n,) float64 intercept
    sse: np.ndarray           # (n,) squared error of the fit, summed over time
    sq_norm: np.ndarray       # (n,) sum over time of w²
    sq_displacement: np.ndarray  # (n,) sum over time of (w(t) − w(0))²
    sq_centred: np.ndarray    # (n,) sum over time of (w − mean w)²


CHUNK_BYTES = 2 * 2**20  # float64 bytes of the (T, columns) slices fit_tile works on: cache-sized
MERGE_COLUMNS = 4096     # constant runs shorter than this inside a tile are computed, not skipped


def fit_tile(block, references: np.ndarray, varies: np.ndarray | None = None, stored: type = np.float64,
             labels_dtype: type = np.intp) -> TileFit:
    """Steps 5–6 for one ``(T, n)`` column block (see ``_fit_columns``), in slices of ``CHUNK_BYTES``
    so that the float64 copies stay in the CPU cache; columns are independent, so the result does
    not depend on the slicing. ``block`` is a float32 array, or any array-like whose column slices
    are (a 16-bit store's ``EncodedBlock``: each slice is widened as it is read, in the cache).
    ``varies`` (n,) marks the columns that move (known at ingest): runs of constant ones are not
    read past the first row and get what ``_fit_columns`` gives them, exactly.

    ``stored``: the dtype ``a, b`` are returned in; float32 (the mode file's) adds their rounding,
    ``(a − a32)² + T (b − b32)²``, to each ``sse``. ``labels_dtype``: the labels' (``label_dtype(M)``)."""
    T, n = block.shape
    out = TileFit(labels=np.zeros(n, dtype=labels_dtype), a=np.zeros(n, dtype=stored), b=np.empty(n, dtype=stored),
                  sse=np.zeros(n), sq_norm=np.empty(n), sq_displacement=np.zeros(n), sq_centred=np.zeros(n))
    runs = [(0, n)] if varies is None or n == 0 or varies.all() else varying_runs(varies, MERGE_COLUMNS)
    if runs != [(0, n)]:  # _fit_columns with y = 0, signs of zero included
        first = np.asarray(block[0], dtype=np.float64)
        out.b[:] = first + 0.0
        out.sq_norm[:] = 0.0 + first * (2.0 * 0.0 + T * first)
    weights = np.vstack([references, np.ones((1, T))])  # one product gives D and Σ y
    chunk = max(1, CHUNK_BYTES // (8 * T))
    scratch = np.empty((T, min(chunk, n)))
    for start, stop in runs:
        for first_column in range(start, stop, chunk):
            columns = slice(first_column, min(first_column + chunk, stop))
            _fit_columns(block[:, columns], weights, out, columns, scratch)
    return out


def varying_runs(varies: np.ndarray, gap: int = MERGE_COLUMNS) -> list[tuple[int, int]]:
    """``[start, stop)`` runs covering every True of ``varies``, runs closer than ``gap`` merged."""
    varies = np.asarray(varies)
    constant = np.flatnonzero(~varies)
    if len(constant) < gap:  # no gap between two moving columns can be skipped: one run, ends trimmed
        moving = np.flatnonzero(varies[:len(constant) + 1]), np.flatnonzero(varies[len(varies) - len(constant) - 1:])
        if len(moving[0]) == 0:
            return []
        return [(int(moving[0][0]), len(varies) - len(constant) - 1 + int(moving[1][-1]) + 1)]
    edges = np.flatnonzero(np.diff(np.concatenate([[False], varies, [False]]).astype(np.int8))).reshape(-1, 2)
    leads = np.concatenate([[len(edges) > 0], edges[1:, 0] - edges[:-1, 1] >= gap])[:len(edges)]  # starts a run
    ends = np.concatenate([leads[1:], [True]])[:len(edges)]  # ends one
    return list(zip(edges[leads, 0].tolist(), edges[ends, 1].tolist()))


def _fit_columns(block: np.ndarray, weights: np.ndarray, out: TileFit, columns: slice, scratch: np.ndarray) -> None:
    """Steps 5–6 for one ``(T, n)`` float32 column block, written into ``out[columns]``: assign each
    parameter to the reference it correlates with most in absolute value, and fit ``a, b`` by least
    squares over time. ``weights`` is ``[references; 1]``, ``scratch`` a ``(T, ≥ n)`` float64 buffer.

    ``references`` are normalised, so ``D = references @ (w − mean w)`` holds each parameter's
    correlation with each reference times ``‖w − mean w‖``: the argmax of ``|D|`` is the mode, and
    the chosen entry is ``a``. Constant parameters get ``a = 0``, ``b = value`` exactly.
    ``SSE = ‖w − mean w‖² (1 − ρ²) = ‖w − mean w‖² − a²``.

    Computed from the displacement ``y = w − w(0)`` (exact for float32 data in float64): since a
    normalised reference sums to zero, ``references @ y = D``, and one product with
    ``[references; 1]`` gives ``D`` and ``Σ y`` together; the other sums follow from ``Σ y`` and
    ``Σ y²`` (shifting by a data point keeps ``‖w − mean w‖² = Σ y² − (Σ y)²/T`` accurate).
    """
    T, n = block.shape
    y = scratch[:, :n]
    np.copyto(y, block)  # then in place: (T, n) displacement from the first checkpoint
    first = y[0].copy()
    np.subtract(y, first, out=y)
    product = weights @ y  # (M + 1, n)
    D, total = product[:-1], product[-1]
    sq_displacement = np.einsum("tn,tn->n", y, y)
    shift = total / T  # mean(w) − w(0)
    sq_centred = np.maximum(sq_displacement - total * shift, 0.0)
    _, a = _largest_magnitude(D, out.labels[columns])
    a[sq_displacement == 0] = 0.0  # constant: every y is 0 (no float32 difference squares to 0 in float64)
    b = first + shift  # constant: shift is exactly 0, so b is the value
    kept_a, kept_b = out.a[columns], out.b[columns]
    kept_a[:], kept_b[:] = a, b
    sse = np.maximum(sq_centred - a * a, 0.0)
    if out.a.dtype != np.float64:  # the error of what is kept: its rounding adds to the residual
        sse += (a - kept_a) ** 2
        sse += T * (b - kept_b) ** 2
    out.sse[columns] = sse
    out.sq_norm[columns] = sq_displacement + first * (2.0 * total + T * first)  # Σ (w(0) + y)²
    out.sq_displacement[columns] = sq_displacement
    out.sq_centred[columns] = sq_centred


def _largest_magnitude(D: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``D`` (M, n): the row of largest ``|D|`` (the first on ties, as ``argmax``)
    and that entry; the rows into ``labels`` when given (any integer dtype holding M − 1).

    A running maximum over the M rows, each step a few contiguous passes: ``argmax`` along axis 0
    walks each column with a stride of ``n`` and took 3–10× as long."""
    M, n = D.shape
    labels = np.zeros(n, dtype=np.intp) if labels is None else labels
    labels[:] = 0
    if M > 1:
        best, magnitude = np.abs(D[0]), np.empty(n)
        better, step = np.empty(n, dtype=np.uint8), np.empty(n, dtype=labels.dtype)
        for m in range(1, M):
            np.abs(D[m], out=magnitude)
            np.greater(magnitude, best, out=better.view(bool))
            np.maximum(best, magnitude, out=best)
            np.multiply(better, labels.dtype.type(m), out=step)  # m where row m is larger, else 0
            np.maximum(labels, step, out=labels)  # m grows, so a later larger row overrides
    return labels, np.take(D.ravel(), labels.astype(np.intp) * n + np.arange(n))


def label_dtype(M: int) -> np.dtype:
    """uint8 labels up to 256 modes, wider beyond."""
    return np.dtype(np.uint8 if M <= 256 else np.uint16 if M <= 65536 else np.uint32)


# Choosing M and refining the modes (not in the paper): pure functions on the sampled trajectories.

def heldout_error(held_out: np.ndarray, references: np.ndarray) -> float:
    """Relative error ``sqrt(Σ SSE / Σ ‖w − mean w‖²)`` of steps 5–6 on a ``(T, K')`` sample of
    parameters that took no part in finding the (normalised) ``references``: an out-of-sample
    estimate of the fit's ``rel_error_centred``."""
    fit = fit_tile(held_out, references)
    total = float(fit.sq_centred.sum())
    return float(np.sqrt(fit.sse.sum() / total)) if total > 0 else 0.0


def refine_references(trajectories: np.ndarray, C: np.ndarray, reference_positions: np.ndarray,
                      passes: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd-style passes over the sample that lower the least-squares error at the same ``M``.

    Each pass assigns every sampled parameter to the reference it correlates with most (step 5 on
    the sample), then re-picks each mode's reference as the member that explains its members best:
    the member ``j`` maximising ``Σ_i ‖w_i − mean w_i‖² ρ_ij²``, which minimises the mode's total
    squared error ``Σ_i ‖w_i − mean w_i‖² (1 − ρ_ij²)`` over the choices of reference (step 4 picks
    the largest mean ``|corr|`` instead). Stops early when no reference changes. Returns ``labels``
    of the sample and ``reference_positions``, modes numbered by size, largest first (ties: the
    mode whose first member comes first); a mode left without members is dropped.
    """
    X = trajectories.astype(np.float64)
    weight = ((X - X.mean(axis=0)) ** 2).sum(axis=0)   # ‖w_i − mean w_i‖²
    references = np.asarray(reference_positions, dtype=np.int64)
    labels = np.zeros(len(weight), dtype=np.int64)
    for _ in range(max(0, passes)):
        labels = np.argmax(C[:, references], axis=1)     # the first reference on ties, as step 5
        labels[references] = np.arange(len(references))  # a reference stays in its own mode
        chosen = []
        for m in range(len(references)):
            members = np.flatnonzero(labels == m)
            if len(members) == 0:
                continue
            explained = (weight[members, None] * C[np.ix_(members, members)] ** 2).sum(axis=0)
            chosen.append(int(members[int(np.argmax(explained))]))
        chosen = np.array(chosen, dtype=np.int64)
        if np.array_equal(chosen, references):
            break
        references = chosen
    labels = np.argmax(C[:, references], axis=1)
    labels[references] = np.arange(len(references))
    ids, first, sizes = np.unique(labels, return_index=True, return_counts=True)
    order = np.lexsort((first, -sizes))
    rank = np.empty(len(references), dtype=np.int64)
    rank[ids[order]] = np.arange(len(ids))
    return rank[labels], references[ids[order]]


def find_modes(trajectories: np.ndarray, C: np.ndarray, M: int, refine: int = 0,
               tree: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Steps 3–4 (``cluster``, ``choose_references``), then ``refine`` passes of ``refine_references``:
    ``(labels of the sample, reference positions)``. ``tree``: ``linkage_tree(C)`` if already made."""
    labels = cluster(C, M, tree)
    positions = choose_references(C, labels)
    if refine > 0:
        labels, positions = refine_references(trajectories, C, positions, refine)
    return labels, positions
