"""The report's verdict: planted evaluations whose winner is known (a CMD win, a tail-mean win, a tie
within the sampling error), the verdict each produces in report.json, report.md, summary.md and on
the terminal, the marks that agree with it; modelling only without ``--eval``; thresholds first;
and ``--recalibrate`` turning the verdict on a planted BatchNorm model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import cmdtool
from cmdtool.report import verdict as verdict_module
from helpers import SHAPES, cmd, error_line, ok, plant, write_run
from test_export import Run

T = 12
N_TEST = 1000

# Scores planted on the weights: a family scores ``hit`` where its fc.weight is one of the targets
# (each target: the weights of one family at one position), ``base`` elsewhere; ``count`` examples.
PLANTED = '''
import numpy as np
TARGETS = [(np.load(path), val, test) for path, val, test in {targets!r}]
COUNT = {count!r}


def evaluate(state):
    weight = state["fc.weight"].numpy()
    val, test = 0.80, 0.85
    for target, hit_val, hit_test in TARGETS:
        if np.allclose(weight, target, rtol=0, atol=1e-7):
            val, test = hit_val, hit_test
    scores = {{"val": {{"accuracy": val}}, "test": {{"accuracy": test}}}}
    if COUNT:
        scores["val"]["count"] = scores["test"]["count"] = COUNT
    return scores
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    return Run(tmp_path_factory.mktemp("verdict"))


def cmd_at(run: Run, t: int) -> np.ndarray:
    return cmdtool.reconstruct(run.mode_file, at=t)["fc.weight"].numpy()


def tail_at(run: Run, k: int, t: int) -> np.ndarray:
    window = np.stack([run.checkpoints[s]["fc.weight"].double().numpy() for s in range(t - k + 1, t + 1)])
    return window.mean(axis=0).astype(np.float32)


def planted_report(run: Run, folder: Path, targets: list[tuple[np.ndarray, float, float]], count: int | None,
                   *extra) -> tuple[dict, str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (weights, val, test) in enumerate(targets):
        np.save(folder / f"target{i}.npy", weights)
        paths.append((str(folder / f"target{i}.npy"), val, test))
    (folder / "planted.py").write_text(PLANTED.format(targets=paths, count=count))
    result = ok(cmd(CliRunner(), "report", run.mode_file, "-o", folder / "report", "--eval",
                    f"{folder / 'planted.py'}:evaluate", "--select", "accuracy", *extra))
    report = json.loads((folder / "report/report.json").read_text())
    return report, (folder / "report/report.md").read_text(), result.stdout


def selected(report: dict) -> dict:
    (judged,) = report["verdict"]["metrics"]
    assert judged["key"] == "test/accuracy"
    return judged


def starred(markdown: str) -> list[str]:
    return [line.split("|")[1].strip().removeprefix("★ ") for line in markdown.splitlines()
            if line.startswith("| ★ ")]


def test_cmd_win(run, tmp_path):
    report, markdown, stdout = planted_report(run, tmp_path, [(cmd_at(run, 5), 0.90, 0.95)], N_TEST)
    judged = selected(report)
    chosen = judged["under_selection"]
    assert (chosen["winner"], chosen["winners"], chosen["chosen_on_validation"]) == ("cmd", ["cmd"], "cmd")
    assert chosen["cmd_vs_best_other"]["outcome"] == "better"
    assert chosen["cmd_vs_best_other"]["difference"] == pytest.approx(0.10)
    margin = 2 * math.sqrt(2 * 0.9 * 0.1 / N_TEST)  # p = (0.95 + 0.85) / 2
    assert chosen["cmd_vs_best_other"]["margin"] == pytest.approx(margin)
    assert judged["headline"] == ("test/accuracy: CMD helped. At the last checkpoint, CMD equals the best cheap "
                                  "alternative, tail_5; chosen on validation, CMD is ahead of the best other family, "
                                  f"{chosen['best_other']} (+0.1)")
    # at the last checkpoint nothing hits a target: every family scores 0.85, a tie
    assert judged["at_last"]["cmd_vs_checkpoint"]["outcome"] == "tie"
    assert judged["at_last"]["cmd_vs_best_cheap"]["outcome"] == "tie"
    assert report["verdict"]["noise"]["counts"] == {"test": N_TEST}
    assert starred(markdown) == ["cmd"]
    # the verdict comes first: the first section of report.md, the first lines on the terminal
    assert markdown.split("\n\n")[1] == "## Verdict"
    assert markdown.split("\n\n")[2] == f"**{judged['headline']}.**"
    assert stdout.splitlines()[0] == judged["headline"] + "."


def test_tail_mean_win(run, tmp_path):
    report, markdown, _ = planted_report(run, tmp_path, [(tail_at(run, 5, 8), 0.90, 0.95)], N_TEST)
    judged = selected(report)
    chosen = judged["under_selection"]
    assert (chosen["winner"], chosen["winners"]) == ("tail_5", ["tail_5"])
    assert chosen["best_other"] == "tail_5" and chosen["cmd_vs_best_other"]["outcome"] == "worse"
    assert judged["headline"] == ("test/accuracy: CMD did not help. At the last checkpoint, CMD equals the best "
                                  "cheap alternative, tail_5; chosen on validation, the best other family, tail_5, is "
                                  "ahead of CMD (-0.1)")
    assert starred(markdown) == ["tail_5"]
    assert "reported on test/accuracy: **tail_5** wins, 0.95 at epoch_8.safetensors, 0.1 ahead of " in markdown


def test_tie_within_the_sampling_error(run, tmp_path):
    targets = [(cmd_at(run, 5), 0.90, 0.905), (tail_at(run, 5, 8), 0.90, 0.90)]
    report, markdown, _ = planted_report(run, tmp_path / "counted", targets, N_TEST)
    chosen = selected(report)["under_selection"]
    assert chosen["winner"] == "cmd" and sorted(chosen["winners"]) == ["cmd", "tail_5"]
    assert chosen["cmd_vs_best_other"]["outcome"] == "tie"  # 0.005 < 2·sqrt(2·0.9025·0.0975/1000) = 0.0265
    assert selected(report)["headline"] == (
        "test/accuracy: no clear difference. At the last checkpoint, CMD equals the best cheap alternative, tail_5; "
        "chosen on validation, CMD ties with the best other family, tail_5 (+0.005, within the sampling error)")
    assert "no family wins beyond the sampling error. cmd scores best, 0.905 at epoch_5.safetensors, and tail_5 is " \
        "within the sampling error of it." in markdown
    assert sorted(starred(markdown)) == ["cmd", "tail_5"]
    rule = ("A difference is a tie when |Δ| < 2·sqrt(2·p(1−p)/n) (p the mean of the two accuracies, n the examples "
            "scored: test 1,000)")
    assert any(line.startswith(rule) for line in report["verdict"]["lines"])
    # the same scores without a count: the noise is unknown, and CMD is ahead
    report, markdown, _ = planted_report(run, tmp_path / "uncounted", targets, None)
    chosen = selected(report)["under_selection"]
    assert chosen["winners"] == ["cmd"] and chosen["cmd_vs_best_other"]["outcome"] == "better"
    assert chosen["cmd_vs_best_other"]["margin"] is None
    assert report["verdict"]["noise"]["known"] is False
    assert any("sampling error is unknown (the evaluation returned no `count` per split)" in line
               for line in report["verdict"]["lines"])
    assert starred(markdown) == ["cmd"]


def test_bold_marks_every_final_value_within_the_sampling_error():
    values = {"last": 0.85, "cmd": 0.86, "ema": 0.95}
    assert verdict_module.tied_with_best(values, "test/accuracy", "max", {"test": 1000}) == ["ema"]
    assert verdict_module.tied_with_best(values, "test/accuracy", "max", {"test": 50}) == ["last", "cmd", "ema"]
    assert verdict_module.tied_with_best(values, "test/accuracy", "max", {}) == ["ema"]  # noise unknown: exact
    assert verdict_module.tied_with_best({"a": 0.3, "b": 0.31}, "test/loss", "min", {"test": 10**9}) == ["a"]


def test_without_eval_the_verdict_speaks_of_modelling_and_thresholds_come_first(run, runner, tmp_path, monkeypatch):
    summary = tmp_path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = cmd(runner, "report", run.mode_file, "-o", tmp_path / "report", "--max-rel-error", 1e-9)
    assert result.exit_code == 1
    verdict = json.loads((tmp_path / "report/report.json").read_text())["verdict"]
    assert verdict["thresholds"] == "FAIL" and verdict["metrics"] == [] and verdict["noise"] is None
    assert verdict["lines"][0].startswith("**Thresholds: FAIL** (1 of 1): rel_error = ")
    assert verdict["lines"][1].startswith("Modelling: CMD's rel_error ")
    assert verdict["lines"][1].endswith("(No `--eval`: the verdict speaks of modelling only.)")
    assert len(verdict["lines"]) == 2
    model = verdict["modelling"]
    report = json.loads((tmp_path / "report/report.json").read_text())
    pca = {p["d"]: p for p in report["baselines"]["pca"]}
    assert model["cmd_rel_error"] == report["fit"]["rel_error"]
    fair = [p for p in pca.values() if p["bytes_float32"] <= report["compactness"]["modelled_bytes"]]
    assert model["better_at_equal_bytes"] == (all(report["fit"]["rel_error"] < p["rel_error"] for p in fair)
                                              if fair else None)
    for text in (summary.read_text(), (tmp_path / "report/summary.md").read_text()):
        blocks = text.split("\n\n")
        assert blocks[1:3] == ["## Verdict", verdict["lines"][0]]
    html = (tmp_path / "report/report.html").read_text()
    assert html.index(">Verdict</h2>") < html.index(">The run</h2>") < html.index(">How well the modes")
    assert result.stdout.splitlines()[0] == verdict["lines"][0].replace("**", "").replace("`", "")


def test_terminal_tables_do_not_wrap_when_piped(run, runner, tmp_path):
    report, _, stdout = planted_report(run, tmp_path, [(cmd_at(run, 5), 0.90, 0.95)], N_TEST)
    table = [line for line in stdout.splitlines() if line.startswith(("model ", "CMD, ", "candidate ", "last "))]
    assert len(table) == 4 and all("\n" not in line for line in table)
    header = next(line for line in stdout.splitlines() if line.startswith("chosen on validation"))
    assert header.split() == ["chosen", "on", "validation", "position", "val/accuracy", "test/accuracy"]
    assert any(len(line) > 80 for line in stdout.splitlines())  # the verdict's sentences are not cut at 80 columns


# --recalibrate on a planted BatchNorm model: every checkpoint's running_mean is conv.bias², as a
# network's statistics follow its weights. The evaluation scores 0.30 whenever they disagree (as a
# model with stale statistics does), else 0.95 for CMD's weights at position 5 and 0.85 for any others.
BATCHNORM = '''
import numpy as np
import torch
TARGET = np.load({target!r})


def statistics(state):
    return state["conv.bias"] ** 2


def evaluate(state):
    if not torch.equal(state["bn.running_mean"], statistics(state)):
        val = test = 0.30
    elif np.allclose(state["fc.weight"].numpy(), TARGET, rtol=0, atol=1e-7):
        val, test = 0.90, 0.95
    else:
        val, test = 0.80, 0.85
    return {{"val": {{"accuracy": val, "count": 1000}}, "test": {{"accuracy": test, "count": 1000}}}}


def recalibrate(state):
    state["bn.running_mean"] = statistics(state)
    return state
'''


def test_recalibrate_changes_the_verdict_on_a_batchnorm_model(tmp_path, runner):
    planted = plant(M=3, T=T, noise=1e-3, seed=5, shapes=SHAPES)
    states = planted.states()
    for state in states:
        state["bn.running_mean"] = state["conv.bias"] ** 2
    folder = write_run(tmp_path / "run", states)
    mode_file = tmp_path / "modes.cmd.h5"
    ok(cmd(runner, "fit", folder, "-o", mode_file, "-m", 3, "--trajectory", tmp_path / "traj.h5"))
    np.save(tmp_path / "target.npy", cmdtool.reconstruct(mode_file, at=5)["fc.weight"].numpy())
    (tmp_path / "bn.py").write_text(BATCHNORM.format(target=str(tmp_path / "target.npy")))
    common = ["--eval", f"{tmp_path / 'bn.py'}:evaluate", "--select", "accuracy"]

    ok(cmd(runner, "report", mode_file, "-o", tmp_path / "stale", *common))
    stale = json.loads((tmp_path / "stale/report.json").read_text())
    (judged,) = stale["verdict"]["metrics"]
    assert judged["under_selection"]["winner"] == "original"  # only the checkpoints have matching statistics
    assert judged["under_selection"]["cmd_vs_best_other"]["outcome"] == "worse"
    assert "CMD did not help" in judged["headline"]
    assert any(line.startswith("BatchNorm statistics were not recomputed") for line in stale["verdict"]["lines"])

    ok(cmd(runner, "report", mode_file, "-o", tmp_path / "fresh", *common,
           "--recalibrate", f"{tmp_path / 'bn.py'}:recalibrate"))
    fresh = json.loads((tmp_path / "fresh/report.json").read_text())
    (judged,) = fresh["verdict"]["metrics"]
    assert judged["under_selection"]["winner"] == "cmd" and judged["under_selection"]["winners"] == ["cmd"]
    assert "CMD helped" in judged["headline"]
    assert fresh["verdict"]["recalibrated"] == f"{tmp_path / 'bn.py'}:recalibrate"
    assert f"BatchNorm statistics were recomputed for every candidate by `{tmp_path / 'bn.py'}:recalibrate`." \
        in fresh["verdict"]["lines"]
    assert fresh["evaluation"]["evaluations"] == 7 * T + 1  # every candidate recalibrated: the trial is not reused
    # the export line of each candidate carries --recalibrate, and writes what was scored
    markdown = (tmp_path / "fresh/report.md").read_text()
    assert f"--family cmd --at 5 --recalibrate {tmp_path / 'bn.py'}:recalibrate`" in markdown
    ok(cmd(runner, "export", mode_file, "-o", tmp_path / "best", "--best", tmp_path / "fresh/report.json",
           "--recalibrate", f"{tmp_path / 'bn.py'}:recalibrate"))
    written = load_file(str(tmp_path / "best/epoch_5.safetensors"))
    assert torch.equal(written["bn.running_mean"], written["conv.bias"] ** 2)


def test_recalibrate_errors_are_one_line(run, runner, tmp_path):
    (tmp_path / "bad.py").write_text("def evaluate(state):\n    return {'accuracy': 0.5}\n\n\n"
                                     "def recalibrate(state):\n    raise RuntimeError('no loader')\n\n\n"
                                     "def renames(state):\n    return {'x': 1}\n")
    bad = f"{tmp_path / 'bad.py'}"
    assert error_line(cmd(runner, "report", run.mode_file, "-o", tmp_path / "a", "--recalibrate",
                          f"{bad}:recalibrate")) == ("--recalibrate needs --eval: it recomputes the statistics of the "
                                                     "weights that are scored")
    assert error_line(cmd(runner, "report", run.mode_file, "-o", tmp_path / "b", "--eval", f"{bad}:evaluate",
                          "--recalibrate", f"{bad}:recalibrate", "--candidates-only")) == (
        f"--recalibrate {bad}:recalibrate: failed on checkpoint epoch_11.safetensors: RuntimeError: no loader")
    assert error_line(cmd(runner, "export", run.mode_file, "-o", tmp_path / "c", "--family", "ema",
                          "--recalibrate", f"{bad}:renames")) == (
        f"--recalibrate {bad}:renames: on ema at epoch_11.safetensors, expected the state dict back (the same tensor "
        "names) or None")
    assert error_line(cmd(runner, "export", run.mode_file, "-o", tmp_path / "d", "--family", "ema",
                          "--recalibrate", f"{bad}:missing")) == (
        f"--recalibrate '{bad}:missing': {bad} has no function 'missing'")
    assert not any((tmp_path / name).exists() for name in "abcd")
