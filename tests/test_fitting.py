"""The fit written as it streams (``fitting.fit_to_file``): the same file as the in-memory fit, nothing
partial, and memory that does not hold ``labels, a, b``."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import cmdtool
from cmdtool.fitting import fit_tile_result, fit_to_file
from cmdtool.modefile import write_mode_file
from cmdtool.modes import FitSettings
from cmdtool.stores import prepare_store
from helpers import write_run

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"

# SHA-256 of the sample run's per-parameter datasets, as written by cmdtool before the fit streamed
# into the mode file (``cmd fit sample_checkpoints``, default settings).
SAMPLE_DIGESTS = {
    "labels": "41124cbd8b06dff0", "a": "025f733c7955d823", "b": "d309472014325b46",
    "references": "e7daa9699cd4cd89", "reference_index": "8049b1cb3a7619a2", "mode_sizes": "18398dd024f11a6c",
}


def test_streamed_fit_is_byte_for_byte_the_in_memory_fit(tmp_path, run_dir):
    store = prepare_store(run_dir, trajectory=tmp_path / "t.h5").store
    settings = FitSettings(modes=3, samples=200)
    streamed, direct = tmp_path / "streamed.cmd.h5", tmp_path / "direct.cmd.h5"
    fit_to_file(store, settings, streamed, tile_columns=37)  # many tiles, the last one short
    write_mode_file(direct, cmdtool.fit_trajectory(store, settings, tile_columns=37))
    assert streamed.read_bytes() == direct.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.cmd.h5", "run", "streamed.cmd.h5", "t.h5"]


def test_the_sample_run_gives_the_mode_file_it_gave_before(tmp_path):
    out = tmp_path / "sample.cmd.h5"
    cmdtool.fit(SAMPLES, out, trajectory=tmp_path / "t.h5")
    with h5py.File(out) as f:
        got = {name: hashlib.sha256(f[name][()].tobytes()).hexdigest()[:16] for name in SAMPLE_DIGESTS}
    assert got == SAMPLE_DIGESTS


def test_a_fit_that_fails_mid_pass_leaves_no_file(tmp_path, run_dir):
    store = prepare_store(run_dir, trajectory=tmp_path / "t.h5").store
    out = tmp_path / "m.cmd.h5"

    def failing(references, width):
        for start, stop, block in store.tiles(width):
            if start > 0:
                raise RuntimeError("worker lost")
            yield fit_tile_result(start, stop, block, references, store.varies[start:stop])

    with pytest.raises(RuntimeError, match="worker lost"):
        fit_to_file(store, FitSettings(modes=3), out, tile_columns=50, map_tiles=failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "t.h5"]


def _peak_bytes(fit) -> int:
    tracemalloc.start()
    try:
        fit()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_streamed_fit_memory_does_not_grow_with_n(tmp_path, monkeypatch):
    """Peak memory (numpy's allocations, which tracemalloc sees) at N and 2N: the in-memory fit grows by
    ``labels, a, b`` (9 bytes a parameter, held till the end), the streamed one by less than 0.1 byte a parameter.
    One thread: more hold a few tiles each, whenever they happen to run."""
    import cmdtool._portable as portable

    monkeypatch.setattr(portable, "usable_cpus", lambda: 1)
    T, settings, peaks = 4, FitSettings(modes=2, samples=100), {}
    for N in (200_000, 400_000):
        rng = np.random.default_rng(0)
        base, walk = rng.normal(size=N).astype(np.float32), rng.normal(size=(T, 1)).astype(np.float32)
        states = [{"w": torch.from_numpy(base * (1 + walk[t]) + 0.01 * t)} for t in range(T)]
        store = prepare_store(write_run(tmp_path / f"run{N}", states), trajectory=tmp_path / f"t{N}.h5").store
        peaks["memory", N] = _peak_bytes(lambda: cmdtool.fit_trajectory(store, settings, tile_columns=8192))
        peaks["streamed", N] = _peak_bytes(
            lambda: fit_to_file(store, settings, tmp_path / f"m{N}.cmd.h5", tile_columns=8192))
    assert peaks["memory", 400_000] - peaks["memory", 200_000] > 5 * 200_000, peaks  # labels, a, b
    assert peaks["streamed", 400_000] - peaks["streamed", 200_000] < 0.1 * 200_000, peaks


def test_the_pass_in_threads_writes_the_same_file_as_in_one(tmp_path, run_dir, monkeypatch):
    """Tiles worked through by 4 threads (results taken in column order) give the mode file of one
    thread, byte for byte; `in_threads` keeps the order whatever finishes first."""
    import time

    import cmdtool._portable as portable
    import cmdtool.fitting as fitting

    trajectory = prepare_store(run_dir, trajectory=tmp_path / "t.h5").store
    settings = FitSettings(modes=4, samples=300)
    monkeypatch.setattr(portable, "usable_cpus", lambda: 1)
    assert fitting.pass_threads() == 1
    fitting.fit_to_file(trajectory, settings, tmp_path / "one.cmd.h5", tile_columns=37)
    monkeypatch.setattr(portable, "usable_cpus", lambda: 64)
    assert fitting.pass_threads() == fitting.PASS_THREADS == 4
    fitting.fit_to_file(trajectory, settings, tmp_path / "four.cmd.h5", tile_columns=37)
    assert (tmp_path / "one.cmd.h5").read_bytes() == (tmp_path / "four.cmd.h5").read_bytes()

    def slow_first(i: int) -> int:  # the first items finish last
        time.sleep(0.01 * (i < 3))
        return i * i

    assert list(fitting.in_threads(slow_first, range(20), 4)) == [i * i for i in range(20)]
    taken = []

    def fails_at_5(i: int) -> int:
        taken.append(i)
        if i == 5:
            raise ValueError("five")
        return i

    results = fitting.in_threads(fails_at_5, range(1000), 2)
    with pytest.raises(ValueError, match="five"):
        list(results)
    assert max(taken) < 5 + 2 * 2  # no more than 2 × threads taken ahead of the failure


def test_ingest_memory_does_not_grow_with_n(tmp_path, monkeypatch):
    """Building a store at N and 2N (spans of 8192 values): the buffers are one span and the
    ``varies`` flags go straight into the store, so nothing of N's size is allocated."""
    import cmdtool.trajectory as trajectory

    monkeypatch.setattr(trajectory, "SPAN", 8192)
    peaks = {}
    for N in (200_000, 400_000):
        rng = np.random.default_rng(1)
        base = rng.normal(size=N).astype(np.float32)
        states = [{"w": torch.from_numpy(base + 0.01 * t * (np.arange(N) % 3 > 0))} for t in range(4)]
        run = write_run(tmp_path / f"run{N}", states)
        peaks[N] = _peak_bytes(lambda: prepare_store(run, trajectory=tmp_path / f"t{N}.h5"))
        store = prepare_store(run, trajectory=tmp_path / f"t{N}.h5").store
        np.testing.assert_array_equal(store.varies, np.arange(N) % 3 > 0)  # a third never moves
    assert peaks[400_000] - peaks[200_000] < 0.1 * 200_000, peaks
