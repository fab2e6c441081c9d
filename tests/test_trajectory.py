"""The trajectory store: contents, memory-mapped layout, reuse and rebuild."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import cmdtool
from cmdtool.stores import default_store_path, prepare_store
from cmdtool.trajectory import open_store
from helpers import plant, write_run


def test_store_holds_the_checkpoints_as_a_contiguous_float32_matrix(tmp_path, planted):
    run = write_run(tmp_path / "run", planted.states())
    result = cmdtool.fit(run, tmp_path / "m.cmd.h5", modes=3, trajectory=tmp_path / "traj.h5")
    store = open_store(result.trajectory)
    order = planted.permutation(store.layout)
    assert store.W.shape == planted.W.shape and store.W.dtype == np.float32
    assert np.array_equal(np.asarray(store.W), planted.W[:, order].astype(np.float32))
    assert store.time.tolist() == list(range(20))
    assert store.names[:3] == ["epoch_0.safetensors", "epoch_1.safetensors", "epoch_2.safetensors"]
    assert store.varies.all()
    assert not store.W.flags.writeable
    with h5py.File(result.trajectory, "r") as f:
        assert f["W"].chunks is None and f["W"].compression is None
    carried = store.carried("bn.num_batches_tracked").view(np.int64)[:, 0]
    assert carried.tolist() == [100 * t for t in range(20)]


def test_constant_parameters_are_flagged(tmp_path):
    planted = plant(M=2, T=6)
    planted.W[:, :5] = 0.25  # the first 5 columns (conv.weight) never move
    run = write_run(tmp_path / "run", planted.states())
    store = open_store(cmdtool.fit(run, tmp_path / "m.cmd.h5", modes=2, trajectory=tmp_path / "t.h5").trajectory)
    order = planted.permutation(store.layout)
    assert np.array_equal(store.varies, np.ptp(planted.W[:, order], axis=0) > 0)
    assert store.varies.sum() == planted.W.shape[1] - 5


def test_unchanged_folder_reuses_the_store_and_a_changed_one_rebuilds_it(tmp_path, planted):
    run = write_run(tmp_path / "run", planted.states())
    traj = tmp_path / "traj.h5"
    first = cmdtool.fit(run, tmp_path / "a.cmd.h5", modes=3, trajectory=traj)
    built_at = traj.stat().st_mtime_ns
    second = cmdtool.fit(run, tmp_path / "b.cmd.h5", modes=2, trajectory=traj)
    assert (first.trajectory_reused, second.trajectory_reused) == (False, True)
    assert traj.stat().st_mtime_ns == built_at
    assert second.summary["modes"] == 2

    # Rewrite one checkpoint with other values: the store must be rebuilt from the new data.
    state = planted.states()[5]
    state["fc.bias"] = torch.full((10,), 7.0)
    save_file(state, str(run / "epoch_5.safetensors"))
    os.utime(run / "epoch_5.safetensors", ns=(built_at + 10**9, built_at + 10**9))
    third = cmdtool.fit(run, tmp_path / "c.cmd.h5", modes=3, trajectory=traj)
    assert third.trajectory_reused is False
    store = open_store(traj)
    spec = next(s for s in store.layout.modelled if s.name == "fc.bias")
    assert (store.W[5, spec.columns] == 7.0).all()

    # A different selection of checkpoints is a different trajectory.
    fourth = cmdtool.fit(run, tmp_path / "d.cmd.h5", modes=3, trajectory=traj, every=2)
    assert fourth.trajectory_reused is False and open_store(traj).T == 10


def test_default_store_lives_in_the_cache_folder(tmp_path, planted, isolated_cache):
    run = write_run(tmp_path / "run", planted.states())
    result = cmdtool.fit(run, tmp_path / "m.cmd.h5", modes=3)
    assert result.trajectory == default_store_path(run)
    assert result.trajectory.parent == isolated_cache and result.trajectory.exists()
    assert result.trajectory.name.startswith(f"trajectory-{tmp_path.name}-run-")  # parent folder too


def test_huge_finite_weights_are_not_mistaken_for_inf(tmp_path):
    """The finiteness check sums each tensor; a sum that overflows must not refuse finite values."""
    planted = plant(M=2, T=4)
    states = planted.states()
    for state in states:
        state["fc.weight"].view(-1)[:4] = 3e38  # float32 sum overflows to inf
    run = write_run(tmp_path / "run", states)
    store = open_store(cmdtool.fit(run, tmp_path / "m.cmd.h5", modes=2, trajectory=tmp_path / "t.h5").trajectory)
    assert (np.asarray(store.W) == np.float32(3e38)).sum() == 4 * 4


def test_importing_the_cli_loads_neither_torch_nor_scipy():
    """``cmd --help``, ``cmd info`` and a fit on a reused store never need torch (over a second to
    import); scipy is imported when clustering. ``cmdtool.reconstruct`` stays the API function."""
    code = ("import sys, cmdtool.cli, cmdtool; from cmdtool import reconstruct; "
            "print('torch' in sys.modules, 'scipy' in sys.modules, callable(reconstruct), "
            "cmdtool.reconstruct is reconstruct)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "True", "True"]


def test_fitting_a_safetensors_run_never_imports_torch(run_dir, tmp_path):
    """Safetensors files of numpy dtypes are read as numpy arrays: building the store, fitting and
    reconstructing a float32 run leave torch unimported (its import alone costs over a second)."""
    code = ("import sys, cmdtool; from pathlib import Path; out = Path(sys.argv[1]); "
            "cmdtool.fit(sys.argv[2], out / 'run.cmd.h5', trajectory=out / 'store.h5'); "
            "cmdtool.reconstruct_checkpoints(out / 'run.cmd.h5', out / 'rebuilt', at='last'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(run_dir)], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False"]
    assert (tmp_path / "rebuilt" / "epoch_19.safetensors").is_file()


def test_a_checkpoint_truncated_during_ingest_is_a_cmd_error_naming_it_and_leaves_no_store(tmp_path, planted,
                                                                                              monkeypatch):
    """The ingest reads with pread, never through a memory map: a file cut short while it is read is
    one CmdError naming the file (a mapped file would have killed the process with SIGBUS)."""
    import pytest

    from cmdtool.checkpoints.safetensors_file import SafetensorsFile
    from cmdtool.errors import CmdError

    run = write_run(tmp_path / "run", planted.states())
    victim = run / "epoch_7.safetensors"
    read_into = SafetensorsFile.read_into

    def truncating(self, name, out):
        if self.path == victim:
            os.truncate(victim, victim.stat().st_size // 2)
        return read_into(self, name, out)

    monkeypatch.setattr(SafetensorsFile, "read_into", truncating)
    with pytest.raises(CmdError, match="epoch_7.safetensors: the file changed while it was read"):
        cmdtool.fit(run, tmp_path / "m.cmd.h5", modes=3, trajectory=tmp_path / "t.h5")
    assert not (tmp_path / "t.h5").exists() and not (tmp_path / "m.cmd.h5").exists()
    assert not list(tmp_path.glob(".t.h5*"))


def test_the_store_reserves_its_rows_and_maps_varies(tmp_path, planted):
    store = open_store(cmdtool.fit(write_run(tmp_path / "run", planted.states()), tmp_path / "m.cmd.h5", modes=3,
                                   trajectory=tmp_path / "t.h5").trajectory)
    assert isinstance(store.varies, np.memmap) and not store.varies.flags.writeable
    assert os.stat(tmp_path / "t.h5").st_blocks * 512 >= store.W.nbytes  # allocated, not a sparse hole


def _widened(store):
    """The store's rows as float32 in memory: what a float32 store of the same run holds."""
    from cmdtool.trajectory import InMemoryTrajectory, moving_parameters
    W = np.asarray(store.W)
    return InMemoryTrajectory(store.layout, store.time, store.names, store.infos, moving_parameters(W), W,
                              {s.name: store.carried(s.name) for s in store.layout.carried}, store.attachments())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_run_is_stored_in_16_bits_and_fits_as_if_widened(tmp_path, planted, dtype):
    from cmdtool.fitting import fit_to_file
    from cmdtool.modes import FitSettings

    states = planted.states(dtype)
    store = prepare_store(write_run(tmp_path / "run", states), trajectory=tmp_path / "t.h5").store
    T, N = store.T, store.N
    with h5py.File(tmp_path / "t.h5") as f:
        assert f["W"].dtype == (np.uint16 if dtype == torch.bfloat16 else np.float16)
        assert f.attrs["W_dtype"] == str(dtype).removeprefix("torch.")
        assert f["W"].id.get_storage_size() == 2 * T * N  # half of float32's
    # read back as float32: each checkpoint's values widened exactly
    for t in (0, T - 1):
        expected = np.concatenate([states[t][spec.name].float().numpy().ravel() for spec in store.layout.modelled])
        np.testing.assert_array_equal(store.W[t], expected)
        assert store.W[t].dtype == np.float32
    widened = _widened(store)
    columns = np.array([0, 5, N - 1])
    np.testing.assert_array_equal(store.columns(columns), widened.W[:, columns])
    settings = FitSettings(modes=3, samples=200)
    fit_to_file(store, settings, tmp_path / "16.cmd.h5", tile_columns=50)
    fit_to_file(widened, settings, tmp_path / "32.cmd.h5", tile_columns=50)
    assert (tmp_path / "16.cmd.h5").read_bytes() == (tmp_path / "32.cmd.h5").read_bytes()


def test_a_run_of_mixed_float_dtypes_is_stored_as_float32(tmp_path, planted):
    states = planted.states(torch.bfloat16)
    for state in states:
        state["fc.bias"] = state["fc.bias"].float()
    store = prepare_store(write_run(tmp_path / "run", states), trajectory=tmp_path / "t.h5").store
    with h5py.File(tmp_path / "t.h5") as f:
        assert f["W"].dtype == np.float32 and f.attrs["W_dtype"] == "float32"
    np.testing.assert_array_equal(store.W[3][:8], states[3]["bn.running_mean"].float().numpy())


@pytest.mark.parametrize("fmt, dtype", [("safetensors", torch.float32), ("safetensors", torch.bfloat16),
                                        ("torch", torch.float32)])
def test_tensors_read_in_spans_give_the_same_store(tmp_path, planted, monkeypatch, fmt, dtype):
    """build_store reads big tensors SPAN values at a time: the same W and varies as whole-tensor reads,
    including which parameters are constant (some of conv.weight and all of fc.bias here)."""
    import cmdtool.trajectory as trajectory

    states = planted.states(dtype)
    for state in states[1:]:
        state["conv.weight"].view(-1)[5:40] = states[0]["conv.weight"].view(-1)[5:40]
        state["fc.bias"] = states[0]["fc.bias"].clone()
    run = write_run(tmp_path / "run", states, fmt=fmt)
    whole = prepare_store(run, trajectory=tmp_path / "whole.h5").store
    monkeypatch.setattr(trajectory, "SPAN", 7)
    spans = prepare_store(run, trajectory=tmp_path / "spans.h5").store
    assert np.asarray(spans.W).tobytes() == np.asarray(whole.W).tobytes()
    np.testing.assert_array_equal(spans.varies, whole.varies)
    np.testing.assert_array_equal(spans.varies, (np.asarray(whole.W)[1:] != np.asarray(whole.W)[0]).any(axis=0))
    assert 0 < np.count_nonzero(~spans.varies) == 35 + 10


def test_a_bfloat16_store_warm_up_reads_row_slices_lazily_and_fits_as_widened(tmp_path, planted):
    from cmdtool.modefile import write_mode_file
    from cmdtool.modes import FitSettings
    from cmdtool.online import fit_warmup
    from cmdtool.trajectory import EncodedRows

    store = prepare_store(write_run(tmp_path / "run", planted.states(torch.bfloat16)),
                          trajectory=tmp_path / "t.h5").store
    head = store.W[:5]
    assert isinstance(head, EncodedRows) and head.shape == (5, store.N)  # not decoded until indexed
    np.testing.assert_array_equal(np.asarray(head), np.asarray(store.W)[:5])
    np.testing.assert_array_equal(head.astype(np.float64), np.asarray(store.W)[:5].astype(np.float64))
    settings = FitSettings(modes=3, samples=200, warmup=8)
    write_mode_file(tmp_path / "16.cmd.h5", fit_warmup(store, settings, tile_columns=50))
    write_mode_file(tmp_path / "32.cmd.h5", fit_warmup(_widened(store), settings, tile_columns=50))
    assert (tmp_path / "16.cmd.h5").read_bytes() == (tmp_path / "32.cmd.h5").read_bytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_16_bit_elements_are_checked_and_compared_as_numbers_without_widening(tmp_path, planted, dtype, fmt):
    """A 16-bit safetensors run is read, checked and compared as stored (``read_stored``), a torch
    file through float32: both flag the same constant parameters (+0 and −0 are one number) and
    refuse the same NaN and Inf, with the same message."""
    from cmdtool.errors import CmdError

    states = planted.states(dtype)
    conv = [s["conv.weight"].view(-1) for s in states]
    for t, flat in enumerate(conv):
        flat[:4] = 0.0 if t % 2 == 0 else -0.0  # zero of either sign: constant
        flat[4] = 1.5                            # constant
        flat[5] = 0.0 if t < 3 else 2.0 ** -120  # zero, then the smallest moves: varies
    store = prepare_store(write_run(tmp_path / "run", states, fmt=fmt), trajectory=tmp_path / "t.h5").store
    W = np.asarray(store.W)
    np.testing.assert_array_equal(store.varies, (W[1:] != W[0]).any(axis=0))
    start = next(spec.offset for spec in store.layout.modelled if spec.name == "conv.weight")
    assert store.varies[start:start + 6].tolist() == [False] * 5 + [dtype == torch.bfloat16]  # 2**-120 is 0 in fp16
    for bad, word in ((float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")):
        broken = [dict(s) for s in states]
        broken[3]["conv.weight"] = states[3]["conv.weight"].clone()
        broken[3]["conv.weight"].view(-1)[7] = bad
        run = write_run(tmp_path / f"bad-{word}-{bad}", broken, fmt=fmt)
        with pytest.raises(CmdError, match=rf"epoch_3\.\S+: tensor 'conv\.weight' contains {word} values"):
            prepare_store(run, trajectory=tmp_path / f"bad-{word}.h5")


def test_ingest_reads_ahead_in_order_without_reusing_a_buffer_in_use():
    """The ingest's reading thread fills buffers ahead of the writes: each job's buffer still holds
    that job when the caller gets it, jobs come in order, and a read's error is raised in its turn."""
    import time

    from cmdtool.trajectory import _read_ahead

    buffers = [np.zeros(1) for _ in range(3)]

    def read(job, buffer):
        time.sleep(0.002 * (job % 3))
        buffer[0] = job
        return buffer

    seen = []
    for job, buffer in _read_ahead(read, list(range(30)), buffers):
        time.sleep(0.003)  # the caller is slower: the reader waits for a free buffer, never takes this one
        assert buffer[0] == job
        seen.append(job)
    assert seen == list(range(30))

    started = []

    def failing(job, buffer):
        started.append(job)
        if job == 4:
            raise ValueError("four")
        return job

    got = []
    with pytest.raises(ValueError, match="four"):
        for job, value in _read_ahead(failing, list(range(100)), buffers):
            got.append(value)
    assert got == [0, 1, 2, 3] and max(started) <= 4 + len(buffers) - 1
