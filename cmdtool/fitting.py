"""Post-hoc CMD of a trajectory (paper §3.2), as one call that returns the modes in memory.

``fit_trajectory(source, settings)`` runs steps 1–6 of ``decompose.py`` over any ``(T, N)`` trajectory
source (a trajectory store on disk, or rows held in memory) and returns a ``Modes``; writing it is
``modefile.write_mode_file``'s job. ``cmd fit``, the warm-up of ``cmd fit --warmup``, ``cmd watch``
and ``OnlineCMD`` all call it.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

from .checkpoints import CheckpointInfo
from .decompose import (choose_references, cluster, correlation_matrix, fit_tile, label_dtype, normalise_references,
                        sample_parameters)
from .errors import CmdError
from .layout import Layout
from .modes import FitMetrics, FitSettings, Modes
from .progress import Progress, no_progress

TILE_BYTES = 32 * 2**20  # float64 bytes of one (T, tile) block in the streaming pass


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

    def tiles(self, tile_columns: int) -> Iterator[tuple[int, int, np.ndarray]]: ...

    def carried(self, name: str) -> np.ndarray: ...

    def attachments(self) -> dict[str, bytes]: ...


def tile_width(T: int, tile_columns: int | None = None) -> int:
    """Columns per streamed ``(T, tile)`` block: ``TILE_BYTES`` of float64 unless given."""
    return tile_columns or max(1, TILE_BYTES // (8 * T))


def fit_trajectory(source: TrajectorySource, settings: FitSettings, *, tile_columns: int | None = None,
              progress: Progress = no_progress) -> Modes:
    """Steps 1–6 of CMD over ``source``, with BLAS on one thread: the products are too skinny to
    share (see pyproject.toml). Memory: the ``(T, K)`` sample, one tile, and ``labels, a, b``."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _decompose(source, settings, tile_columns, progress)


def _decompose(source: TrajectorySource, settings: FitSettings, tile_columns: int | None,
               progress: Progress) -> Modes:
    layout, T, N = source.layout, source.T, source.N
    sample = sample_parameters([s.size for s in layout.modelled], source.varies, settings.samples, settings.seed)
    if len(sample) == 0:
        raise CmdError(f"every modelled parameter is constant over the {T} checkpoints: nothing to decompose")
    trajectories = source.columns(sample)                       # (T, K)
    C = correlation_matrix(trajectories)
    sample_labels = cluster(C, settings.modes)
    reference_positions = choose_references(C, sample_labels)
    normalised = normalise_references(trajectories[:, reference_positions].T)
    references = normalised.references
    M = len(reference_positions)

    labels = np.empty(N, dtype=label_dtype(M))
    a = np.empty(N, dtype=np.float32)
    b = np.empty(N, dtype=np.float32)
    totals = dict.fromkeys(("sse", "sq_norm", "sq_displacement", "sq_centred"), 0.0)
    mode_sizes = np.zeros(M, dtype=np.int64)
    mode_sse = np.zeros(M)
    with progress("fitting modes", N) as advance:
        for start, stop, block in source.tiles(tile_width(T, tile_columns)):
            result = fit_tile(block, references, source.varies[start:stop])  # constant columns skipped
            a32, b32 = result.a.astype(np.float32), result.b.astype(np.float32)
            # The error of what the mode file stores: the float32 rounding of a and b adds
            # (a − a32)² + T (b − b32)² to the least-squares residual.
            sse = result.sse + (result.a - a32) ** 2 + T * (result.b - b32) ** 2
            labels[start:stop], a[start:stop], b[start:stop] = result.labels, a32, b32
            mode_sizes += np.bincount(result.labels, minlength=M)
            mode_sse += np.bincount(result.labels, weights=sse, minlength=M)
            totals["sse"] += float(sse.sum())
            for name in ("sq_norm", "sq_displacement", "sq_centred"):
                totals[name] += float(getattr(result, name).sum())
            advance(stop - start)
    return Modes(
        layout=layout, references=references.astype(np.float32), reference_offset=normalised.offset,
        reference_scale=normalised.scale, reference_index=sample[reference_positions].astype(np.int64),
        labels=labels, a=a, b=b, mode_sizes=mode_sizes, time=np.asarray(source.time, dtype=np.int64),
        names=list(source.names), infos=list(source.infos), settings=settings,
        metrics=FitMetrics.of(mode_sse=mode_sse, **totals),
        carried={spec.name: source.carried(spec.name) for spec in layout.carried},
        attachments=source.attachments())
