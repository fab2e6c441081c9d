"""Selection-honest evaluation in ``cmd report``: per-epoch scores of every candidate family against a
direct numpy computation, the epoch ``--select`` chooses on validation and the test value it reports,
the cost options, and the rough edges (sibling imports, the trial call, the non-finite summary)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmdtool.errors import CmdError
from cmdtool.report import selection
from test_report import (
    TAILS,
    Fitted,
    T,
    checksum,
    cmd,
    dense_pca,
    error_line,
    fit_and_report,
    ok,
    read_report,
    state_of,
)

# Scores planted on the epoch (the integer buffer counts 100 steps per checkpoint, and every family
# takes its integer buffers from the epoch it stands for) and on one weight.
SPLIT_EVALUATE = '''
def evaluate(state):
    t = float(state["bn.num_batches_tracked"]) / 100
    fc = float(state["fc.weight"][0, 0])
    return {"val": {"peak": -(t - 7) ** 2, "fc": fc, "loss": (t - 3) ** 2},
            "test": {"peak": 1000 + t, "fc": 2 * fc, "loss": 50 + t}}
'''
FAMILIES = ["original", "cmd", "tail_5", "tail_10", "ema", "pca_1", "pca_2"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Fitted:
    return fit_and_report(tmp_path_factory.mktemp("selection"))


def direct_families(fitted, decay: float = 0.9, tails=(5, 10)) -> dict[str, np.ndarray]:
    """Each family's (T, N) weights per epoch, computed straight from the checkpoints."""
    W = fitted.W
    ema = np.empty_like(W)
    ema[0] = W[0]
    for t in range(1, T):
        ema[t] = decay * ema[t - 1] + (1 - decay) * W[t]
    out = {"original": W, "cmd": fitted.W_cmd}
    for k in tails:
        out[f"tail_{k}"] = np.stack([W[max(0, t - k + 1):t + 1].mean(axis=0) for t in range(T)])
    out["ema"] = ema
    for d in (1, 2):
        out[f"pca_{d}"] = dense_pca(W, d)
    return out


@pytest.fixture(scope="module")
def split_file(fitted):
    path = fitted.folder / "split_eval.py"
    path.write_text(SPLIT_EVALUATE)
    return path


def report(fitted, tmp_path, runner, *args):
    ok(cmd(runner, "report", fitted.mode_file, "-o", tmp_path / "out", *args))
    return read_report(tmp_path / "out")


def test_every_family_per_epoch_equals_direct_numpy(fitted):
    """The per-epoch tail, EMA and PCA curves (and original, CMD) against a direct computation."""
    evaluation = read_report(fitted.evaluated)["evaluation"]  # --tail 5 10 30, --ema-decay 0.7, checksum eval
    direct = direct_families(fitted, 0.7, TAILS)
    assert list(evaluation["per_epoch"]) == list(direct)
    assert evaluation["epochs"] == list(range(T)) and evaluation["evaluations"] == len(direct) * T
    for family, weights in direct.items():
        for t in range(T):
            expected = checksum(state_of(weights[t], fitted.layout, fitted.checkpoints[t]))
            for key in ("sum", "fc"):
                assert evaluation["per_epoch"][family][key][t] == pytest.approx(expected[key], rel=1e-6, abs=1e-5), (
                    family, t, key)
            assert evaluation["per_epoch"][family]["steps"][t] == 100 * t  # integer buffers of epoch t
    assert evaluation["per_checkpoint"] == {"original": evaluation["per_epoch"]["original"],
                                            "cmd": evaluation["per_epoch"]["cmd"]}
    for family in ("tail_5", "ema", "pca_1"):  # the final candidates are the families at the last epoch
        name = family
        assert evaluation["candidates"][name] == {k: v[-1] for k, v in evaluation["per_epoch"][family].items()}
    assert evaluation["selection"] is None and evaluation["selection_impossible"] is None


def test_select_picks_the_planted_best_epoch_on_validation_and_reports_test(fitted, split_file, runner, tmp_path):
    r = report(fitted, tmp_path, runner, "--eval", f"{split_file}:evaluate", "--select", "peak")
    chosen = r["evaluation"]["selection"]
    assert [chosen[k] for k in ("metric", "direction", "split", "key")] == ["peak", "max", "val", "val/peak"]
    assert chosen["reported"] == ["test/peak", "test/fc", "test/loss"]
    assert [row["family"] for row in chosen["rows"]] == FAMILIES
    for row in chosen["rows"]:
        assert row["epoch"] == 7 and row["checkpoint"] == "epoch_7.safetensors"
        assert row["scores"]["val/peak"] == 0 and row["scores"]["test/peak"] == 1007
    assert chosen["chosen"] == "original"  # a tie on validation goes to the first family
    assert r["evaluation"]["candidates"]["last"]["test/peak"] == 1000 + T - 1


def test_select_min_and_default_direction(fitted, split_file, runner, tmp_path):
    r = report(fitted, tmp_path, runner, "--eval", f"{split_file}:evaluate", "--select", "loss")
    chosen = r["evaluation"]["selection"]
    assert chosen["direction"] == "min"
    assert {row["epoch"] for row in chosen["rows"]} == {3}
    assert {row["scores"]["test/loss"] for row in chosen["rows"]} == {53}


def test_select_by_a_weight_picks_each_familys_argmax(fitted, split_file, runner, tmp_path):
    """Selection on ``val/fc`` (a weight): each family's chosen epoch is the numpy argmax of that
    weight over its per-epoch weights, its test value twice the weight there, and the chosen family
    the one whose best is largest; the Markdown table marks it."""
    r = report(fitted, tmp_path, runner, "--eval", f"{split_file}:evaluate", "--select", "fc:max")
    chosen = r["evaluation"]["selection"]
    column = next(s for s in fitted.layout.modelled if s.name == "fc.weight").columns.start
    best = {}
    for row, (family, weights) in zip(chosen["rows"], direct_families(fitted).items()):
        values = weights[:, column].astype(np.float32).astype(np.float64)
        assert row["family"] == family
        assert row["epoch"] == int(np.argmax(values)), family
        assert row["scores"]["test/fc"] == pytest.approx(2 * values.max(), rel=1e-6)
        best[family] = values.max()
    assert chosen["chosen"] == max(best, key=best.get)
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"| ★ {chosen['chosen']} |" in text and text.count("★ ") == 2  # the row, and the sentence about it


def test_without_a_validation_split_the_report_says_it_cannot_select(fitted, runner, tmp_path):
    r = report(fitted, tmp_path, runner, "--eval", f"{fitted.evaluate_file}:evaluate", "--select", "sum")
    evaluation = r["evaluation"]
    assert evaluation["selection"] is None
    assert evaluation["selection_impossible"].startswith("`--select sum` cannot choose a checkpoint without bias: the "
                                                         "evaluation returned no validation split")
    assert "**No selection.**" in (tmp_path / "out" / "report.md").read_text()


def test_select_metric_missing_on_validation_fails_before_the_long_pass(fitted, split_file, runner, tmp_path,
                                                                        monkeypatch):
    from cmdtool.report import metrics

    def no_pass(*args, **kwargs):
        raise AssertionError("the measuring pass ran before the evaluation function was tried")

    monkeypatch.setattr(metrics, "measure", no_pass)
    message = error_line(cmd(runner, "report", fitted.mode_file, "-o", tmp_path / "out", "--eval",
                             f"{split_file}:evaluate", "--select", "accuracy"))
    assert message == ("--select accuracy: the evaluation's 'val' split has no metric 'accuracy' "
                       "(it returned peak, fc, loss)")
    assert not (tmp_path / "out").exists()


def test_eval_every_and_candidates_only_bound_the_evaluations(fitted, runner, tmp_path):
    spec = f"{fitted.evaluate_file}:evaluate"
    result = ok(cmd(runner, "report", fitted.mode_file, "-o", tmp_path / "every", "--eval", spec,
                    "--eval-every", "5"))
    evaluation = read_report(tmp_path / "every")["evaluation"]
    assert evaluation["epochs"] == [0, 5, 10, 11] and evaluation["evaluations"] == 7 * 4
    assert "evaluated 28 state dicts: 7 candidate families at 4 of 12 checkpoints" in result.stderr
    assert evaluation["per_epoch"]["ema"]["sum"][3] is None  # not evaluated
    full = read_report(fitted.evaluated)["evaluation"]  # the same numbers where both evaluated (other tails)
    assert evaluation["per_epoch"]["original"]["sum"][5] == full["per_epoch"]["original"]["sum"][5]
    ok(cmd(runner, "report", fitted.mode_file, "-o", tmp_path / "last", "--eval", spec, "--candidates-only"))
    last = read_report(tmp_path / "last")
    assert last["evaluation"]["epochs"] == [T - 1]
    assert last["evaluation"]["evaluations"] == 7 + 1  # and the trial call on the first checkpoint
    assert "candidates" not in last["plots"]  # one epoch: no curve


def test_eval_file_imports_the_modules_beside_it(fitted, runner, tmp_path, monkeypatch):
    import sys
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / "evals"
    folder.mkdir()
    (folder / "cmdtool_test_helper_scores.py").write_text("def scores(state):\n    return {'one': 1.0}\n")
    (folder / "main_eval.py").write_text("from cmdtool_test_helper_scores import scores\n\n"
                                         "def evaluate(state):\n    return scores(state)\n")
    try:
        r = report(fitted, tmp_path, runner, "--eval", f"{folder / 'main_eval.py'}:evaluate", "--candidates-only")
    finally:
        sys.modules.pop("cmdtool_test_helper_scores", None)
    assert r["evaluation"]["candidates"]["last"] == {"one": 1.0}


def test_nonfinite_scores_are_counted_not_listed():
    nan = math.nan
    per_epoch = {"original": {"loss": [1.0, 2.0, 3.0]}, "cmd": {"loss": [nan, 2.0, nan], "acc": [nan, 1.0, 1.0]},
                 "ema": {"loss": [1.0, 1.0, 1.0], "acc": [1.0, 1.0, 1.0]}}
    assert selection.nonfinite_summary(per_epoch, [0, 1, 2], ["e0", "e1", "e2"]) == (
        "3 of 15 scores: cmd 3 (2 positions, e0 … e2; acc, loss)")
    assert selection.nonfinite_summary(per_epoch, [1], ["e0", "e1", "e2"]) is None  # only what was evaluated


@pytest.mark.parametrize("text, expected", [
    ("accuracy", ("accuracy", "max")), ("loss", ("loss", "min")), ("top1_error", ("top1_error", "min")),
    ("val_loss:max", ("val_loss", "max")), ("accuracy:min", ("accuracy", "min")), ("nll", ("nll", "min"))])
def test_parse_select(text, expected):
    assert tuple(selection.parse_select(text)) == expected


def test_flatten_scores_forms():
    assert selection.flatten_scores({"a": 1, "b": 2.5}, "x", "f") == {"a": 1.0, "b": 2.5}
    assert selection.flatten_scores({"val": {"a": 1}, "test": {"a": 2}}, "x", "f") == {"val/a": 1.0, "test/a": 2.0}
    with pytest.raises(CmdError, match="some values are dicts and some are not"):
        selection.flatten_scores({"val": {"a": 1}, "b": 2}, "x", "f")
