"""cmdtool.CMD, the estimator on arrays and state dicts: planted modes found, partial_fit equal to
``cmd fit --warmup`` and ``cmd update``, reconstruct, save / load through the mode file."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cmdtool
from cmdtool.errors import CmdError
from cmdtool.estimator import NotFittedError
from helpers import cmd, ok, plant, write_run

F = 8  # warm-up rows of the online tests
DATASETS = ("a", "b", "labels", "references", "reference_offset", "reference_scale", "reference_index", "time",
            "mode_sizes", "online/first", "online/mode_sse_least_squares")


def assert_planted_modes_found(labels: np.ndarray, planted: np.ndarray) -> None:
    """The fitted modes are the planted ones up to relabelling: one-to-one, every parameter."""
    pairs = set(zip(labels.tolist(), planted.tolist()))
    assert len(pairs) == len(set(planted.tolist())) == len({m for m, _ in pairs}), sorted(pairs)


def test_fit_of_an_array_finds_the_planted_modes():
    planted = plant(M=3, T=20, noise=1e-4, seed=0)
    W = planted.W.astype(np.float32)
    fitted = cmdtool.CMD(modes=3).fit(W)
    assert fitted.n_modes_ == 3 and fitted.n_observations_ == 20
    assert_planted_modes_found(fitted.labels_, planted.labels)
    # each reference is a parameter of its own mode, and sizes count the labels
    np.testing.assert_array_equal(fitted.labels_[fitted.reference_index_], [0, 1, 2])
    np.testing.assert_array_equal(fitted.mode_sizes_, np.bincount(fitted.labels_, minlength=3))
    # the model: W ≈ a · r̃[labels] + b, r̃ normalised; b is each parameter's mean
    model = fitted.a_ * fitted.references_.astype(np.float64)[fitted.labels_].T + fitted.b_
    np.testing.assert_allclose(fitted.reconstruct(dtype=np.float64), model, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fitted.b_, W.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fitted.references_.sum(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(fitted.references_, axis=1), 1, rtol=1e-6)
    raw = fitted.references_ * fitted.reference_scale_[:, None] + fitted.reference_offset_[:, None]
    np.testing.assert_allclose(raw, W[:, fitted.reference_index_].T, rtol=1e-5, atol=1e-6)
    residual = W.astype(np.float64) - model  # the metrics use the float64 references (1e-6 apart here)
    assert fitted.rel_error_ == pytest.approx(np.sqrt((residual ** 2).sum() / (W.astype(np.float64) ** 2).sum()),
                                              rel=1e-4)
    assert fitted.rel_error_ < 1e-3  # noise 1e-4 against values of order 1


def test_fit_reads_the_array_where_it_lies_and_writes_nothing(tmp_path, monkeypatch):
    """No trajectory store (no copy in the cache) for an array in memory or a memory map."""
    for variable in ("CMDTOOL_CACHE", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    planted = plant(M=2, T=12, seed=1)
    mapped = np.lib.format.open_memmap(tmp_path / "W.npy", mode="w+", dtype=np.float32, shape=planted.W.shape)
    mapped[:] = planted.W
    mapped.flush()
    W = np.load(tmp_path / "W.npy", mmap_mode="r")
    fitted = cmdtool.CMD(modes=2, tile_columns=100).fit(W).partial_fit(W[-1] + 1, time=20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["W.npy"]
    in_memory = cmdtool.CMD(modes=2).fit(np.array(W))  # the tile width changes nothing
    for name in ("labels_", "reference_index_"):
        np.testing.assert_array_equal(getattr(in_memory, name), getattr(cmdtool.CMD(modes=2, tile_columns=100)
                                                                        .fit(W), name))
    assert fitted.n_observations_ == 13 and fitted.time_.tolist() == list(range(12)) + [20]


@pytest.mark.parametrize("kind", ["array", "state dicts"])
def test_partial_fit_equals_fit_warmup_and_cmd_update(tmp_path, runner, kind):
    """``fit`` of the first F rows and ``partial_fit`` of each later one write the mode file of
    ``cmd fit --warmup F``, and of ``cmd fit --stop F`` followed by ``cmd update`` (to 1e-9)."""
    planted = plant(M=3, T=20, noise=1e-2, seed=3)
    if kind == "array":  # a run whose checkpoints hold one tensor "w": the layout of an array's fit
        states = [{"w": torch.from_numpy(row)} for row in planted.W.astype(np.float32)]
    else:
        states = planted.states()
    run = write_run(tmp_path / "run", states)
    # the checkpoints as the fit reads them (safetensors lists tensors by name)
    observed = [load_file(run / f"epoch_{t}.safetensors") for t in range(20)]
    if kind == "array":
        observed = np.stack([state["w"].numpy() for state in observed])
    online, warm = tmp_path / "online.cmd.h5", tmp_path / "warm.cmd.h5"
    ok(cmd(runner, "fit", run, "-o", online, "-m", 3, "--warmup", F, "--trajectory", tmp_path / "all.h5"))
    ok(cmd(runner, "fit", run, "-o", warm, "-m", 3, "--stop", F, "--trajectory", tmp_path / "warm.h5"))
    ok(cmd(runner, "update", warm, run))

    estimator = cmdtool.CMD(modes=3).fit(observed[:F])
    for row in observed[F:]:
        assert estimator.partial_fit(row) is estimator
    from_scratch = cmdtool.CMD(modes=3, warmup=F)
    for row in observed:
        from_scratch.partial_fit(row)
    saved = [estimator.save(tmp_path / "estimator.cmd.h5"),
             cmdtool.CMD(modes=3, warmup=F).fit(observed).save(tmp_path / "fit_warmup.cmd.h5"),
             from_scratch.save(tmp_path / "from_scratch.cmd.h5")]
    carried = ["carried/bn.num_batches_tracked"] if kind == "state dicts" else []
    for path in saved:
        with h5py.File(path, "r") as f:
            for expected in (online, warm):
                with h5py.File(expected, "r") as g:
                    for name in (*DATASETS, *carried):
                        np.testing.assert_allclose(f[name][()], g[name][()], rtol=0, atol=1e-9, err_msg=name)
                    mine, theirs = json.loads(f.attrs["metrics"]), json.loads(g.attrs["metrics"])
                    for key in ("sse", "sq_norm", "sq_displacement", "sq_centred", "rel_error"):
                        assert mine[key] == pytest.approx(theirs[key], rel=1e-9, abs=1e-12), key
    assert cmdtool.summarize(saved[0])["online"] == {"warmup": F, "updates": 20 - F}


def test_reconstruct_shapes_and_state_dicts_equal_cmd_reconstruct(tmp_path):
    planted = plant(M=3, T=12, seed=2)
    states = planted.states()
    fitted = cmdtool.CMD(modes=3).fit(states)
    N = sum(int(np.prod(s)) for s in planted.shapes.values())
    everything = fitted.reconstruct()
    assert everything.shape == (12, N) and everything.dtype == np.float32
    assert fitted.reconstruct(0).shape == (N,)
    np.testing.assert_array_equal(fitted.reconstruct(-1), everything[-1])
    np.testing.assert_array_equal(fitted.reconstruct(3, dtype=np.float64).astype(np.float32), everything[3])
    with pytest.raises(CmdError, match=r"t 12: expected a row position from -12 to 11"):
        fitted.reconstruct(12)
    path = fitted.save(tmp_path / "fit.cmd.h5")
    for t in (0, 5, -1):
        expected = cmdtool.reconstruct(path, at=t)
        state = fitted.state_dict(t)
        assert list(state) == list(states[0])  # the state dict's own order, loadable with strict=True
        for name, tensor in expected.items():
            assert state[name].dtype == tensor.dtype
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    assert int(fitted.state_dict(5)["bn.num_batches_tracked"]) == 500  # carried verbatim
    # the modelled values follow the planted run
    flat = np.concatenate([fitted.state_dict(-1)[name].numpy().ravel() for name in planted.shapes])
    np.testing.assert_allclose(flat, planted.W[-1], atol=1e-3)


def test_a_list_of_state_dicts_finds_the_planted_modes_and_keeps_integer_buffers():
    planted = plant(M=3, T=15, noise=1e-4, seed=4)
    fitted = cmdtool.CMD(modes=3).fit(planted.states())
    assert_planted_modes_found(fitted.labels_, planted.labels)  # state-dict order is the planted order
    spec = {s.name: s for s in fitted.modes_.layout.tensors}["bn.num_batches_tracked"]
    assert not spec.modelled and spec.dtype == "int64"
    bad = planted.states()[0]
    bad["fc.bias"] = torch.zeros(3)
    with pytest.raises(CmdError, match=r"observation 15: tensor 'fc.bias' is float32 \[3\], but float32 \[10\]"):
        fitted.partial_fit(bad)


def test_save_is_read_by_cmd_info_and_load(tmp_path, runner):
    planted = plant(M=3, T=10, seed=5)
    fitted = cmdtool.CMD(modes=3, samples=300, seed=7).fit(planted.W)
    path = fitted.save(tmp_path / "array.cmd.h5")
    info = json.loads(ok(cmd(runner, "info", path, "--json")).stdout)
    assert (info["modes"], info["checkpoints"], info["parameters"]) == (3, 10, planted.W.shape[1])
    assert info["rel_error"] == fitted.rel_error_ and info["mode_sizes"] == fitted.mode_sizes_.tolist()
    assert info["settings"]["samples"] == 300 and info["settings"]["seed"] == 7
    assert info["checkpoint_names"][0] == "checkpoint_0.safetensors"
    assert "modes" in ok(cmd(runner, "info", path)).stdout
    with pytest.raises(CmdError, match="already exists"):
        fitted.save(path)
    fitted.save(path, force=True)

    loaded = cmdtool.CMD.load(path)
    assert (loaded.modes, loaded.samples, loaded.seed) == (3, 300, 7)
    for name in ("labels_", "a_", "b_", "references_", "reference_index_", "time_"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(fitted, name), err_msg=name)
    np.testing.assert_array_equal(loaded.reconstruct(), fitted.reconstruct())
    with pytest.raises(CmdError, match="needs its first observation"):
        loaded.partial_fit(planted.W[-1])  # a post-hoc fit's file does not hold the first row


def test_load_continues_an_online_fit(tmp_path):
    """A saved online fit, loaded, absorbs the later rows as the estimator that never saved did,
    up to the float32 rounding of one save (references, a and b are stored as float32)."""
    planted = plant(M=2, T=16, seed=6)
    W = planted.W.astype(np.float32)
    whole = cmdtool.CMD(modes=2, warmup=F).fit(W)
    cmdtool.CMD(modes=2, warmup=F).fit(W[:12]).save(tmp_path / "part.cmd.h5")
    resumed = cmdtool.CMD.load(tmp_path / "part.cmd.h5")
    assert resumed.warmup == F
    for t in range(12, 16):
        resumed.partial_fit(W[t])
    for name in ("labels_", "reference_index_", "time_", "mode_sizes_"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name), err_msg=name)
    for name in ("references_", "reference_offset_", "reference_scale_", "a_", "b_"):
        np.testing.assert_allclose(getattr(resumed, name), getattr(whole, name), rtol=1e-6, atol=1e-7, err_msg=name)
    assert resumed.rel_error_ == pytest.approx(whole.rel_error_, rel=1e-4)


def test_bad_input_is_a_cmd_error_naming_the_problem():
    W = plant(M=2, T=6, seed=7).W
    assert issubclass(CmdError, ValueError)
    unfitted = cmdtool.CMD(modes=2)
    assert not hasattr(unfitted, "labels_")
    with pytest.raises(NotFittedError, match="not fitted yet"):
        unfitted.reconstruct()
    with pytest.raises(CmdError, match="partial_fit needs modes first"):
        unfitted.partial_fit(W[0])
    with pytest.raises(CmdError, match=r"W must be a \(T, N\) array of floats .* \(got float64 \[970\]\)"):
        unfitted.fit(W[0])
    with pytest.raises(CmdError, match=r"W must be .* \(got float64 \[1, 970\]\)"):
        unfitted.fit(W[:1])
    with pytest.raises(CmdError, match="W: CMD needs at least 2 rows"):
        unfitted.fit(plant(M=2, T=1, seed=7).states())
    nan = W.copy()
    nan[2, 5] = np.nan
    with pytest.raises(CmdError, match="W: tensor 'w' contains NaN values"):
        unfitted.fit(nan)
    with pytest.raises(CmdError, match="modes must be an integer of at least 1"):
        cmdtool.CMD(modes=0)
    with pytest.raises(CmdError, match="modes 'many': expected a number, auto or auto:MAX"):
        cmdtool.CMD(modes="many")
    fitted = cmdtool.CMD(modes=2).fit(W, time=[0, 2, 4, 6, 8, 10])
    with pytest.raises(CmdError, match="observation 6: 969 values, the fit has 970"):
        fitted.partial_fit(W[0, :-1])
    with pytest.raises(CmdError, match="time 10: must be an integer after 10"):
        fitted.partial_fit(W[0], time=10)
    with pytest.raises(CmdError, match="time must be 6 increasing integers"):
        cmdtool.CMD(modes=2).fit(W, time=[0, 1, 1, 2, 3, 4])
    assert fitted.partial_fit(W[0]).time_[-1] == 11
    auto = cmdtool.CMD(modes="auto:4", samples=200).fit(W)
    assert 1 <= auto.n_modes_ <= 4 and auto.metrics_.error_curve["modes"] == [1, 2, 3, 4]
