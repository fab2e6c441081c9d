"""``cmd report`` end to end on a small planted run: every report.json number against an independent
numpy computation from the checkpoints and ``cmdtool.reconstruct``, the PCA baseline against a dense
SVD, the weight-averaging candidates and ``--eval``, CI thresholds and exit codes, and the outputs
(self-contained HTML, PNG plots, Markdown, step summary, ``--json``)."""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import h5py
import jsonschema
import matplotlib.image
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import cmdtool
from cmdtool.cli_errors import in_cli_words
from cmdtool.errors import CmdError
from cmdtool.modefile import open_mode_file
from cmdtool.report import parse_requirement
from helpers import cmd, error_line, ok, plant, write_run

T, M, EMA_DECAY, TAILS = 12, 3, 0.7, (5, 10, 30)  # tail 30 > T: the mean of all checkpoints

# The --eval function: a checksum of exactly the weights it is given, so every evaluated state dict
# can be identified (which values, which integer buffer, which dtype).
EVALUATE = '''
import torch


def evaluate(state):
    floats = [state[k] for k in sorted(state) if state[k].is_floating_point()]
    return {"sum": float(sum(t.double().sum() for t in floats)),
            "fc": float(state["fc.weight"][0, 0]),
            "steps": float(state["bn.num_batches_tracked"]),
            "steps_int64": float(state["bn.num_batches_tracked"].dtype == torch.int64)}
'''
_namespace: dict = {}
exec(EVALUATE, _namespace)
checksum = _namespace["evaluate"]


REPORT_SCHEMA = json.loads((Path(__file__).parents[1] / "docs" / "formats" / "report.schema.json").read_text())


def read_report(folder: Path) -> dict:
    """report.json of a report folder, checked against the published JSON Schema of the format."""
    report = json.loads((folder / "report.json").read_text())
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(report)
    return report


def assert_no_report(folder: Path) -> None:
    assert not folder.exists(), f"{folder} was written"
    assert sorted(folder.parent.rglob(".*.tmp")) == [] and sorted(folder.parent.rglob(".*.old")) == []


def state_of(flat: np.ndarray, layout, last: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict from flat modelled values (cast to float32, as the checkpoints are); integer
    buffers copied from ``last``."""
    state = {spec.name: torch.from_numpy(flat[spec.columns].reshape(spec.shape).astype(np.float32))
             for spec in layout.modelled}
    state.update({spec.name: last[spec.name].clone() for spec in layout.carried})
    return state


@dataclass
class Fitted:
    folder: Path
    run: Path
    mode_file: Path
    store: Path
    evaluate_file: Path
    planted_labels: np.ndarray  # (N,) planted mode of each column, in the mode file's column order
    checkpoints: list[dict[str, torch.Tensor]]  # as read back from the files
    layout: object
    W: np.ndarray          # (T, N) float64 of the float32 checkpoint values, in the mode file's column order
    W_hat: np.ndarray      # (T, N) a·r(t) + b in float64 from the mode file's datasets
    W_cmd: np.ndarray      # (T, N) cmdtool.reconstruct(at=t), as float64
    evaluated: Path        # report with --eval, --tail 5 10 30, --ema-decay 0.7, --json
    evaluated_stdout: str
    plain: Path            # report without --eval


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Fitted:
    return fit_and_report(tmp_path_factory.mktemp("report"))


def fit_and_report(folder: Path) -> Fitted:
    """One planted run (T = 12, M = 3, one constant parameter), fitted once, reported twice."""
    planted = plant(M=M, T=T, noise=1e-3, seed=1)
    planted.W[:, 5] = 0.25  # a constant parameter: no correlation, left out of mean |corr|
    run = write_run(folder / "run", planted.states())
    mode_file, store, evaluate_file = folder / "modes.cmd.h5", folder / "traj.h5", folder / "checksum.py"
    evaluate_file.write_text(EVALUATE)
    runner = CliRunner()
    ok(cmd(runner, "fit", run, "-o", mode_file, "-m", M, "--trajectory", store))
    tails = [arg for k in TAILS for arg in ("--tail", k)]
    evaluated = ok(cmd(runner, "report", mode_file, "-o", folder / "evaluated", "--eval", f"{evaluate_file}:evaluate",
                       *tails, "--ema-decay", EMA_DECAY, "--json"))
    ok(cmd(runner, "report", mode_file, "-o", folder / "plain"))

    checkpoints = [load_file(str(run / f"epoch_{t}.safetensors")) for t in range(T)]
    with open_mode_file(mode_file) as modes:
        layout = modes.layout
    W = np.stack([np.concatenate([c[s.name].numpy().astype(np.float64).ravel() for s in layout.modelled])
                  for c in checkpoints])
    with h5py.File(mode_file, "r") as f:
        W_hat = f["a"][()].astype(np.float64) * f["references"][()].astype(np.float64)[f["labels"][()]].T + f["b"][()]
    W_cmd = np.stack([np.concatenate([state[s.name].numpy().astype(np.float64).ravel() for s in layout.modelled])
                      for state in (cmdtool.reconstruct(mode_file, at=t) for t in range(T))])
    planted_labels = planted.labels[planted.permutation(layout)]
    return Fitted(folder, run, mode_file, store, evaluate_file, planted_labels, checkpoints, layout, W, W_hat, W_cmd,
                  folder / "evaluated", evaluated.stdout, folder / "plain")


def norm_ratio(error: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(error) / np.linalg.norm(reference))


# 1. report.json: every field, against an independent computation

def test_report_json_has_every_field(fitted):
    r = read_report(fitted.evaluated)
    assert list(r) == ["format", "format_version", "tool_version", "verdict", "mode_file", "trajectory", "run", "fit",
                       "compactness", "per_checkpoint", "per_tensor", "modes", "baselines", "evaluation",
                       "thresholds", "passed", "plots", "notes", "online", "embedding"]
    assert r["online"] is None  # a post-hoc fit
    assert (r["format"], r["format_version"], r["tool_version"]) == ("cmdtool-report", 1, cmdtool.__version__)
    summary = cmdtool.summarize(fitted.mode_file)
    assert r["mode_file"] == {"path": str(fitted.mode_file), "format_version": 1,
                              "tool_version": cmdtool.__version__, "settings": summary["settings"]}
    assert r["trajectory"] == {"kind": "trajectory store", "checkpoints": str(fitted.run.resolve()),
                               "trajectory": str(fitted.store.resolve()), "trajectory_reused": True}
    N = fitted.W.shape[1]
    assert r["run"] == {"checkpoints": T, "parameters": N, "modes": M, "tensors_modelled": 6, "tensors_carried": 1}
    assert r["per_checkpoint"]["name"] == [f"epoch_{t}.safetensors" for t in range(T)]
    assert r["per_checkpoint"]["time"] == list(range(T))
    assert list(r["per_checkpoint"]) == ["name", "time", "cmd", "pca_1", "pca_2"]
    assert r["thresholds"] == [] and r["passed"] is True
    assert list(r["evaluation"]) == ["function", "checkpoint_names", "per_checkpoint", "candidates",
                                     "candidate_descriptions", "epochs", "evaluations", "per_epoch",
                                     "family_descriptions", "selection", "selection_impossible", "counts",
                                     "recalibrated", "ema_decay", "clamped_running_var"]
    assert any("BatchNorm running statistics (1 tensor)" in note and "not recalibrated" in note for note in r["notes"])
    assert len(read_report(fitted.plain)["notes"]) == 1  # no evaluation: nothing about BatchNorm or scores
    assert read_report(fitted.plain)["evaluation"] is None


def test_fit_errors_per_checkpoint_and_overall(fitted):
    r = read_report(fitted.evaluated)
    W, W_hat, W_cmd = fitted.W, fitted.W_hat, fitted.W_cmd
    # What cmd reconstruct writes is the float64 reconstruction cast to float32; the report measures the
    # float64 one (exactly), and the float32 rounding moves the errors by under 1e-6 relative.
    np.testing.assert_array_equal(W_cmd, W_hat.astype(np.float32))
    cmd_errors = r["per_checkpoint"]["cmd"]
    assert cmd_errors["rel_error_displacement"][0] is None  # ‖w_0 − w_0‖ = 0
    for t in range(T):
        assert cmd_errors["rel_error"][t] == pytest.approx(norm_ratio(W[t] - W_hat[t], W[t]), rel=1e-9)
        assert cmd_errors["rel_error"][t] == pytest.approx(norm_ratio(W[t] - W_cmd[t], W[t]), rel=1e-5)
        if t:
            assert cmd_errors["rel_error_displacement"][t] == pytest.approx(
                norm_ratio(W[t] - W_hat[t], W[t] - W[0]), rel=1e-9)
            assert cmd_errors["rel_error_displacement"][t] == pytest.approx(
                norm_ratio(W[t] - W_cmd[t], W[t] - W[0]), rel=1e-5)
    assert r["fit"]["rel_error"] == pytest.approx(norm_ratio(W - W_hat, W), rel=1e-9)
    assert r["fit"]["rel_error_displacement"] == pytest.approx(norm_ratio(W - W_hat, W - W[0]), rel=1e-9)
    assert r["fit"]["rel_error"] == pytest.approx(norm_ratio(W - W_cmd, W), rel=1e-5)
    assert r["fit"]["rel_error"] < 2e-3  # planted noise 1e-3: the three modes explain the run


def test_per_tensor_errors(fitted):
    r = read_report(fitted.evaluated)
    W, W_hat = fitted.W, fitted.W_hat
    assert [row["name"] for row in r["per_tensor"]] == [s.name for s in fitted.layout.modelled]
    assert {row["name"] for row in r["per_tensor"]} == set(fitted.checkpoints[0]) - {"bn.num_batches_tracked"}
    for row, spec in zip(r["per_tensor"], fitted.layout.modelled):
        w, error = W[:, spec.columns], (W - W_hat)[:, spec.columns]
        assert row["shape"] == list(fitted.checkpoints[0][spec.name].shape)
        assert row["parameters"] == fitted.checkpoints[0][spec.name].numel()
        assert row["rel_error"] == pytest.approx(norm_ratio(error, w), rel=1e-9)
        assert row["rel_error_displacement"] == pytest.approx(norm_ratio(error, w - w[0]), rel=1e-9)
        assert row["rel_error_last"] == pytest.approx(norm_ratio(error[-1], w[-1]), rel=1e-9)
        assert row["rel_error_displacement_last"] == pytest.approx(norm_ratio(error[-1], w[-1] - w[0]), rel=1e-9)


def test_modes_sizes_correlation_layers(fitted):
    r = read_report(fitted.evaluated)
    W, N = fitted.W, fitted.W.shape[1]
    with h5py.File(fitted.mode_file, "r") as f:
        labels, reference_index = f["labels"][()].astype(int), f["reference_index"][()]
    constant = np.ptp(W, axis=0) == 0
    assert constant.sum() == 1
    assert [m["mode"] for m in r["modes"]] == list(range(M))
    for m, row in enumerate(r["modes"]):
        members = np.flatnonzero(labels == m)
        assert row["parameters"] == len(members) and row["share"] == pytest.approx(len(members) / N, rel=1e-12)
        reference = W[:, reference_index[m]]  # the raw reference trajectory
        moving = [i for i in members if not constant[i]]
        mean_abs_corr = np.mean([abs(np.corrcoef(W[:, i], reference)[0, 1]) for i in moving])
        assert row["mean_abs_corr"] == pytest.approx(mean_abs_corr, rel=1e-6)
        assert row["mean_abs_corr"] > 0.99  # planted: members are affine copies of their reference
        assert row["constant_members"] == int(constant[members].sum())
        column = int(reference_index[m])
        spec = next(s for s in fitted.layout.modelled if s.offset <= column < s.offset + s.size)
        index = np.unravel_index(column - spec.offset, spec.shape)
        assert row["reference"] == {"tensor": spec.name, "index": [int(i) for i in index], "column": column}
        assert fitted.checkpoints[-1][spec.name][index].item() == W[-1, column]
        assert row["layers"] == {s.name: int(np.sum(labels[s.columns] == m)) for s in fitted.layout.modelled}
    assert sum(row["constant_members"] for row in r["modes"]) == 1
    # The planted modes, recovered: the same partition of the parameters (the constant one aside).
    planted = fitted.planted_labels
    for row in r["modes"]:
        members = (labels == row["mode"]) & ~constant
        assert len(np.unique(planted[members])) == 1
        assert members.sum() == np.sum((planted == planted[members][0]) & ~constant)
    assert all(row["layers"]["fc.weight"] > 0 and row["layers"]["conv.weight"] > 0 for row in r["modes"])


def test_compactness(fitted):
    r = read_report(fitted.evaluated)
    N = fitted.W.shape[1]
    size = fitted.mode_file.stat().st_size
    carried = T * 8  # bn.num_batches_tracked, one int64 per checkpoint, carried verbatim
    modelled = pytest.approx(4 * N * T / (size - carried), rel=1e-12)  # float32 checkpoints: the same ratio
    assert r["compactness"] == {"mode_file_bytes": size, "checkpoint_bytes_float32": 4 * N * T,
                                "compression_ratio": pytest.approx(4 * N * T / size, rel=1e-12),
                                "carried_bytes": carried, "carried_tensors": 1, "dropped_tensors": [],
                                "modelled_bytes": size - carried,
                                "compression_ratio_modelled": pytest.approx(4 * N * T / (size - carried), rel=1e-12),
                                "checkpoint_bytes_modelled": 4 * N * T, "checkpoint_dtypes": ["float32"],
                                "compression_ratio_modelled_checkpoint_bytes": modelled}


# 2. PCA of the trajectory

def dense_pca(W: np.ndarray, d: int) -> np.ndarray:
    """Mean + d principal directions of the checkpoints, from a dense SVD: the (T, N) approximation."""
    mean = W.mean(axis=0)
    U, S, Vt = np.linalg.svd(W - mean, full_matrices=False)
    return mean + (U[:, :d] * S[:d]) @ Vt[:d]


def test_pca_baseline_equals_dense_svd(fitted):
    r = read_report(fitted.evaluated)
    W, N = fitted.W, fitted.W.shape[1]
    S = np.linalg.svd(W - W.mean(axis=0), compute_uv=False)
    assert [p["name"] for p in r["baselines"]["pca"]] == ["pca_1", "pca_2"]
    for p in r["baselines"]["pca"]:
        d = p["d"]
        approximation = dense_pca(W, d)
        assert p["floats_stored"] == (d + 1) * N + d * T and p["bytes_float32"] == 4 * p["floats_stored"]
        assert p["rel_error"] == pytest.approx(norm_ratio(W - approximation, W), rel=1e-6)
        assert p["rel_error_displacement"] == pytest.approx(norm_ratio(W - approximation, W - W[0]), rel=1e-6)
        assert p["explained_variance"] == pytest.approx((S[:d] ** 2).sum() / (S ** 2).sum(), rel=1e-9)
        per_checkpoint = r["per_checkpoint"][f"pca_{d}"]
        assert per_checkpoint["rel_error_displacement"][0] is None
        for t in range(T):
            assert per_checkpoint["rel_error"][t] == pytest.approx(norm_ratio(W[t] - approximation[t], W[t]), rel=1e-6)
            if t:
                assert per_checkpoint["rel_error_displacement"][t] == pytest.approx(
                    norm_ratio(W[t] - approximation[t], W[t] - W[0]), rel=1e-6)
    # CMD's 2 numbers per parameter beat PCA's on a run of 3 planted modes.
    assert r["fit"]["rel_error"] < r["baselines"]["pca"][1]["rel_error"] < r["baselines"]["pca"][0]["rel_error"]


def test_pca_weights_at_reproduce_the_svd_reconstruction(fitted):
    from cmdtool.report.metrics import pca_from_gram
    W = fitted.W
    centred = W - W.mean(axis=0)
    pca = pca_from_gram(centred @ centred.T)
    for d in (1, 2):
        approximation = dense_pca(W, d)
        for t in range(T):
            np.testing.assert_allclose(pca.weights_at(d, t) @ W, approximation[t], rtol=1e-7, atol=1e-9)


# 3. --eval: per-checkpoint metrics and the final candidates

def averaged(fitted, weights: np.ndarray) -> dict:
    """The candidate ``Σ_t weights[t] w(t)``, computed directly, integer buffers from the last checkpoint."""
    return checksum(state_of(weights @ fitted.W, fitted.layout, fitted.checkpoints[-1]))


def expected_candidates(fitted, decay: float, tails) -> dict:
    W = fitted.W
    ema = W[0].copy()
    for t in range(1, T):
        ema = decay * ema + (1 - decay) * W[t]
    out = {"last": checksum(fitted.checkpoints[-1]), "cmd": checksum(cmdtool.reconstruct(fitted.mode_file, at="last"))}
    for k in tails:
        out[f"tail_{k}"] = checksum(state_of(W[-min(k, T):].mean(axis=0), fitted.layout, fitted.checkpoints[-1]))
    out["ema"] = checksum(state_of(ema, fitted.layout, fitted.checkpoints[-1]))
    for d in (1, 2):
        out[f"pca_{d}"] = checksum(state_of(dense_pca(W, d)[-1], fitted.layout, fitted.checkpoints[-1]))
    return out


def assert_candidates(candidates: dict, expected: dict) -> None:
    assert list(candidates) == list(expected)
    for name, scores in expected.items():
        assert candidates[name]["steps"] == 100 * (T - 1), name  # integer buffers: the last checkpoint's
        assert candidates[name]["steps_int64"] == 1.0, name
        for key in ("sum", "fc"):
            assert candidates[name][key] == pytest.approx(scores[key], rel=1e-6, abs=1e-5), (name, key)


def test_evaluation_per_checkpoint_original_and_cmd(fitted):
    evaluation = read_report(fitted.evaluated)["evaluation"]
    assert evaluation["function"] == f"{fitted.evaluate_file}:evaluate"
    assert evaluation["checkpoint_names"] == [f"epoch_{t}.safetensors" for t in range(T)]
    original, reconstructed = evaluation["per_checkpoint"]["original"], evaluation["per_checkpoint"]["cmd"]
    assert list(original) == list(reconstructed) == ["sum", "fc", "steps", "steps_int64"]
    for t in range(T):
        direct = checksum(fitted.checkpoints[t])
        assert {k: v[t] for k, v in original.items()} == direct  # exactly the checkpoint's weights
        assert {k: v[t] for k, v in reconstructed.items()} == checksum(cmdtool.reconstruct(fitted.mode_file, at=t))
        assert direct["steps"] == 100 * t
    assert original["sum"] != reconstructed["sum"]  # they are different weights


def test_final_candidates_equal_direct_averages(fitted):
    evaluation = read_report(fitted.evaluated)["evaluation"]
    expected = expected_candidates(fitted, EMA_DECAY, TAILS)
    assert_candidates(evaluation["candidates"], expected)
    assert evaluation["candidates"]["tail_30"] == pytest.approx(checksum(
        state_of(fitted.W.mean(axis=0), fitted.layout, fitted.checkpoints[-1])), rel=1e-6, abs=1e-5)
    sums = [scores["sum"] for scores in evaluation["candidates"].values()]
    assert len({round(s, 3) for s in sums}) == len(sums)  # every candidate is a different set of weights
    assert evaluation["candidate_descriptions"] == {
        "last": "the last checkpoint (epoch_11.safetensors)", "cmd": "CMD reconstruction of the last checkpoint",
        "tail_5": "mean of the last 5 checkpoints", "tail_10": "mean of the last 10 checkpoints",
        "tail_30": "mean of the last 30 checkpoints (all 12: the run has fewer)",
        "ema": "EMA over checkpoints, decay 0.7",
        "pca_1": "PCA of the trajectory, mean + 1 direction, at the last checkpoint",
        "pca_2": "PCA of the trajectory, mean + 2 directions, at the last checkpoint"}


def test_eval_module_function_form_with_default_tails(fitted, runner, tmp_path, monkeypatch):
    """``--eval module:function`` imports from the current folder, like ``python -m``."""
    module = "cmdtool_test_report_checksum"
    (tmp_path / f"{module}.py").write_text(EVALUATE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        ok(cmd(runner, "report", fitted.mode_file, "-o", tmp_path / "out", "--eval", f"{module}:evaluate"))
    finally:
        sys.modules.pop(module, None)
    r = read_report(tmp_path / "out")
    assert r["evaluation"]["function"] == f"{module}:evaluate"
    assert r["evaluation"]["per_checkpoint"] == read_report(fitted.evaluated)["evaluation"]["per_checkpoint"]
    assert_candidates(r["evaluation"]["candidates"], expected_candidates(fitted, 0.9, (5, 10)))


# 4. thresholds: exit 0 / 1

def test_thresholds_at_the_measured_values_pass(fitted, runner, tmp_path):
    r = read_report(fitted.evaluated)
    error, displacement = r["fit"]["rel_error"], r["fit"]["rel_error_displacement"]
    total = r["evaluation"]["candidates"]["cmd"]["sum"]
    result = ok(
        cmd(
            runner,
            "report",
            fitted.mode_file,
            "-o",
            tmp_path / "out",
            "--eval",
            f"{fitted.evaluate_file}:evaluate",
            "--max-rel-error",
            repr(error),
            "--max-rel-error-displacement",
            repr(displacement),
            "--require",
            f"sum>={total!r}",
            "--require",
            "steps<=1100",
        )
    )
    assert "threshold failed" not in result.stderr
    report = read_report(tmp_path / "out")
    assert report["passed"] is True
    assert [
        (t["option"], t["metric"], t["op"], t["threshold"], t["value"], t["passed"]) for t in report["thresholds"]
    ] == [
        (f"--max-rel-error {error!r}", "rel_error", "<=", error, error, True),
        (
            f"--max-rel-error-displacement {displacement!r}",
            "rel_error_displacement",
            "<=",
            displacement,
            displacement,
            True,
        ),
        (f"--require sum>={total!r}", "sum", ">=", total, total, True),
        ("--require steps<=1100", "steps", "<=", 1100.0, 1100.0, True),
    ]
    assert result.stdout.count("pass: ") == 4


def test_thresholds_just_past_the_measured_values_fail(fitted, runner, tmp_path):
    r = read_report(fitted.evaluated)
    error, displacement = r["fit"]["rel_error"], r["fit"]["rel_error_displacement"]
    total = r["evaluation"]["candidates"]["cmd"]["sum"]
    below, below_displacement = np.nextafter(error, 0), np.nextafter(displacement, 0)
    above_total = np.nextafter(total, math.inf)
    result = cmd(
        runner,
        "report",
        fitted.mode_file,
        "-o",
        tmp_path / "out",
        "--eval",
        f"{fitted.evaluate_file}:evaluate",
        "--max-rel-error",
        repr(float(below)),
        "--max-rel-error-displacement",
        repr(float(below_displacement)),
        "--require",
        f"sum>={float(above_total)!r}",
        "--require",
        "steps<=1099.5",
    )
    assert result.exit_code == 1, result.output
    failed = [line for line in result.stderr.splitlines() if line.startswith("threshold failed")]
    assert failed == [  # the exact value compared, and the threshold as given
        f"threshold failed: rel_error = {error!r}, required <= {float(below)!r} (--max-rel-error {float(below)!r})",
        f"threshold failed: rel_error_displacement = {displacement!r}, required <= {float(below_displacement)!r} "
        f"(--max-rel-error-displacement {float(below_displacement)!r})",
        f"threshold failed: sum = {total!r}, required >= {float(above_total)!r} (--require "
        f"sum>={float(above_total)!r})",
        "threshold failed: steps = 1100.0, required <= 1099.5 (--require steps<=1099.5)",
    ]
    for name in ("report.json", "report.md", "report.html"):  # the report is written all the same
        assert (tmp_path / "out" / name).is_file()
    report = read_report(tmp_path / "out")
    assert report["passed"] is False and [t["passed"] for t in report["thresholds"]] == [False] * 4
    assert report["fit"] == r["fit"]


def test_one_failed_threshold_fails_the_run(fitted, runner, tmp_path):
    error = read_report(fitted.plain)["fit"]["rel_error"]
    result = cmd(
        runner,
        "report",
        fitted.mode_file,
        "-o",
        tmp_path / "out",
        "--max-rel-error",
        "0.5",
        "--max-rel-error-displacement",
        "1e-9",
    )
    assert result.exit_code == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("threshold failed")] == [
        "threshold failed: rel_error_displacement = "
        f"{read_report(tmp_path / 'out')['fit']['rel_error_displacement']!r}, "
        "required <= 1e-09 (--max-rel-error-displacement 1e-09)"
    ]
    report = read_report(tmp_path / "out")
    assert [t["passed"] for t in report["thresholds"]] == [True, False] and report["passed"] is False
    assert report["thresholds"][0]["value"] == error


@pytest.mark.parametrize("text, expected", [
    ("accuracy>=0.9", ("--require accuracy>=0.9", "accuracy", ">=", 0.9)),
    (" loss <= 1e-2 ", ("--require loss <= 1e-2", "loss", "<=", 0.01)),
    ("x<3", ("--require x<3", "x", "<", 3.0)),
])
def test_parse_requirement(text, expected):
    assert tuple(parse_requirement(text)) == expected


@pytest.mark.parametrize("text", ["top1>-inf", "s<inf", "s<Infinity", "s>nan", "s<1e999"])
def test_requirement_threshold_must_be_finite(text):
    """An infinite threshold cannot be written into report.json and compares nothing (issue 11)."""
    with pytest.raises(CmdError) as caught:
        parse_requirement(text)
    assert str(caught.value) == f"require {text!r}: the threshold must be a finite number"  # the library's words
    assert in_cli_words(caught.value) == f"--require {text!r}: the threshold must be a finite number"


# 5. bad input: exit 2, one error line, no report folder

BAD_EVALUATIONS = {
    "raises.py": "def evaluate(state):\n    raise ValueError('bad weights')\n",
    "listing.py": "def evaluate(state):\n    return [1.0]\n",
    "empty.py": "def evaluate(state):\n    return {}\n",
    "words.py": "def evaluate(state):\n    return {'acc': 'high'}\n",
    "broken.py": "raise RuntimeError('boom at import')\n",
}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--require", "sum>=0"], "--require needs --eval: it checks a metric of the evaluated CMD weights"),
        (
            ["--eval", "{checksum}:evaluate", "--require", "accuracy>=0.5"],
            "--require accuracy>=0.5: the evaluation has no metric 'accuracy' "
            "(it returned fc, steps, steps_int64, sum)",
        ),
        (["--require", "sum=>0"], "--require 'sum=>0': expected METRIC>=VALUE (or <=, >, <), e.g. accuracy>=0.9"),
        (["--require", "sum>=1.2.3"], "--require 'sum>=1.2.3': '1.2.3' is not a number"),
        (["--eval", "evaluate"], "--eval 'evaluate': expected module:function or path.py:function"),
        (
            ["--eval", "{tmp}/missing.py:evaluate"],
            "--eval '{tmp}/missing.py:evaluate': {tmp}/missing.py: no such file",
        ),
        (["--eval", "{checksum}:nothing"], "--eval '{checksum}:nothing': {checksum} has no function 'nothing'"),
        (
            ["--eval", "{tmp}/broken.py:evaluate"],
            "--eval '{tmp}/broken.py:evaluate': importing {tmp}/broken.py failed: RuntimeError: boom at import",
        ),
        (
            ["--eval", "cmdtool_no_such_module:evaluate"],
            "--eval 'cmdtool_no_such_module:evaluate': importing "
            "cmdtool_no_such_module failed: ModuleNotFoundError: No module named 'cmdtool_no_such_module'",
        ),
        (
            ["--eval", "{tmp}/raises.py:evaluate"],
            "--eval {tmp}/raises.py:evaluate: failed on checkpoint epoch_0.safetensors: ValueError: bad weights",
        ),
        (
            ["--eval", "{tmp}/listing.py:evaluate"],
            "--eval {tmp}/listing.py:evaluate: returned list on checkpoint epoch_0.safetensors, "
            "expected a dict of metrics",
        ),
        (
            ["--eval", "{tmp}/empty.py:evaluate"],
            "--eval {tmp}/empty.py:evaluate: returned dict on checkpoint epoch_0.safetensors, "
            "expected a dict of metrics",
        ),
        (
            ["--eval", "{tmp}/words.py:evaluate"],
            "--eval {tmp}/words.py:evaluate: metric 'acc' on checkpoint epoch_0.safetensors is 'high', not a number",
        ),
        (["--ema-decay", "1"], "--tail must be at least 1 and --ema-decay between 0 and 1 (exclusive)"),
    ],
    ids=[
        "require-without-eval",
        "unknown-metric",
        "malformed-require",
        "require-not-a-number",
        "eval-no-colon",
        "eval-missing-file",
        "eval-missing-function",
        "eval-file-import-error",
        "eval-module-import-error",
        "eval-raises",
        "eval-returns-list",
        "eval-returns-empty",
        "eval-returns-text",
        "ema-decay",
    ],
)
def test_bad_input_writes_no_report(fitted, runner, tmp_path, monkeypatch, args, message):
    monkeypatch.setattr(sys, "path", list(sys.path))  # importing a module:function adds the current folder
    for name, text in BAD_EVALUATIONS.items():
        (tmp_path / name).write_text(text)
    fill = {"tmp": tmp_path, "checksum": fitted.evaluate_file}
    out = tmp_path / "report"
    result = cmd(runner, "report", fitted.mode_file, "-o", out, *(a.format(**fill) for a in args))
    assert error_line(result) == message.format(**fill)
    assert_no_report(out)


def test_existing_report_folder_needs_force(fitted, runner, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    message = error_line(cmd(runner, "report", fitted.mode_file, "-o", out))
    assert message == f"{out}: already exists and is not empty (use --force to replace it)"
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(tmp_path.rglob(".*.tmp")) == []

    ok(cmd(runner, "report", fitted.mode_file, "-o", out, "--force"))
    assert not (out / "keep.txt").exists()
    assert read_report(out)["fit"] == read_report(fitted.plain)["fit"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no .tmp or .old left

    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is no report to lose
    ok(cmd(runner, "report", fitted.mode_file, "-o", empty))
    assert (empty / "report.json").is_file()

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert (
        error_line(cmd(runner, "report", fitted.mode_file, "-o", a_file))
        == f"{a_file}: is a file, expected a report folder"
    )
    nowhere = tmp_path / "missing" / "deeper" / "report"  # the missing parents are made, as reconstruct does
    ok(cmd(runner, "report", fitted.mode_file, "-o", nowhere))
    assert (nowhere / "report.json").is_file()
    under_file = a_file / "report"
    assert error_line(cmd(runner, "report", fitted.mode_file, "-o", under_file)) == (
        f"{a_file}: is a file, expected a folder for the report")


COMPARED = ("run", "fit", "per_checkpoint", "per_tensor", "modes", "baselines")


def test_deleted_store_points_to_checkpoints_which_give_the_same_report(fitted, runner, tmp_path, isolated_cache):
    mode_file, store = tmp_path / "modes.cmd.h5", tmp_path / "traj.h5"
    ok(cmd(runner, "fit", fitted.run, "-o", mode_file, "-m", M, "--trajectory", store))
    store.unlink()
    out = tmp_path / "report"
    message = error_line(cmd(runner, "report", mode_file, "-o", out))
    assert message == (
        f"{store}: the trajectory store this mode file was fitted from is gone (it is a cache); "
        "pass --checkpoints DIR to read the checkpoints again"
    )
    assert_no_report(out)

    ok(cmd(runner, "report", mode_file, "-o", out, "--checkpoints", fitted.run))
    r, expected = read_report(out), read_report(fitted.plain)
    assert {key: r[key] for key in COMPARED} == {key: expected[key] for key in COMPARED}
    assert r["trajectory"]["kind"] == "checkpoints" and r["trajectory"]["trajectory_reused"] is False
    assert r["trajectory"]["checkpoints"] == str(fitted.run.resolve())
    assert Path(r["trajectory"]["trajectory"]).parent == isolated_cache  # rebuilt in the cache, not beside the run


def test_store_of_other_checkpoints_is_refused(fitted, runner, tmp_path):
    mode_file = tmp_path / "first5.cmd.h5"
    ok(cmd(runner, "fit", fitted.run, "-o", mode_file, "-m", M, "--stop", 5, "--trajectory", tmp_path / "first5.h5"))
    out = tmp_path / "report"
    message = error_line(cmd(runner, "report", mode_file, "-o", out, "--trajectory", fitted.store))
    assert message == (
        f"{fitted.store}: does not hold the checkpoints this mode file was fitted on (checkpoint "
        "names, times or tensors differ); pass --checkpoints with the folder of the checkpoints it was fitted on"
    )
    assert_no_report(out)


# 6. outputs: HTML, plots, Markdown, step summary, --json


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_html_is_self_contained(fitted):
    folder = fitted.evaluated
    page = (folder / "report.html").read_text()
    assert (folder / "report.html").stat().st_size < 5_000_000
    parser = _Tags()
    parser.feed(page)
    names = {tag for tag, _ in parser.tags}
    assert not names & {"link", "script", "iframe", "object", "embed", "base", "source", "video", "audio"}
    referencing = [
        (tag, key, value)
        for tag, attrs in parser.tags
        for key, value in attrs.items()
        if key in ("src", "href", "srcset", "action", "data", "poster", "background")
    ]
    assert referencing and all(value.startswith("data:") for _, _, value in referencing), referencing
    outside_data = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    for pattern in ("http://", "https://", "//", "url(", "@import"):
        assert pattern not in outside_data, pattern

    embedded = [
        base64.b64decode(attrs["src"].removeprefix("data:image/png;base64,"))
        for tag, attrs in parser.tags
        if tag == "img"
    ]
    plots = read_report(folder)["plots"]
    assert sorted(embedded) == sorted((folder / name).read_bytes() for name in plots.values())  # all of them, inline


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_are_valid_png(fitted):
    everything = {
        "references": "references.png",
        "errors": "error_per_checkpoint.png",
        "mode_layers": "modes_by_layer.png",
        "correlation": "correlation.png",
        "parameters": "sampled_parameters.png",
        "metric": "metric_per_checkpoint.png",
        "candidates": "candidates_per_epoch.png",
    }
    plain = {k: v for k, v in everything.items() if k not in ("metric", "candidates")}
    for folder, expected in ((fitted.evaluated, everything), (fitted.plain, plain)):
        plots = read_report(folder)["plots"]
        assert plots == expected  # the metric and candidate plots only with --eval
        assert sorted(p.name for p in folder.glob("*.png")) == sorted(expected.values())
        for name in plots.values():
            width, height = png_size((folder / name).read_bytes())
            image = matplotlib.image.imread(folder / name)
            assert width > 100 and height > 100 and image.shape[:2] == (height, width)
            assert image.std() > 0  # something is drawn


def markdown_rows(text: str) -> dict[str, list[str]]:
    """Table rows of a Markdown document by their first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows.setdefault(cells[0], cells)
    return rows


def test_markdown_tables_plots_and_numbers(fitted):
    r = read_report(fitted.evaluated)
    text = (fitted.evaluated / "report.md").read_text()
    rows = markdown_rows(text)
    cmd_row, pca_rows = rows[f"CMD, {M} modes"], [rows["PCA d=1"], rows["PCA d=2"]]
    assert cmd_row[3:] == [
        f"{r['compactness']['compression_ratio_modelled']:.1f}×",
        f"{r['fit']['rel_error']:.4g}",
        f"{r['fit']['rel_error_displacement']:.4g}",
    ]
    for row, p in zip(pca_rows, r["baselines"]["pca"]):
        assert row[1] == str(p["d"] + 1)
        assert row[4:] == [f"{p['rel_error']:.4g}", f"{p['rel_error_displacement']:.4g}"]
    for name in r["plots"].values():
        assert re.search(rf"!\[[^\]]+\]\({re.escape(name)}\)", text), name
    for t in range(T):
        row = rows[str(t)]
        assert row[1:4] == [f"epoch_{t}.safetensors", str(t), f"{r['per_checkpoint']['cmd']['rel_error'][t]:.4g}"]
        displacement = r["per_checkpoint"]["cmd"]["rel_error_displacement"][t]
        assert row[4] == ("–" if t == 0 else f"{displacement:.4g}")
        assert row[5:7] == [f"{r['per_checkpoint'][f'pca_{d}']['rel_error'][t]:.4g}" for d in (1, 2)]
    for name, scores in r["evaluation"]["candidates"].items():
        expected = [f"{scores[k]:.4g}" for k in ("sum", "fc", "steps", "steps_int64")]
        assert [c.strip("*") for c in rows[name][2:-1]] == expected
        family = "original" if name == "last" else name
        decay = " --ema-decay 0.7" if name == "ema" else ""  # the report's --ema-decay
        assert rows[name][-1] == f"`cmd export {fitted.mode_file} -o export --family {family} --at {T - 1}{decay}`"
    for k in ("sum", "fc"):  # the best candidate of each metric is marked in bold (here: the largest value)
        best = max(scores[k] for scores in r["evaluation"]["candidates"].values())
        assert [rows[name][2 + ("sum", "fc").index(k)].startswith("**") for name in r["evaluation"]["candidates"]] == [
            scores[k] == best for scores in r["evaluation"]["candidates"].values()
        ]
    assert not any(rows[name][4].startswith("**") for name in r["evaluation"]["candidates"])  # steps: all equal
    for layer in r["per_tensor"]:
        assert rows[layer["name"]][2] == f"{layer['rel_error']:.4g}"


def test_step_summary_is_appended(fitted, runner, tmp_path, monkeypatch):
    summary = tmp_path / "step_summary.md"
    summary.write_text("# earlier step\n\nkept\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    for name in ("first", "second"):
        ok(cmd(runner, "report", fitted.mode_file, "-o", tmp_path / name))
    text = summary.read_text()
    parts = [
        (tmp_path / name / "summary.md").read_text() + f"\nFull report: `{tmp_path / name / 'report.html'}`\n\n"
        for name in ("first", "second")
    ]
    assert text == "# earlier step\n\nkept\n" + parts[0] + parts[1]
    assert text.count("| model |") == 2 and text.count(f"| CMD, {M} modes |") == 2
    assert "![" not in text  # no image links: the summary has no folder to resolve them against


def test_json_prints_report_json(fitted):
    assert fitted.evaluated_stdout.count("\n") == 1
    assert json.loads(fitted.evaluated_stdout) == read_report(fitted.evaluated)
