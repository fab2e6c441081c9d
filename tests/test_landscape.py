"""``cmd landscape`` (cmdtool/landscape.py): planted optima found on validation and reported on test,
the centre equal to ``cmd reconstruct``'s weights, the grid's arithmetic, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from cmdtool.errors import CmdError
from cmdtool.landscape import export_chosen, grid_axis, landscape
from cmdtool.modefile import open_mode_file
from helpers import cmd, error_line, ok


@pytest.fixture
def fitted(tmp_path, run_dir, runner) -> Path:
    mode_file = tmp_path / "run.cmd.h5"
    ok(cmd(runner, "fit", run_dir, "-o", mode_file, "--modes", 3, "--trajectory", tmp_path / "run.trajectory.h5"))
    return mode_file


def _reference_parameters(mode_file: Path) -> list[tuple[str, int, float, float]]:
    """Per mode: the reference parameter's tensor, flat index within it, and the raw reference value
    at the last checkpoint and the stored scale."""
    with open_mode_file(mode_file) as modes:
        out = []
        for m, column in enumerate(modes.reference_index):
            spec = next(s for s in modes.layout.modelled if s.offset <= column < s.offset + s.size)
            raw = float(modes.reference_offset[m]) + float(modes.reference_scale[m]) * float(modes.references[m, -1])
            out.append((spec.name, int(column) - spec.offset, raw, float(modes.reference_scale[m])))
        return out


def test_grid_axis_scales_the_raw_value_and_the_centre_is_exact():
    axis = grid_axis(1, normalised_value=0.3, offset=2.0, scale=4.0, grid=5, span=0.5)
    raw = 2.0 + 4.0 * 0.3
    assert axis.varied == "relative" and axis.reference_value == raw
    np.testing.assert_allclose(axis.offsets, [-0.5, -0.25, 0.0, 0.25, 0.5])
    np.testing.assert_allclose(axis.values, raw * (1 + axis.offsets))
    np.testing.assert_allclose(2.0 + 4.0 * axis.normalised, axis.values)  # raw = offset + scale · normalised
    assert axis.normalised[2] == 0.3  # bit for bit: the centre is the stored value


def test_grid_axis_of_a_zero_reference_value_moves_by_its_scale():
    axis = grid_axis(0, normalised_value=-0.5, offset=2.0, scale=4.0, grid=3, span=0.25)  # raw = 0
    assert axis.varied == "absolute" and axis.unit == 4.0
    np.testing.assert_allclose(axis.values, [-1.0, 0.0, 1.0])
    np.testing.assert_allclose(axis.normalised, [-0.75, -0.5, -0.25])


def test_planted_optimum_is_found_on_validation_and_reported_on_test(tmp_path, fitted):
    refs = _reference_parameters(fitted)
    (name_x, at_x, raw_x, _), (name_y, at_y, raw_y, _) = refs[0], refs[2]
    grid, span = 9, 0.4
    offsets = np.linspace(-span, span, grid)
    val_best, test_best = (2, 7), (6, 1)  # (x, y) grid points: the planted optima of each split

    def evaluate(state):
        vx, vy = float(state[name_x].flatten()[at_x]), float(state[name_y].flatten()[at_y])

        def distance(point):
            return (vx - raw_x * (1 + offsets[point[0]])) ** 2 + (vy - raw_y * (1 + offsets[point[1]])) ** 2
        return {"val": {"loss": distance(val_best)}, "test": {"loss": distance(test_best), "vx": vx, "count": 7}}

    result = landscape(fitted, tmp_path / "land", evaluate=evaluate, modes="0,2", grid=grid, span=span)
    data = json.loads((tmp_path / "land" / "landscape.json").read_text())
    assert data == result.landscape
    assert (data["chosen"]["x"], data["chosen"]["y"]) == val_best
    assert data["selection"]["key"] == "val/loss"
    test = np.array(data["scores"]["test/loss"])
    assert data["chosen"]["scores"]["test/loss"] == test[val_best[1], val_best[0]]
    assert np.unravel_index(np.argmin(test), test.shape) == test_best[::-1]  # not where test is best
    np.testing.assert_allclose(data["chosen"]["offsets"], [offsets[2], offsets[7]])
    np.testing.assert_allclose(data["chosen"]["reference_values"],
                               [raw_x * (1 + offsets[2]), raw_y * (1 + offsets[7])])
    # the weights at a point hold the reference parameter at the varied value (to float32 rounding)
    np.testing.assert_allclose(np.array(data["scores"]["test/vx"])[0], raw_x * (1 + offsets), rtol=1e-5)
    assert data["evaluations"] == grid * grid + 1
    assert data["axes"][0]["mode"] == 0 and data["axes"][1]["mode"] == 2
    assert sorted(p.name for p in (tmp_path / "land").iterdir()) == [
        "landscape.json", "landscape.md", "landscape_test_loss.png", "landscape_test_vx.png", "landscape_val_loss.png"]
    assert data["plots"] == {"val/loss": "landscape_val_loss.png", "test/loss": "landscape_test_loss.png",
                             "test/vx": "landscape_test_vx.png"}  # test/count is the same everywhere
    assert "Not plotted, the same at every point: test/count." in (tmp_path / "land" / "landscape.md").read_text()
    # the planted run has little noise: the original checkpoint projects onto (almost) the centre
    np.testing.assert_allclose(data["original"]["projection"]["offsets"], [0, 0], atol=1e-3)


EXACT_EVAL = '''
import torch

def evaluate(state):
    total, weighted = 0.0, 0.0
    for i, name in enumerate(sorted(state)):
        v = state[name].double().flatten()
        total += float(v.sum())
        weighted += (i + 1) * float((v * torch.arange(1, v.numel() + 1, dtype=torch.float64)).sum())
    return {"val": {"total": total}, "test": {"weighted": weighted}}
'''


def test_centre_scores_equal_evaluating_the_reconstructed_checkpoint(tmp_path, fitted, runner):
    (tmp_path / "exact_eval.py").write_text(EXACT_EVAL)
    spec = f"{tmp_path / 'exact_eval.py'}:evaluate"
    ok(cmd(runner, "reconstruct", fitted, "-o", tmp_path / "rebuilt", "--at", 5))
    result = ok(cmd(runner, "landscape", fitted, "-o", tmp_path / "land", "--eval", spec, "--at", 5, "--grid", 3,
                    "--json"))
    data = json.loads(result.stdout)
    assert data["position"] == 5 and data["checkpoint"] == "epoch_5.safetensors"
    assert "10 evaluations (3 × 3 grid, and the original checkpoint)" in result.stderr
    from exact_eval import evaluate  # imported by the command from the file's folder
    expected = evaluate(load_file(tmp_path / "rebuilt" / "epoch_5.safetensors"))
    assert data["centre"]["scores"] == {"val/total": expected["val"]["total"],
                                        "test/weighted": expected["test"]["weighted"]}
    assert data["scores"]["val/total"][1][1] == expected["val"]["total"]
    assert data["scores"]["val/total"][0][0] != expected["val"]["total"]  # the corners are other weights


FAILING_EVAL = '''
calls = 0

def evaluate(state):
    global calls
    calls += 1
    if calls == 5:  # the original checkpoint, then grid points (0, 0), (1, 0), (2, 0), (0, 1)
        raise ValueError("planted failure")
    return {"val": {"loss": 1.0}, "test": {"loss": 2.0}}
'''


def test_errors_are_one_line_and_leave_nothing(tmp_path, fitted, run_dir, runner):
    (tmp_path / "failing_eval.py").write_text(FAILING_EVAL)
    (tmp_path / "exact_eval.py").write_text(EXACT_EVAL)
    good = f"{tmp_path / 'exact_eval.py'}:evaluate"
    out = tmp_path / "land"
    failed = cmd(runner, "landscape", fitted, "-o", out, "--eval", f"{tmp_path / 'failing_eval.py'}:evaluate",
                 "--grid", 3)
    assert failed.exit_code == 2 and failed.stdout == "" and "Traceback" not in failed.output
    announced, error = failed.stderr.splitlines()  # the count of evaluations was printed before they started
    assert announced.endswith("10 evaluations (3 × 3 grid, and the original checkpoint)")
    message = error.removeprefix("error: ")
    assert "failed on grid point (0, 1) (mode 0 at -50%, mode 1 at +0%): ValueError: planted failure" in message
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".land")] == []
    for args, expected in [(["--grid", 4], "--grid must be an odd integer of at least 3"),
                           (["--span", 0], "--span must be a positive number"),
                           (["--modes", "1,1"], "--modes '1,1': expected two different modes"),
                           (["--modes", "0,3"], "mode 3 is out of range"),
                           (["--at", "all"], "--at 'all': a landscape is drawn at one position"),
                           (["--select", "accuracy"], "the evaluation's 'val' split has no metric 'accuracy'")]:
        assert expected in error_line(cmd(runner, "landscape", fitted, "-o", out, "--eval", good, "--grid", 3,
                                          *args)), args
        assert not out.exists()
    one_mode = tmp_path / "one.cmd.h5"
    ok(cmd(runner, "fit", run_dir, "-o", one_mode, "--modes", 1))
    assert "has 1 mode; a landscape varies two" in error_line(
        cmd(runner, "landscape", one_mode, "-o", out, "--eval", good))
    table = ok(cmd(runner, "landscape", fitted, "-o", out, "--eval", good, "--grid", 3)).stdout.splitlines()
    assert table[0] == "point\tmode 0 mode 1\tval/total\ttest/weighted"
    assert [line.split("\t")[0] for line in table[1:]] == ["chosen on val/total", "centre (CMD weights)",
                                                            "original checkpoint"]
    assert table[2].split("\t")[1] == "+0.0% +0.0%"
    assert "already exists" in error_line(cmd(runner, "landscape", fitted, "-o", out, "--eval", good, "--grid", 3))
    ok(cmd(runner, "landscape", fitted, "-o", out, "--eval", good, "--grid", 5, "--force"))
    assert json.loads((out / "landscape.json").read_text())["grid"] == 5


def test_flat_metrics_choose_no_point_and_without_the_store_the_original_is_left_out(tmp_path, fitted):
    (tmp_path / "run.trajectory.h5").unlink()
    calls = []
    data = landscape(fitted, tmp_path / "land", evaluate=lambda state: calls.append(1) or {"loss": 1.0},
                     grid=3).landscape
    assert len(calls) == 9 == data["evaluations"]  # the centre, evaluated first, is not evaluated again
    assert data["chosen"] is None and "no validation split" in data["selection_impossible"]
    assert data["original"] is None and "trajectory store is gone" in data["original_note"]
    assert "Note: no point is chosen" in (tmp_path / "land" / "landscape.md").read_text()


def test_library_refuses_bad_grids_before_reading(tmp_path, fitted):
    with pytest.raises(CmdError, match="grid must be an odd integer"):
        landscape(fitted, tmp_path / "land", evaluate=lambda state: {"loss": 1.0}, grid=2)


def test_export_from_landscape_writes_the_weights_that_were_scored(tmp_path, fitted, runner):
    refs = _reference_parameters(fitted)
    name_x, at_x, raw_x, _ = refs[1]

    def evaluate(state):
        v = float(state[name_x].flatten()[at_x])
        total = sum(float(t.double().sum()) for t in state.values())
        return {"val": {"loss": (v - 1.2 * raw_x) ** 2}, "test": {"total": total}}

    data = landscape(fitted, tmp_path / "land", evaluate=evaluate, modes="1,0", grid=5, span=0.4).landscape
    # the first axis is mode 1; validation ignores mode 0, and ties go to the point nearest the centre
    assert (data["chosen"]["x"], data["chosen"]["y"], data["chosen"]["offsets"]) == (3, 2, [0.2, 0.0])
    result = ok(cmd(runner, "export", fitted, "-o", tmp_path / "best", "--from-landscape", tmp_path / "land"))
    assert result.stdout.splitlines() == [str(tmp_path / "best" / "epoch_19.safetensors")]
    exported = load_file(tmp_path / "best" / "epoch_19.safetensors")
    assert evaluate(exported)["test"]["total"] == data["chosen"]["scores"]["test/total"]
    # the library call writes the same bytes
    paths = export_chosen(fitted, tmp_path / "land", tmp_path / "again").paths
    assert paths[0].read_bytes() == (tmp_path / "best" / "epoch_19.safetensors").read_bytes()
    def recalibrate(state):
        return {**state, "bn.running_mean": state["bn.running_mean"] * 0 + 7}

    recalibrated = export_chosen(fitted, tmp_path / "land", tmp_path / "recalibrated", format="safetensors",
                                 recalibrate=recalibrate)
    state = load_file(recalibrated.paths[0])
    assert (state["bn.running_mean"] == 7).all() and (state["fc.weight"] == exported["fc.weight"]).all()
    assert "already exists" in error_line(
        cmd(runner, "export", fitted, "-o", tmp_path / "best", "--from-landscape", tmp_path / "land"))
    assert "pass one of" in error_line(cmd(runner, "export", fitted, "-o", tmp_path / "x", "--from-landscape",
                                           tmp_path / "land", "--family", "cmd"))
    other = tmp_path / "other.cmd.h5"
    ok(cmd(runner, "fit", tmp_path / "run", "-o", other, "--modes", 2))
    assert "was not computed from" in error_line(
        cmd(runner, "export", other, "-o", tmp_path / "x", "--from-landscape", tmp_path / "land"))
    assert "no such landscape file" in error_line(
        cmd(runner, "export", fitted, "-o", tmp_path / "x", "--from-landscape", tmp_path))
    assert not (tmp_path / "x").exists()


def test_plot_names_are_plain_file_names_whatever_the_metric_is_called():
    from cmdtool.landscape_plots import plot_name
    taken: set[str] = set()
    assert plot_name("val/acc@top 1", taken) == "landscape_val_acc_top_1.png"
    assert plot_name("val/acc top@1", taken) == "landscape_val_acc_top_1_2.png"  # the same after cleaning
    assert plot_name("../..", taken) == "landscape_metric.png"
    assert plot_name("/etc/passwd", taken) == "landscape_etc_passwd.png"
