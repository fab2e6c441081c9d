"""Post-hoc CMD of a trajectory (paper §3.2): the modes in memory, or written as they stream.

``fit_trajectory(source, settings)`` runs steps 1–6 of ``decompose.py`` over any ``(T, N)`` trajectory
source (a trajectory store on disk, or rows held in memory) and returns a ``Modes``; writing it is
``modefile.write_mode_file``'s job. The warm-up of ``cmd fit --warmup``, ``cmd watch``, ``OnlineCMD``
and the ``CMD`` estimator call it. ``fit_to_file`` runs the same steps and writes each tile's
``labels, a, b`` into the mode file as the pass yields them (``cmd fit``): the same file, in memory
that does not grow with N.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol

import numpy as np

from ._threads import in_threads
from .auto_modes import AUTO_TOLERANCE, choose_modes, error_curve
from .checkpoints.schema import CheckpointInfo
from .decompose import (
    NormalisedReferences,
    correlation_matrix,
    find_modes,
    fit_tile,
    label_dtype,
    linkage_tree,
    normalise_references,
    sample_parameters,
)
from .errors import CmdError
from .layout import Layout
from .modes import FitMetrics, FitSettings, Modes, dropped
from .progress import Progress, no_progress

TILE_BYTES = 32 * 2**20  # float64 bytes of one (T, tile) block in the streaming pass
PASS_THREADS = 4         # at most this many threads work through the tiles (numpy and BLAS release the GIL)
GROUP_COLUMNS = 1 << 20  # columns of one group of tiles (one Dask task; one shard of a sharded store)
MIN_HELD_OUT = 100       # --modes auto: fewer parameters left out of the sample than this, split the sample


class TrajectorySource(Protocol):
    """What the fit reads: a ``(T, N)`` trajectory in column tiles, with its layout and checkpoints."""
    layout: Layout
    time: np.ndarray
    names: list[str]
    infos: list[CheckpointInfo]
    varies: np.ndarray  # (N,) bool: the parameter is not constant over the T checkpoints

    @property
    def T(self) -> int: ...

    @property
    def N(self) -> int: ...

    def columns(self, index: np.ndarray) -> np.ndarray: ...

    def tiles(self, tile_columns: int, stored: bool = False) -> Iterator[tuple[int, int, np.ndarray]]: ...

    def carried(self, name: str) -> np.ndarray: ...

    def attachments(self) -> dict[str, bytes]: ...


def tile_width(T: int, tile_columns: int | None = None) -> int:
    """Columns per streamed ``(T, tile)`` block: ``TILE_BYTES`` of float64 unless given."""
    return tile_columns or max(1, TILE_BYTES // (8 * T))


class TileResult(NamedTuple):
    """Steps 5–6 of one column tile ``start:stop``: what a fit keeps per parameter and its sums."""
    start: int
    stop: int
    labels: np.ndarray      # (n,) in label_dtype(M)
    a: np.ndarray           # (n,) float32, as stored
    b: np.ndarray           # (n,) float32
    mode_sizes: np.ndarray  # (M,) int64
    mode_sse: np.ndarray    # (M,) float64
    sse: float
    sq_norm: float
    sq_displacement: float
    sq_centred: float


# Steps 5–6 over every tile of the trajectory, given the normalised references and the tile width:
# yields one TileResult per tile of the grid ``range(0, N, width)``, in that order.
MapTiles = Callable[[np.ndarray, int], Iterable[TileResult]]


def fit_tile_result(start: int, stop: int, block, references: np.ndarray,
                    varies: np.ndarray | None = None) -> TileResult:
    """Steps 5–6 of one ``(T, stop − start)`` tile (float32, or a 16-bit store's ``EncodedBlock``),
    reduced to its sums in a fixed order, so that the same tile gives the same bits in this process
    or on a Dask worker. ``varies`` (the tile's flags) lets ``fit_tile`` skip constant columns; the
    result is the same bit for bit. ``a, b`` come as the mode file stores them (float32), and each
    parameter's error includes their rounding, as the stored model's does."""
    M = references.shape[0]
    result = fit_tile(block, references, varies, stored=np.float32, labels_dtype=label_dtype(M))
    return TileResult(start, stop, result.labels, result.a, result.b, np.bincount(result.labels, minlength=M),
                      np.bincount(result.labels, weights=result.sse, minlength=M), float(result.sse.sum()),
                      float(result.sq_norm.sum()), float(result.sq_displacement.sum()),
                      float(result.sq_centred.sum()))


def pass_threads() -> int:
    """Threads of the streaming pass: the usable CPUs, at most ``PASS_THREADS``."""
    from ._portable import usable_cpus

    return min(PASS_THREADS, usable_cpus())


def group_step(width: int, group_columns: int = GROUP_COLUMNS) -> int:
    """Columns of one group of whole tiles: the largest multiple of ``width`` up to ``group_columns``."""
    return max(1, group_columns // width) * width


def column_groups(N: int, width: int, group_columns: int = GROUP_COLUMNS) -> list[tuple[int, int]]:
    """Consecutive ranges of whole tiles (``width`` columns each) of about ``group_columns``:
    the units a distributed pass hands to one task, and over which the report reduces its sums
    before adding them up in order, so that its figures do not depend on the number of tasks."""
    step = group_step(width, group_columns)
    return [(start, min(start + step, N)) for start in range(0, N, step)]


def fit_trajectory(source: TrajectorySource, settings: FitSettings, *, tile_columns: int | None = None,
                   progress: Progress = no_progress, map_tiles: MapTiles | None = None) -> Modes:
    """Steps 1–6 of CMD over ``source``, with BLAS on one thread: the products are too skinny to
    share (see pyproject.toml); up to ``PASS_THREADS`` threads work through the tiles instead
    (``in_threads``: the same bits as one). Memory: the ``(T, K)`` sample, a few tiles, and
    ``labels, a, b`` (9 bytes per parameter: ``fit_to_file`` writes them as they come instead).

    ``map_tiles`` runs steps 5–6 elsewhere (``cmdtool.distributed``: one Dask task per group of
    tiles); the sums are added here, tile by tile in column order, so the mode file is the same
    bit for bit however the tiles were spread."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        found = _find_modes(source, settings)
        header = _header(source, found)
        N, dtype = source.N, label_dtype(found.M)
        labels, a, b = np.empty(N, dtype=dtype), np.empty(N, dtype=np.float32), np.empty(N, dtype=np.float32)

        def keep(tile: TileResult) -> None:
            columns = slice(tile.start, tile.stop)
            labels[columns], a[columns], b[columns] = tile.labels, tile.a, tile.b

        mode_sizes, metrics = _assign_and_fit(source, found, tile_columns, progress, map_tiles, keep)
        return dataclasses.replace(header, labels=labels, a=a, b=b, mode_sizes=mode_sizes, metrics=metrics)


def fit_to_file(source: TrajectorySource, settings: FitSettings, path: Path, *, tile_columns: int | None = None,
                progress: Progress = no_progress, map_tiles: MapTiles | None = None) -> Path:
    """``fit_trajectory`` written straight into the mode file ``path``: each tile's ``labels, a, b``
    go into the file as the pass yields them (``modefile.ModeFileWriter``), so memory does not grow
    with N; the file is the same, byte for byte, as ``write_mode_file`` of ``fit_trajectory``'s
    result, and appears at ``path`` only when complete."""
    from threadpoolctl import threadpool_limits

    from .modefile import ModeFileWriter

    with threadpool_limits(limits=1, user_api="blas"):
        found = _find_modes(source, settings)
        header = _header(source, found)
        with ModeFileWriter(path, header) as writer:
            def write(tile: TileResult) -> None:
                writer.parameters(tile.start, tile.labels, tile.a, tile.b)

            mode_sizes, metrics = _assign_and_fit(source, found, tile_columns, progress, map_tiles, write)
            return writer.finish(dataclasses.replace(header, mode_sizes=mode_sizes, metrics=metrics))


def _error_curve(source: TrajectorySource, sample: np.ndarray, trajectories: np.ndarray, C: np.ndarray,
                 settings: FitSettings, tree: np.ndarray | None) -> dict:
    """``--modes auto``: the error-vs-M curve for M = 1 … ``auto_modes``, modes found on the fit's
    sample and measured on a second, independent sample (seed + 1, the first sample's parameters
    left out); the chosen M is the smallest within 5 % of the curve's smallest error. When fewer
    than ``MIN_HELD_OUT`` parameters are left (the sample took nearly all of them), the curve is
    the mean of a 2-fold split of the sample instead: modes found on one half, measured on the other.
    ``tree``: the fit's one linkage of ``C`` (``linkage_tree``); every M of the curve is a cut of it
    (a half of the 2-fold split has its own, of its own correlations)."""
    top = min(settings.auto_modes, len(sample))  # no more modes than sampled parameters
    second = sample_parameters([s.size for s in source.layout.modelled], source.varies, settings.samples,
                               settings.seed + 1)
    held_out = np.setdiff1d(second, sample)
    if len(held_out) >= MIN_HELD_OUT:
        Ms = range(1, top + 1)
        curve = error_curve(trajectories, C, source.columns(held_out), Ms, settings.refine, tree=tree)
        found, errors, measured = curve.found, curve.rel_error, f"{len(held_out)} held-out parameters"
    else:
        if len(sample) < 4:
            raise CmdError(f"modes 'auto' measures an error curve on a split of the sample, which needs at least 4 "
                           f"parameters that move; the sample has {len(sample)} (raise `samples`)",
                           parameter="modes", mentions=("samples",))
        Ms = range(1, min(top, len(sample) // 2) + 1)
        halves = np.random.default_rng(settings.seed + 1).permutation(len(sample))
        halves = (np.sort(halves[: len(sample) // 2]), np.sort(halves[len(sample) // 2:]))
        curves = [error_curve(trajectories[:, fit], C[np.ix_(fit, fit)], trajectories[:, check], Ms, settings.refine)
                  for fit, check in (halves, halves[::-1])]
        found = np.minimum(curves[0].found, curves[1].found)
        errors = (curves[0].rel_error + curves[1].rel_error) / 2
        measured = f"2-fold split of the {len(sample)} sampled parameters (too few left to hold out)"
    return {"modes": list(Ms), "found": [int(v) for v in found], "rel_error": [float(e) for e in errors],
            "chosen": choose_modes(Ms, errors), "measured_on": measured,
            "rule": f"smallest M within {AUTO_TOLERANCE:.0%} of the smallest held-out error"}


class FoundModes(NamedTuple):
    """Steps 1–4 of a fit: the settings (M chosen when auto), the sample, the references."""
    settings: FitSettings
    sample: np.ndarray           # (K,) parameter indices
    reference_positions: np.ndarray  # (M,) positions into the sample
    normalised: NormalisedReferences
    curve: dict | None           # --modes auto: the error curve

    @property
    def M(self) -> int:
        return len(self.reference_positions)


def _find_modes(source: TrajectorySource, settings: FitSettings) -> FoundModes:
    """Steps 1–4 on the ``(T, K)`` sample: modes and their normalised references."""
    layout, T = source.layout, source.T
    sample = sample_parameters([s.size for s in layout.modelled], source.varies, settings.samples, settings.seed)
    if len(sample) == 0:
        raise CmdError(f"every modelled parameter is constant over the {T} checkpoints: nothing to decompose")
    trajectories = source.columns(sample)                       # (T, K)
    C = correlation_matrix(trajectories)
    curve, tree = None, None
    if len(sample) > 1 and (settings.auto_modes is not None or settings.modes > 1):
        tree = linkage_tree(C)  # step 3's one linkage: the fit's M and every M of --modes auto are cuts of it
    if settings.auto_modes is not None:
        curve = _error_curve(source, sample, trajectories, C, settings, tree)
        settings = settings.replace(modes=curve["chosen"])
    _, reference_positions = find_modes(trajectories, C, settings.modes, settings.refine, tree)
    normalised = normalise_references(trajectories[:, reference_positions].T)
    return FoundModes(settings, sample, reference_positions, normalised, curve)


def _header(source: TrajectorySource, found: FoundModes) -> Modes:
    """The ``Modes`` of a fit without what the streaming pass gives (``labels, a, b``, sizes, metrics)."""
    layout, settings, normalised = source.layout, found.settings, found.normalised
    return Modes(
        layout=layout, references=normalised.references.astype(np.float32), reference_offset=normalised.offset,
        reference_scale=normalised.scale, reference_index=found.sample[found.reference_positions].astype(np.int64),
        labels=None, a=None, b=None, mode_sizes=None, time=np.asarray(source.time, dtype=np.int64),
        names=list(source.names), infos=list(source.infos), settings=settings, metrics=None,
        carried={spec.name: source.carried(spec.name) for spec in layout.carried
                 if spec.name not in dropped(layout, settings)},
        attachments=source.attachments())


def _assign_and_fit(source: TrajectorySource, found: FoundModes, tile_columns: int | None, progress: Progress,
                    map_tiles: MapTiles | None, keep: Callable[[TileResult], None]) -> tuple[np.ndarray, FitMetrics]:
    """Steps 5–6: one pass over the column tiles (here, or through ``map_tiles``); each tile's
    ``TileResult`` goes to ``keep`` in column order, its sums are added here in that order.
    Returns the mode sizes and the fit's metrics."""
    T, N, M = source.T, source.N, found.M
    references = found.normalised.references
    if map_tiles is None:
        def map_tiles(references: np.ndarray, width: int) -> Iterator[TileResult]:
            def fit(tile: tuple[int, int, np.ndarray]) -> TileResult:
                start, stop, block = tile
                return fit_tile_result(start, stop, block, references, source.varies[start:stop])
            return in_threads(fit, source.tiles(width, stored=True), pass_threads())
    totals = dict.fromkeys(("sse", "sq_norm", "sq_displacement", "sq_centred"), 0.0)
    mode_sizes = np.zeros(M, dtype=np.int64)
    mode_sse = np.zeros(M)
    expected = 0
    with progress("fitting modes", N) as advance:
        for tile in map_tiles(references, tile_width(T, tile_columns)):
            start, stop = tile.start, tile.stop
            if start != expected:
                raise RuntimeError(f"tiles out of order: got columns {start}:{stop}, expected {expected}")
            keep(tile)
            mode_sizes += tile.mode_sizes
            mode_sse += tile.mode_sse
            for name in totals:
                totals[name] += getattr(tile, name)
            expected = stop
            advance(stop - start)
    if expected != N:
        raise RuntimeError(f"tiles ended at column {expected} of {N}")
    return mode_sizes, FitMetrics.of(mode_sse=mode_sse, error_curve=found.curve, **totals)
