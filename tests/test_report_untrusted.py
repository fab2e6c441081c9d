"""``cmd report`` against odd runs and misbehaving ``--eval`` functions: a zero-element tensor, a
5,000-character tensor name, a function that prints (also on descriptor 1), changes the working
folder, hangs, or answers a number no float holds. Each is either a whole report or one
``error:`` line with exit 2 and no report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import cmd, error_line, ok, plant, write_run

LONG = "x" * 5000


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory) -> Path:
    """A fitted run with a zero-element float tensor and a tensor of a 5,000-character name."""
    from typer.testing import CliRunner
    folder = tmp_path_factory.mktemp("odd")
    states = plant(T=4).states()
    for t, state in enumerate(states):
        state["empty.weight"] = torch.zeros(0)
        state[LONG] = state["fc.bias"] * (1 + t) + 0.5
    write_run(folder / "run", states)
    ok(cmd(CliRunner(), "fit", folder / "run", "-o", folder / "m.cmd.h5", "-m", "2", "--trajectory", folder / "t.h5"))
    return folder / "m.cmd.h5"


def evaluation(tmp_path: Path, body: str) -> str:
    path = tmp_path / "scoring.py"
    path.write_text("import os, sys, time\n\ndef evaluate(state):\n" + "".join(f"    {line}\n"
                                                                              for line in body.splitlines()))
    return f"{path}:evaluate"


def test_a_zero_element_tensor_and_a_long_name_make_a_whole_report(runner, tmp_path, odd_run):
    out = tmp_path / "report"
    ok(cmd(runner, "report", odd_run, "-o", out))
    report = json.loads((out / "report.json").read_text())
    empty = next(t for t in report["per_tensor"] if t["name"] == "empty.weight")
    assert empty["parameters"] == 0 and empty["rel_error"] == 0.0
    markdown = (out / "report.md").read_text()
    assert "| empty.weight | 0 | 0 | 0 | 0 | – | – |" in markdown  # no share of nothing
    assert f"| {LONG} | 10 |" in markdown  # whole in the tables; only the plots' labels are shortened
    assert (out / report["plots"]["mode_layers"]).stat().st_size > 0


def test_plot_labels_are_shortened_around_an_ellipsis():
    from cmdtool.report.plots import short
    assert short("conv.weight") == "conv.weight"
    label = short("a" * 30 + "b" * 4940 + "c" * 30)
    assert label == "a" * 29 + "…" + "c" * 30 and len(label) == 60


def test_an_evaluation_that_prints_leaves_json_on_stdout(tmp_path, odd_run):
    """The real command in a process of its own: stdout is descriptor 1, which the function writes
    to directly as well as with print."""
    spec = evaluation(tmp_path, "print('printed')\nos.write(1, b'written on fd 1\\n')\nreturn {'acc': 0.5}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "cmdtool", "report", str(odd_run), "-o", str(tmp_path / "report"),
                           "--eval", spec, "--candidates-only", "--json"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["evaluation"]["candidates"]["cmd"]["acc"] == 0.5
    assert "printed" in done.stderr and "written on fd 1" in done.stderr


def test_an_evaluation_answering_10_to_the_400_is_one_line(runner, tmp_path, odd_run):
    spec = evaluation(tmp_path, "return {'acc': 10**400}")
    message = error_line(cmd(runner, "report", odd_run, "-o", tmp_path / "report", "--eval", spec))
    assert message == (f"--eval {spec}: metric 'acc' on checkpoint epoch_0.safetensors is an integer too large "
                       "for a float")
    assert not (tmp_path / "report").exists()


def test_an_evaluation_that_changes_folder_changes_no_path(runner, tmp_path, odd_run, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    spec = evaluation(tmp_path, f"os.chdir({str(elsewhere)!r})\nreturn {{'acc': 0.5}}")
    monkeypatch.chdir(tmp_path)
    ok(cmd(runner, "report", odd_run, "-o", "report", "--eval", spec, "--candidates-only"))
    assert Path.cwd() == tmp_path
    assert (tmp_path / "report" / "report.json").is_file()
    assert list(elsewhere.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


@pytest.mark.parametrize("timer", ["alarm", "thread"])
def test_a_hanging_evaluation_stops_at_the_eval_timeout(runner, tmp_path, odd_run, monkeypatch, timer):
    """The SIGALRM timer of POSIX, and the waiting thread used where there is none (Windows)."""
    if timer == "thread":
        monkeypatch.delattr(signal, "setitimer", raising=False)
    elif not hasattr(signal, "setitimer"):
        pytest.skip("no SIGALRM timer on this platform")
    spec = evaluation(tmp_path, "time.sleep(30)\nreturn {'acc': 0.5}")
    message = error_line(cmd(runner, "report", odd_run, "-o", tmp_path / "report", "--eval", spec,
                             "--eval-timeout", "0.5"))
    assert message == (f"--eval {spec}: did not finish on checkpoint epoch_0.safetensors within 0.5 s "
                       "(--eval-timeout)")
    assert not (tmp_path / "report").exists()
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.default_int_handler, None)


@pytest.mark.parametrize("value, problem", [("0", "got 0.0"), ("-1", "got -1.0")])
def test_the_eval_timeout_must_be_positive_and_needs_eval(runner, tmp_path, odd_run, value, problem):
    spec = evaluation(tmp_path, "return {'acc': 0.5}")
    message = error_line(cmd(runner, "report", odd_run, "-o", tmp_path / "report", "--eval", spec,
                             "--eval-timeout", value))
    assert message == f"--eval-timeout must be a positive number of seconds ({problem})"
    message = error_line(cmd(runner, "report", odd_run, "-o", tmp_path / "report", "--eval-timeout", "5"))
    assert message == "--eval-timeout needs --eval"
