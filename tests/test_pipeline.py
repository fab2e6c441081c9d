"""The library entry points: ``fit`` wires a folder to the one in-memory fit and writes its result;
``fit_trajectory`` gives the same modes from rows held in memory; settings are typed and checked
in the library's words."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

import cmdtool
from cmdtool.cli_errors import in_cli_words
from cmdtool.errors import CmdError
from cmdtool.modefile import open_mode_file, write_mode_file
from cmdtool.modes import FitMetrics, FitSettings, model_values
from cmdtool.stores import prepare_store
from cmdtool.trajectory import InMemoryTrajectory, moving_parameters, open_store


def datasets(path) -> dict:
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        out["settings"], out["metrics"] = json.loads(f.attrs["settings"]), json.loads(f.attrs["metrics"])
    return out


def assert_same_datasets(path_a, path_b) -> None:
    a, b = datasets(path_a), datasets(path_b)
    assert sorted(a) == sorted(b)
    for name in a:
        if isinstance(a[name], np.ndarray):
            assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
            assert a[name].tolist() == b[name].tolist(), name
        else:
            assert a[name] == b[name], name


def test_fit_writes_the_modes_of_fit_trajectory_and_its_settings(tmp_path, run_dir):
    out, store_path = tmp_path / "m.cmd.h5", tmp_path / "t.h5"
    result = cmdtool.fit(run_dir, out, modes=3, samples=200, seed=2, trajectory=store_path)
    assert result.mode_file == out and result.trajectory == store_path and not result.trajectory_reused
    assert result.summary == cmdtool.summarize(out)
    store_fingerprint = open_store(store_path).fingerprint  # the store fitted on (issue 11: report checks it)
    settings = FitSettings(modes=3, samples=200, seed=2, source=str(run_dir.resolve()),
                           trajectory=str(store_path.resolve()), trajectory_fingerprint=store_fingerprint)
    with open_mode_file(out) as modes:
        assert modes.settings == settings
        assert datasets(out)["settings"] == {
            "modes": 3, "samples": 200, "seed": 2, "start": None, "stop": None, "every": 1, "include": [],
            "exclude": [], "ema": False, "sampling": "layer-balanced", "source": str(run_dir.resolve()),
            "trajectory": str(store_path.resolve()), "refine": 3,  # refine: written unless 0 (the paper's)
            "trajectory_fingerprint": store_fingerprint}
    prepared = prepare_store(run_dir, trajectory=store_path)
    assert prepared.reused
    direct = tmp_path / "direct.cmd.h5"
    write_mode_file(direct, cmdtool.fit_trajectory(prepared.store, settings))
    assert_same_datasets(out, direct)


def test_fit_trajectory_of_rows_in_memory_equals_the_store(tmp_path, run_dir):
    store = prepare_store(run_dir, trajectory=tmp_path / "t.h5").store
    W = np.array(store.W)
    rows = InMemoryTrajectory(store.layout, store.time, store.names, store.infos, moving_parameters(W), W,
                              {s.name: store.carried(s.name) for s in store.layout.carried}, store.attachments())
    settings = FitSettings(modes=3)
    from_store, from_memory = cmdtool.fit_trajectory(store, settings), cmdtool.fit_trajectory(rows, settings)
    np.testing.assert_array_equal(moving_parameters(W), store.varies)
    for name in ("labels", "a", "b", "references", "reference_index", "mode_sizes"):
        np.testing.assert_array_equal(getattr(from_memory, name), getattr(from_store, name))
    assert from_memory.metrics == from_store.metrics
    # The model the modes hold: a · r(t) + b at every checkpoint, as reconstruct writes it.
    t = 7
    expected = from_store.a.astype(np.float64) * from_store.references[from_store.labels.astype(int), t] + from_store.b
    np.testing.assert_array_equal(from_store.values_at(t), expected)


def test_model_values_over_all_checkpoints_equal_one_at_a_time():
    rng = np.random.default_rng(0)
    references = rng.standard_normal((3, 6))
    labels = rng.integers(0, 3, 50).astype(np.uint8)
    a, b = rng.standard_normal(50).astype(np.float32), rng.standard_normal(50).astype(np.float32)
    everywhere = model_values(labels, a, b, references.T)
    assert everywhere.shape == (6, 50)
    for t in range(6):
        np.testing.assert_array_equal(everywhere[t], model_values(labels, a, b, references[:, t]))


@pytest.mark.parametrize("changes, parameter", [
    ({"modes": 0}, "modes"), ({"samples": -3}, "samples"), ({"every": 0}, "every"), ({"seed": -1}, "seed"),
    ({"warmup": 1}, "warmup"), ({"modes": 2.5}, "modes"), ({"start": "a"}, "start")])
def test_settings_are_checked_in_the_library_words(changes, parameter):
    with pytest.raises(CmdError) as raised:
        FitSettings(**changes)
    assert raised.value.parameter == parameter
    assert str(raised.value).startswith(f"{parameter} must be an integer")
    assert in_cli_words(raised.value).startswith(f"--{parameter} must be an integer")


def test_fit_refuses_bad_settings_before_touching_the_folder(tmp_path, run_dir):
    with pytest.raises(CmdError, match=r"^modes must be an integer of at least 1 \(got 0\)$"):
        cmdtool.fit(run_dir, tmp_path / "m.cmd.h5", modes=0, trajectory=tmp_path / "t.h5")
    assert not (tmp_path / "t.h5").exists() and not (tmp_path / "m.cmd.h5").exists()


def test_settings_and_metrics_json_round_trip_with_defaults_for_older_files():
    settings = FitSettings(modes=4, include=("*.weight",), warmup=5, source="run")
    assert FitSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings
    older = {k: v for k, v in FitSettings(modes=4).to_json().items() if k != "ema"}  # files before --ema
    assert FitSettings.from_json(older) == FitSettings(modes=4)
    assert "warmup" not in FitSettings().to_json()
    metrics = FitMetrics.of(sse=2.0, mode_sse=[1.5, 0.5], sq_norm=8.0, sq_displacement=2.0, sq_centred=4.0)
    assert (metrics.rel_error, metrics.rel_error_displacement, metrics.rel_error_centred) == (0.5, 1.0, 2 ** -0.5)
    assert FitMetrics.from_json(json.loads(json.dumps(metrics.to_json()))) == metrics
    with pytest.raises(KeyError):
        FitMetrics.from_json({"rel_error": 0.1})


def test_library_errors_name_parameters_and_the_cli_says_its_options(tmp_path, run_dir):
    """make_report speaks Python (``select``, ``evaluate``); the CLI maps both to ``--select``, ``--eval``."""
    from cmdtool.report import make_report
    out = tmp_path / "m.cmd.h5"
    cmdtool.fit(run_dir, out, modes=2, trajectory=tmp_path / "t.h5")
    with pytest.raises(CmdError) as raised:
        make_report(out, tmp_path / "report", select="accuracy")
    assert str(raised.value) == "select needs `evaluate`: it chooses checkpoints by an evaluated metric"
    assert in_cli_words(raised.value) == "--select needs --eval: it chooses checkpoints by an evaluated metric"
    with pytest.raises(CmdError) as raised:
        make_report(out, tmp_path / "report", eval_every=0)
    assert (str(raised.value), in_cli_words(raised.value)) == ("eval_every must be at least 1",
                                                                "--eval-every must be at least 1")
    assert not (tmp_path / "report").exists()


def test_settings_refuse_a_string_of_patterns_and_drop_unmodelled_with_warmup(tmp_path, run_dir):
    with pytest.raises(CmdError) as raised:
        cmdtool.fit(run_dir, tmp_path / "m.cmd.h5", include="fc.*")
    assert str(raised.value) == "include must be a list of glob patterns, not a string (got 'fc.*'; pass ['fc.*'])"
    with pytest.raises(CmdError) as raised:
        cmdtool.fit(run_dir, tmp_path / "m.cmd.h5", warmup=4, include=["fc.*"], drop_unmodelled=True)
    assert in_cli_words(raised.value) == ("--drop-unmodelled cannot be used with --warmup: online updates carry "
                                          "every tensor")
    assert not (tmp_path / "m.cmd.h5").exists()


def test_modes_auto_keeps_its_curve_through_warmup_and_update(tmp_path, run_dir):
    """The error-vs-M curve of --modes auto survives cmd fit --warmup and cmd update (found in review)."""
    warm, fitted = tmp_path / "warm.cmd.h5", tmp_path / "fitted.cmd.h5"
    cmdtool.fit(run_dir, warm, modes="auto:4", warmup=12, trajectory=tmp_path / "t.h5")
    cmdtool.fit(run_dir, fitted, modes="auto:4", stop=12, trajectory=tmp_path / "t12.h5")
    with open_mode_file(fitted) as modes:
        curve = modes.metrics.error_curve
    assert curve is not None and curve["modes"] == [1, 2, 3, 4]
    cmdtool.update(fitted, [run_dir / f"epoch_{t}.safetensors" for t in range(12, 20)])
    for path in (warm, fitted):
        with open_mode_file(path) as modes:
            assert modes.metrics.error_curve == curve and modes.T == 20


def test_modes_auto_with_too_small_a_sample_is_refused(tmp_path, run_dir):
    with pytest.raises(CmdError) as raised:
        cmdtool.fit(run_dir, tmp_path / "m.cmd.h5", modes="auto", samples=2)
    assert in_cli_words(raised.value).startswith("--modes 'auto' measures an error curve on a split of the sample, "
                                                 "which needs at least 4 parameters that move; the sample has 2 "
                                                 "(raise --samples)")


def test_select_with_candidates_only_is_refused(tmp_path, run_dir):
    from cmdtool.report import make_report
    out = tmp_path / "m.cmd.h5"
    cmdtool.fit(run_dir, out, modes=2, trajectory=tmp_path / "t.h5")
    with pytest.raises(CmdError) as raised:
        make_report(out, tmp_path / "report", evaluate=lambda state: {"val": {"s": 1.0}, "test": {"s": 1.0}},
                    select="s", candidates_only=True)
    assert in_cli_words(raised.value) == ("--select chooses among every family's checkpoints, which --candidates-only "
                                          "leaves unscored; use --eval-every to score fewer")
    assert not (tmp_path / "report").exists()
