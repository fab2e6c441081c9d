"""What the report measures, as functions on arrays: the fit of a mode file against the trajectory it
was fitted on, the PCA-of-the-trajectory baseline, and the weight averages users pick instead.

One streaming pass over column tiles (``measure``) gathers every per-checkpoint, per-tensor and
per-mode sum the report needs, plus the ``T × T`` Gram matrix of the centred trajectory, from which
the PCA baseline follows exactly without a second pass. Every final candidate other than CMD is a
fixed linear combination of the checkpoints (``Σ_t c_t w(t)``), given by its weights ``c``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from ..decompose import MERGE_COLUMNS, varying_runs
from ..modes import model_values

PCA_RANKS = (1, 2)  # the PCA baselines: mean + d principal directions of the trajectory
CHUNK_BYTES = 2 * 2**20  # float64 bytes of one slice of a tile: stays in the CPU cache


class TensorOfColumn:
    """Which modelled tensor each column belongs to, ``[start:stop]`` worked out per slice from the
    tensors' sizes (as ``np.repeat(np.arange(count), sizes)``, without its 8 bytes a parameter)."""

    def __init__(self, sizes: Sequence[int]):
        self.ends = np.cumsum(np.asarray(sizes, dtype=np.int64))
        self.count = len(self.ends)

    def __getitem__(self, columns: slice) -> np.ndarray:
        start, stop, _ = columns.indices(int(self.ends[-1]) if self.count else 0)
        return np.searchsorted(self.ends, np.arange(start, stop), side="right")


class FitMeasures(NamedTuple):
    """Sums of squares from one pass. Per checkpoint ``(T,)``, per tensor ``(n_tensors,)``."""
    error_sq: np.ndarray             # (T,) ‖w_t − ŵ_t‖² (ŵ: the mode file's reconstruction)
    norm_sq: np.ndarray              # (T,) ‖w_t‖²
    displacement_sq: np.ndarray      # (T,) ‖w_t − w_0‖²
    tensor_error_sq: np.ndarray      # (n_tensors,) summed over the run
    tensor_norm_sq: np.ndarray
    tensor_displacement_sq: np.ndarray
    tensor_error_sq_last: np.ndarray  # (n_tensors,) at the last checkpoint
    tensor_norm_sq_last: np.ndarray
    tensor_displacement_sq_last: np.ndarray
    mode_layer_counts: np.ndarray    # (M, n_tensors) parameters of each tensor in each mode
    mode_abs_corr_sum: np.ndarray    # (M,) Σ |corr(w_i, r_m)| over non-constant members
    mode_varying: np.ndarray         # (M,) non-constant members
    gram: np.ndarray                 # (T, T) Σ_i (w_i − mean w_i)(w_i − mean w_i)ᵀ


def measure(tiles: Iterable[tuple[int, int, np.ndarray]], parameters: Callable[[int, int], tuple],
            references: np.ndarray, tensor_of_column: np.ndarray | TensorOfColumn, n_tensors: int,
            advance: Callable[[int], None] = lambda n: None, group_columns: int | None = None,
            varies: np.ndarray | None = None) -> FitMeasures:
    """One pass over ``(start, stop, W[:, start:stop])`` tiles of the trajectory (float32 arrays,
    or a 16-bit store's ``EncodedBlock``s, widened slice by slice).

    ``parameters(start, stop)`` gives the mode file's ``labels, a, b`` of those columns;
    ``references`` are the stored normalised references ``(M, T)``. The reconstruction is
    ``a · references[label] + b`` in float64 from the stored values, exactly what
    ``cmd reconstruct`` writes before the cast to each tensor's dtype. With ``group_columns``,
    the sums of each group of columns ``[g · group_columns, (g + 1) · group_columns)`` are formed
    apart and added up in order (``combine``): a distributed pass with one task per group
    (``cmdtool.distributed``) then gives the same bits.

    ``varies`` (indexed like ``tensor_of_column``; the store's flags) lets runs of constant
    columns whose ``a`` is 0 skip the ``(T, n)`` work: their reconstruction is ``b`` at every
    checkpoint (``0 · r`` is ±0), so they add the same ``w²`` and ``(w − b)²`` at every
    checkpoint and nothing to the displacement, the correlations or the Gram matrix; only their
    first row is read (shorter runs than ``MERGE_COLUMNS`` are computed). The sums are then
    those of the full pass to rounding: they are added in another order (``T · x`` once instead
    of ``x`` added ``T`` times; the moving columns' products in other slices), within 1e-12.
    """
    M, T = references.shape
    R = references.astype(np.float64)
    parts, sums, group = [], _zero_sums(M, T, n_tensors), None
    for start, stop, block in tiles:
        if group_columns is not None and start // group_columns != group:
            if group is not None:
                parts.append(_as_measures(sums, M, n_tensors))
                sums = _zero_sums(M, T, n_tensors)
            group = start // group_columns
        labels, a, b = parameters(start, stop)
        tensors = tensor_of_column[start:stop]
        runs = [(0, stop - start)]
        if varies is not None:
            computed = varies[start:stop] | (a != 0)
            if not computed.all():
                runs = varying_runs(computed, MERGE_COLUMNS)
                skipped = np.ones(stop - start, dtype=bool)
                for first, last in runs:
                    skipped[first:last] = False
                _constant_columns(block[0][skipped], labels[skipped], b[skipped], tensors[skipped], T, n_tensors,
                                  sums)
        chunk = max(1, CHUNK_BYTES // (8 * T))  # slices whose float64 copies stay in the CPU cache
        for run_start, run_stop in runs:
            for first in range(run_start, run_stop, chunk):
                columns = slice(first, min(first + chunk, run_stop))
                _measure_columns(block[:, columns], labels[columns].astype(np.int64), a[columns].astype(np.float64),
                                 b[columns].astype(np.float64), R, tensors[columns], n_tensors, sums)
        advance(stop - start)
    parts.append(_as_measures(sums, M, n_tensors))
    return combine(parts)


def measure_group(store, start: int, stop: int, width: int, labels: np.ndarray, a: np.ndarray, b: np.ndarray,
                  references: np.ndarray, tensor_of_column, n_tensors: int) -> tuple[FitMeasures, int]:
    """``measure`` of the columns ``start:stop`` of ``store`` (one group of tiles ``width`` wide;
    ``labels, a, b, tensor_of_column`` of those columns), from zero: one task of the report's pass,
    in a thread here or on a Dask worker. Returns the sums and the store's bytes read."""
    from threadpoolctl import threadpool_limits

    from ..trajectory import column_tiles

    read = [0]

    def tiles():
        for first, last, block in column_tiles(store.W, start, stop, width):
            read[0] += block.nbytes
            yield first - start, last - start, block

    with threadpool_limits(limits=1, user_api="blas"):
        measured = measure(tiles(), lambda lo, hi: (labels[lo:hi], a[lo:hi], b[lo:hi]), references,
                           tensor_of_column, n_tensors, varies=np.asarray(store.varies[start:stop]))
    return measured, read[0]


def measure_by_groups(modes, map_groups: Callable[[Iterator[tuple]], Iterable[tuple[FitMeasures, int]]],
                      advance: Callable[[int], None] = lambda n: None) -> FitMeasures:
    """The report's pass over the mode file ``modes`` as groups of whole tiles
    (``fitting.column_groups``), the same groups wherever they run: ``map_groups`` takes the
    groups' arguments ``(start, stop, width, labels, a, b, references, tensor_of_column,
    n_tensors)`` (``labels, a, b`` read from the mode file as each group is handed out) and yields
    each group's ``measure_group`` result in order, in threads here or as Dask tasks; the sums are
    added in that order, so the report is the same bit for bit however the groups ran."""
    from ..fitting import column_groups, group_step, tile_width

    width = tile_width(modes.T)
    tensor_of_column = TensorOfColumn([s.size for s in modes.layout.modelled])
    groups = column_groups(modes.N, width, group_step(width))

    def arguments() -> Iterator[tuple]:
        for lo, hi in groups:
            yield (lo, hi, width, *modes.parameters(slice(lo, hi)), modes.references, tensor_of_column[lo:hi],
                   tensor_of_column.count)

    parts = []
    for (measured, _), (lo, hi) in zip(map_groups(arguments()), groups):
        parts.append(measured)
        advance(hi - lo)
    return combine(parts)


def _constant_columns(first: np.ndarray, labels: np.ndarray, b: np.ndarray, tensors: np.ndarray, T: int,
                      n_tensors: int, sums: tuple) -> None:
    """Add the sums of constant columns with ``a = 0`` (``first``: their one value) to ``sums``."""
    per_t, per_tensor, counts, _, _, _ = sums
    M = len(counts) // n_tensors
    values = first.astype(np.float64)
    error = values - b.astype(np.float64)  # w − (0 · r + b), the same at every checkpoint
    for name, column in (("norm_sq", values), ("error_sq", error)):
        squares = column * column
        per_t[name] += squares.sum()
        by_tensor = np.bincount(tensors, squares, minlength=n_tensors)
        per_tensor[f"tensor_{name}"] += T * by_tensor
        per_tensor[f"tensor_{name}_last"] += by_tensor
    counts += np.bincount(labels.astype(np.int64) * n_tensors + tensors, minlength=M * n_tensors)


def _zero_sums(M: int, T: int, n_tensors: int) -> tuple:
    per_t = {k: np.zeros(T) for k in ("error_sq", "norm_sq", "displacement_sq")}
    per_tensor = {k: np.zeros(n_tensors) for k in (
        "tensor_error_sq", "tensor_norm_sq", "tensor_displacement_sq",
        "tensor_error_sq_last", "tensor_norm_sq_last", "tensor_displacement_sq_last")}
    counts = np.zeros(M * n_tensors, dtype=np.int64)
    return per_t, per_tensor, counts, np.zeros(M), np.zeros(M, dtype=np.int64), np.zeros((T, T))


def _as_measures(sums: tuple, M: int, n_tensors: int) -> FitMeasures:
    per_t, per_tensor, counts, corr_sum, varying, gram = sums
    return FitMeasures(**per_t, **per_tensor, mode_layer_counts=counts.reshape(M, n_tensors),
                       mode_abs_corr_sum=corr_sum, mode_varying=varying, gram=gram)


def combine(parts: Sequence[FitMeasures]) -> FitMeasures:
    """The sums of consecutive groups of columns, added up in the order given."""
    total = [np.zeros_like(field) for field in parts[0]]
    for part in parts:
        for acc, field in zip(total, part):
            acc += field
    return FitMeasures(*total)


def _measure_columns(block: np.ndarray, labels: np.ndarray, a: np.ndarray, b: np.ndarray, R: np.ndarray,
                     tensors: np.ndarray, n_tensors: int, sums: tuple) -> None:
    """Add one ``(T, n)`` column slice's sums to ``sums`` (see ``measure``), in one float64 buffer
    besides the block's copy: each sum of squares is one pass (``vecdot`` or ``einsum``, no array of squares),
    and a slice inside one tensor (all but the few that straddle two) adds the checkpoints' sums
    (``T`` numbers) and the last row's to its tensor, without per-column sums."""
    per_t, per_tensor, counts, corr_sum, varying, gram = sums
    M = R.shape[0]
    single = tensors[0] == tensors[-1]
    X = block.astype(np.float64)
    work = model_values(labels, a, b, R.T)           # (T, n) the reconstruction
    np.subtract(X, work, out=work)                   # its error
    for name, values in (("norm_sq", X), ("error_sq", work), ("displacement_sq", None)):
        if values is None:
            values = np.subtract(X, X[0], out=work)  # the displacement from the first checkpoint
        by_t = np.vecdot(values, values)  # per checkpoint; 3-4x faster than einsum's "tn,tn->t"
        per_t[name] += by_t
        if single:
            per_tensor[f"tensor_{name}"][tensors[0]] += by_t.sum()
            per_tensor[f"tensor_{name}_last"][tensors[0]] += values[-1] @ values[-1]
        else:
            per_tensor[f"tensor_{name}"] += np.bincount(tensors, np.einsum("tn,tn->n", values, values),
                                                        minlength=n_tensors)
            per_tensor[f"tensor_{name}_last"] += np.bincount(tensors, values[-1] * values[-1], minlength=n_tensors)
    work -= work.mean(axis=0)                        # centred (the displacement's centring is w's)
    counts += np.bincount(labels * n_tensors + tensors, minlength=M * n_tensors)
    centred_norm = np.sqrt(np.einsum("tn,tn->n", work, work))
    moving = centred_norm > 0
    dots = np.take((R @ work).ravel(), labels * work.shape[1] + np.arange(work.shape[1]))  # <r̃_label, w − mean w>
    corr = np.abs(dots[moving]) / centred_norm[moving]
    corr_sum += np.bincount(labels[moving], corr, minlength=M)
    varying += np.bincount(labels[moving], minlength=M)
    gram += work @ work.T


def ratio(error_sq, reference_sq):
    """``sqrt(error² / reference²)`` elementwise; infinite where only the reference is 0 (e.g. the
    first checkpoint's displacement: report.json writes null), 0 where both are."""
    error_sq, reference_sq = np.asarray(error_sq, dtype=np.float64), np.asarray(reference_sq, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.sqrt(error_sq / reference_sq)
    return np.where((error_sq == 0) & (reference_sq == 0), 0.0, out)


class PCA(NamedTuple):
    """PCA of the trajectory (DLDR / P-BFGS): the checkpoints as ``T`` points in parameter space,
    modelled as their mean plus ``d`` principal directions. From the Gram matrix ``G = W̃ W̃ᵀ`` of
    the centred checkpoints, ``G = U diag(λ) Uᵀ`` (λ descending) and the rank-``d`` projection of
    the checkpoints is ``U_d U_dᵀ W̃``."""
    eigenvalues: np.ndarray   # (T,) descending, clipped at 0
    eigenvectors: np.ndarray  # (T, T) columns

    def error_sq(self, d: int) -> np.ndarray:
        """``(T,)`` squared error of each checkpoint under mean + ``d`` directions:
        ``Σ_{k>d} λ_k U[t, k]²``."""
        tail = self.eigenvectors[:, d:]
        return (tail * tail) @ self.eigenvalues[d:]

    def weights_at(self, d: int, t: int) -> np.ndarray:
        """``c`` with ``Σ_s c_s w(s)`` = the rank-``d`` PCA reconstruction of checkpoint ``t``:
        ``1/T + (U_d U_dᵀ)[t]`` (the directions are orthogonal to the constant vector)."""
        U = self.eigenvectors[:, :d]
        return np.full(len(self.eigenvalues), 1 / len(self.eigenvalues)) + U[t] @ U.T


def pca_from_gram(gram: np.ndarray) -> PCA:
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    order = np.argsort(eigenvalues)[::-1]
    return PCA(np.clip(eigenvalues[order], 0.0, None), eigenvectors[:, order])


def pca_storage_floats(d: int, N: int, T: int) -> int:
    """Numbers a rank-``d`` PCA model keeps: the mean and ``d`` directions (N each), ``d·T`` coordinates."""
    return (d + 1) * N + d * T


def tail_weights(T: int, k: int) -> np.ndarray:
    """Mean of the last ``k`` checkpoints (LAWA / SWA style); all of them when ``k ≥ T``."""
    c = np.zeros(T)
    c[-min(k, T):] = 1 / min(k, T)
    return c


def ema_weights(T: int, decay: float) -> np.ndarray:
    """Exponential moving average over checkpoints, ``e_0 = w_0``, ``e_t = decay·e_{t−1} + (1−decay)·w_t``,
    as weights on the checkpoints: ``(1−decay)·decay^(T−1−t)``, and ``decay^(T−1)`` on the first."""
    c = (1 - decay) * decay ** np.arange(T - 1, -1, -1, dtype=np.float64)
    c[0] = decay ** (T - 1)
    return c


def unit_weights(T: int, t: int) -> np.ndarray:
    """Checkpoint ``t`` itself."""
    c = np.zeros(T)
    c[t] = 1.0
    return c
