"""cmdtool.distributed and cmdtool.shards: the sharded store holds what the single-file store holds,
and the fit and the report on a Dask LocalCluster of 2 worker processes give the same mode file
and report as one process, bit for bit, also when a worker is killed during the fit."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import cmdtool
from cmdtool.fitting import fit_trajectory
from cmdtool.modefile import open_mode_file, write_mode_file
from cmdtool.modes import FitSettings
from cmdtool.shards import build_sharded, open_sharded
from cmdtool.stores import prepare_store
from cmdtool.trajectory import fingerprint, read_signatures
from helpers import cmd, error_line, ok, plant, write_run

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("dask.distributed")
    from cmdtool.distributed import Engine
    with Engine.start(workers=2) as started:
        yield started


def mode_file_datasets(path: Path) -> dict:
    """Every dataset and attribute of a mode file but the settings (which name the store's path)."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        out.update({f"attr:{k}": v for k, v in f.attrs.items() if k != "settings"})
    return out


def assert_same_files(first: Path, second: Path) -> None:
    one, two = mode_file_datasets(first), mode_file_datasets(second)
    assert one.keys() == two.keys()
    for key in one:
        assert np.array_equal(np.asarray(one[key]), np.asarray(two[key])), key  # bit for bit
    assert "labels" in one and "a" in one and "b" in one and "attr:metrics" in one


def test_sharded_store_holds_what_the_single_store_holds(tmp_path, run_dir):
    single = prepare_store(run_dir, trajectory=tmp_path / "single.h5").store
    checkpoints = cmdtool.checkpoints.discover(run_dir).checkpoints
    layout, infos = read_signatures(checkpoints, (), ())
    sharded = build_sharded(checkpoints, layout, infos, tmp_path / "sharded", fingerprint(checkpoints, (), ()),
                            shard_columns=97)
    again = open_sharded(tmp_path / "sharded")
    assert len(again.bounds) - 1 == -(-single.N // 97)
    for store in (sharded, again):
        assert np.array_equal(np.asarray(store.W), np.asarray(single.W))
        assert np.array_equal(store.varies, single.varies)
        assert store.names == single.names and np.array_equal(store.time, single.time)
        assert store.layout.to_json() == single.layout.to_json()
        for spec in layout.carried:
            assert np.array_equal(store.carried(spec.name), single.carried(spec.name))
        index = np.array([0, 5, 96, 97, 98, 500, single.N - 1])
        assert np.array_equal(store.columns(index[::-1]), np.asarray(single.W)[:, index[::-1]])
        assert np.array_equal(store.W[3, 90:200], single.W[3, 90:200])


@pytest.mark.parametrize("fmt, dtypes", [("safetensors", ("bfloat16", "float16", "float64")),
                                         ("torch", ("float32", "bfloat16")), ("safetensors", ("bfloat16",)),
                                         ("torch", ("float16",))])
def test_sharded_column_reads_equal_the_single_ingest_in_every_dtype(tmp_path, planted, fmt, dtypes):
    """Column ranges read with pread (safetensors) or cut from whole tensors (torch), across tensor
    and row boundaries, hold the values of the single-process ingest bit for bit."""
    import torch

    from helpers import write_run

    states = [{name: value.to(getattr(torch, dtypes[i % len(dtypes)])) if value.is_floating_point() else value
               for i, (name, value) in enumerate(sorted(state.items()))} for state in planted.states()]
    run = write_run(tmp_path / "run", states, fmt=fmt)
    single = prepare_store(run, trajectory=tmp_path / "single.h5").store
    checkpoints = cmdtool.checkpoints.discover(run).checkpoints
    layout, infos = read_signatures(checkpoints, (), ())
    sharded = build_sharded(checkpoints, layout, infos, tmp_path / "sharded", fingerprint(checkpoints, (), ()),
                            shard_columns=41)
    assert {spec.dtype for spec in layout.modelled} == set(dtypes)
    assert np.asarray(sharded.W).tobytes() == np.asarray(single.W).tobytes()
    assert np.array_equal(sharded.varies, single.varies)
    with h5py.File(tmp_path / "sharded" / "shard-00000.h5") as f:  # a 16-bit run's shards in 16 bits
        assert f["W"].dtype.itemsize == (2 if len(dtypes) == 1 else 4)


def test_a_checkpoint_truncated_during_the_sharded_ingest_is_a_cmd_error_naming_it(tmp_path, run_dir, monkeypatch):
    """The sharded ingest (what each Dask worker runs, here in-process) reads with pread at the
    header's offsets, never through a memory map: a file cut short between the header and the read
    is one CmdError naming it, not a SIGBUS, and no store is left."""
    from cmdtool.checkpoints.safetensors_file import SafetensorsFile
    from cmdtool.errors import CmdError

    checkpoints = cmdtool.checkpoints.discover(run_dir).checkpoints
    layout, infos = read_signatures(checkpoints, (), ())
    victim = checkpoints[7].path
    read_range = SafetensorsFile.read_range

    def truncating(self, name, start, stop, out):
        if self.path == victim:
            os.truncate(victim, victim.stat().st_size // 2)
        return read_range(self, name, start, stop, out)

    monkeypatch.setattr(SafetensorsFile, "read_range", truncating)
    with pytest.raises(CmdError, match=f"^{victim}: the file changed while it was read"):
        build_sharded(checkpoints, layout, infos, tmp_path / "sharded", fingerprint(checkpoints, (), ()),
                      shard_columns=97)
    assert not (tmp_path / "sharded").exists() and not list(tmp_path.glob(".sharded*"))


def test_a_checkpoint_rewritten_after_its_columns_were_read_is_a_cmd_error(tmp_path, run_dir):
    """A file whose size or modification time changed since its header was read (the rest of a
    file still being written) is refused once the shard's columns are read."""
    from cmdtool.errors import CmdError
    from cmdtool.shards import ColumnReader

    checkpoint = cmdtool.checkpoints.discover(run_dir).checkpoints[3]
    layout, _ = read_signatures([checkpoint], (), ())
    reader = ColumnReader(checkpoint, layout)
    try:
        with open(checkpoint.path, "ab") as f:
            f.write(b"\0" * 64)
        with pytest.raises(CmdError, match=f"^{checkpoint.path}: the file changed while it was read"):
            reader.read(0, 10)
    finally:
        reader.close()


def test_distributed_fit_equals_the_single_process_fit_on_planted_data(tmp_path, run_dir, engine):
    from cmdtool.distributed import prepare_sharded_store
    settings = FitSettings(modes=3, samples=300)
    single = prepare_store(run_dir, trajectory=tmp_path / "single.h5").store
    write_mode_file(tmp_path / "single.cmd.h5", fit_trajectory(single, settings, tile_columns=50))
    prepared = prepare_sharded_store(engine, run_dir, trajectory=tmp_path / "sharded", shard_columns=97)
    assert not prepared.reused and len(prepared.store.bounds) > 3
    for group_columns in (120, 1000):  # several shards per task, tasks across shard bounds, one task
        before = engine.stats["tasks"]
        modes = fit_trajectory(prepared.store, settings, tile_columns=50,
                               map_tiles=engine.map_tiles(prepared.store, group_columns))
        assert engine.stats["tasks"] - before == -(-single.N // (group_columns // 50 * 50))
        write_mode_file(tmp_path / f"dask{group_columns}.cmd.h5", modes)
        assert_same_files(tmp_path / "single.cmd.h5", tmp_path / f"dask{group_columns}.cmd.h5")
    assert prepare_sharded_store(engine, run_dir, trajectory=tmp_path / "sharded").reused


def test_a_worker_killed_during_the_fit_gives_the_same_file(tmp_path, run_dir, engine):
    from cmdtool.distributed import prepare_sharded_store
    from cmdtool.distributed.tasks import kill_this_worker_once
    settings = FitSettings(modes=3, samples=300)
    store = prepare_sharded_store(engine, run_dir, trajectory=tmp_path / "sharded", shard_columns=200).store
    write_mode_file(tmp_path / "single.cmd.h5", fit_trajectory(store, settings, tile_columns=50))
    pids = set(engine.client.run(lambda: __import__("os").getpid()).values())
    engine.task_hook = kill_this_worker_once(str(tmp_path / "killed"))
    try:
        modes = fit_trajectory(store, settings, tile_columns=50, map_tiles=engine.map_tiles(store, 100))
    finally:
        engine.task_hook = None
    assert (tmp_path / "killed").exists()  # a worker process did die mid-fit
    write_mode_file(tmp_path / "dask.cmd.h5", modes)
    assert_same_files(tmp_path / "single.cmd.h5", tmp_path / "dask.cmd.h5")
    engine.client.wait_for_workers(2, timeout=30)
    assert set(engine.client.run(lambda: __import__("os").getpid()).values()) != pids  # the nanny restarted one
    assert_workers_keep_malloc_blocks(engine)  # a restarted worker too


def assert_workers_keep_malloc_blocks(engine) -> None:
    """Every worker process started with glibc told to keep freed blocks up to 64 MiB (no ctypes:
    the environment variables glibc reads at start, through Dask's pre-spawn setting)."""
    names = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
    seen = engine.client.run(lambda: [__import__("os").environ.get(name) for name in names])
    assert len(seen) == 2 and all(values == [str(64 * 2**20)] * 2 for values in seen.values()), seen


def test_workers_start_with_malloc_keeping_blocks(engine):
    assert_workers_keep_malloc_blocks(engine)


def test_cmd_report_with_workers_equals_the_single_process_report(tmp_path, run_dir, runner):
    pytest.importorskip("dask.distributed")
    from cmdtool.report import make_report
    cmdtool.fit(run_dir, tmp_path / "m.cmd.h5", modes=3, samples=300, trajectory=tmp_path / "single.h5")
    one = make_report(tmp_path / "m.cmd.h5", tmp_path / "one").report
    ok(cmd(runner, "report", tmp_path / "m.cmd.h5", "-o", tmp_path / "two", "--workers", "2"))
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)  # every figure, bit for bit


def test_cmd_fit_with_workers_on_the_sample_run(tmp_path, runner):
    pytest.importorskip("dask.distributed")
    ok(cmd(runner, "fit", SAMPLES, "-o", tmp_path / "one.cmd.h5", "--trajectory", tmp_path / "one.h5", "-m", "4"))
    result = ok(cmd(runner, "fit", SAMPLES, "-o", tmp_path / "two.cmd.h5", "--trajectory", tmp_path / "two",
                    "-m", "4", "--workers", "2", "--shard-columns", "5000", "--json"))
    assert json.loads(result.stdout)["trajectory"] == str(tmp_path / "two")
    assert (tmp_path / "two" / "index.h5").exists() and (tmp_path / "two" / "shard-00001.h5").exists()
    assert_same_files(tmp_path / "one.cmd.h5", tmp_path / "two.cmd.h5")


def test_unreachable_scheduler_is_one_error_line(tmp_path, runner, run_dir, monkeypatch):
    pytest.importorskip("dask.distributed")
    from cmdtool.distributed import engine
    monkeypatch.setattr(engine, "CONNECT_TIMEOUT_S", 1)
    message = error_line(cmd(runner, "fit", run_dir, "-o", tmp_path / "m.cmd.h5", "--scheduler", "tcp://127.0.0.1:9"))
    assert message.startswith("cannot reach the Dask scheduler at tcp://127.0.0.1:9")
    assert not (tmp_path / "m.cmd.h5").exists()


def test_without_dask_the_options_are_one_error_line(tmp_path, runner, run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # import fails as if not installed
    message = error_line(cmd(runner, "fit", run_dir, "-o", tmp_path / "m.cmd.h5", "--workers", "2"))
    assert message == "--workers and --scheduler need Dask: pip install 'cmd-modes[dask]'"
    message = error_line(cmd(runner, "fit", run_dir, "-o", tmp_path / "m.cmd.h5", "--workers", "2",
                             "--scheduler", "tcp://x:1"))
    assert message.startswith("give one of --workers")


def test_importing_cmdtool_does_not_import_dask():
    import subprocess
    code = "import cmdtool, cmdtool.cli, cmdtool.pipeline, cmdtool.shards, sys; print('dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_dask_fit_records_its_store_and_report_refuses_it_once_rebuilt(tmp_path, runner):
    """Issue 11's staleness check on the sharded store too: the mode file keeps the store's
    fingerprint, and a report of it refuses the store another fit rebuilt (found in review)."""
    pytest.importorskip("dask.distributed")
    from cmdtool.shards import sharded_fingerprint
    run, store = write_run(tmp_path / "run", plant(M=2, T=6).states()), tmp_path / "shared"
    old = tmp_path / "old.cmd.h5"
    ok(cmd(runner, "fit", run, "-o", old, "-m", 2, "--workers", 2, "--trajectory", store))
    with open_mode_file(old) as modes:
        assert modes.settings.trajectory_fingerprint == sharded_fingerprint(store) != ""
    write_run(run, plant(M=2, T=6, seed=9).states())  # retrained: the same names, other weights
    ok(cmd(runner, "fit", run, "-o", tmp_path / "new.cmd.h5", "-m", 2, "--workers", 2, "--trajectory", store))
    message = error_line(cmd(runner, "report", old, "-o", tmp_path / "report"))
    assert message.startswith(f"{store}: this trajectory store was rebuilt after {old} was fitted")
