"""What runs on a Dask worker: one group of column tiles of a trajectory store, read from the path
every worker sees, through the same per-tile functions as the single-process pass (so the same bits)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..fitting import TileResult, fit_tile_result
from ..report import metrics
from ..report.metrics import FitMeasures
from ..shards import ShardJob, write_shard
from ..stores import open_trajectory_store
from ..trajectory import TrajectoryStore, column_tiles

_open: dict[tuple[str, int], TrajectoryStore] = {}  # per worker process: stores by path and mtime


def open_location(location: str) -> TrajectoryStore:
    """The store at ``location`` (a file or a sharded folder), opened once per worker process."""
    path = Path(location)
    key = (location, (path / "index.h5" if path.is_dir() else path).stat().st_mtime_ns)
    if key not in _open:
        _open.clear()
        _open[key] = open_trajectory_store(path)
    return _open[key]


def fit_group(location: str, start: int, stop: int, width: int, references: np.ndarray,
              hook: Callable[[int], None] | None = None) -> tuple[list[TileResult], int]:
    """Steps 5–6 of the tiles ``range(start, stop, width)``; returns them and the bytes read."""
    from threadpoolctl import threadpool_limits

    if hook is not None:
        hook(start)
    store = open_location(location)
    results, read = [], 0
    with threadpool_limits(limits=1, user_api="blas"):
        for first, last, block in column_tiles(store.W, start, stop, width):
            read += block.nbytes
            results.append(fit_tile_result(first, last, block, references, store.varies[first:last]))
    return results, read


def measure_group(location: str, start: int, stop: int, width: int, labels: np.ndarray, a: np.ndarray,
                  b: np.ndarray, references: np.ndarray, tensor_of_column: np.ndarray, n_tensors: int,
                  hook: Callable[[int], None] | None = None) -> tuple[FitMeasures, int]:
    """The report's sums over columns ``start:stop`` (``metrics.measure_group`` on the store every
    worker sees); returns them and the bytes read."""
    if hook is not None:
        hook(start)
    return metrics.measure_group(open_location(location), start, stop, width, labels, a, b, references,
                                 tensor_of_column, n_tensors)


def kill_this_worker_once(marker: str) -> Callable[[int], None]:
    """A task hook that kills its worker process the first time any task runs (``marker`` is a
    file that records it): what a lost machine looks like to Dask. For tests and drills."""
    def hook(start: int) -> None:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os.kill(os.getpid(), 9)
    return hook


def ingest_shard(job: ShardJob) -> int:
    """``shards.write_shard`` on a worker: one shard file from every checkpoint; the bytes read."""
    return write_shard(job)
