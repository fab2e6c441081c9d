"""Every command-line failure is one ``error:`` line and exit 2 (issue 11, item 5, and the full disk
of item 4): usage errors, values that are not finite, an ``--eval`` function that exits or raises,
Ctrl-C while importing, a full disk. Plots of many metrics stay bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import cmd, error_line, plant, snapshot, write_run

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A small planted run (T = 6) and its mode file, shared by the tests here (read only)."""
    folder = tmp_path_factory.mktemp("fitted")
    run = write_run(folder / "run", plant(T=6).states())
    result = cmd(CliRunner(), "fit", run, "-o", folder / "m.cmd.h5", "-m", "3", "--trajectory", folder / "t.h5")
    assert result.exit_code == 0, result.stderr
    return folder / "m.cmd.h5"


@pytest.mark.parametrize("args, message", [
    (["fit", "--bogus"], "cmd fit: No such option: --bogus (see cmd fit --help)"),
    (["fit"], "cmd fit: Missing argument 'CKPT_DIR'. (see cmd fit --help)"),
    (["fit", "run", "-o", "m.cmd.h5", "--samples", "many"], "cmd fit: Invalid value for '--samples' / '-k': "
     "Input should be a valid integer, unable to parse string as an integer (see cmd fit --help)"),
    (["fit", "run", "-o", "m.cmd.h5", "--seed", "-1"],
     "cmd fit: Invalid value for '--seed': Input should be greater than or equal to 0 (see cmd fit --help)"),
    (["watch", "run", "-o", "m.cmd.h5", "--warmup", "2", "--seed", "-1"],
     "cmd watch: Invalid value for '--seed': Input should be greater than or equal to 0 (see cmd watch --help)"),
    (["report", "m.cmd.h5", "-o", "r", "--max-rel-error", "inf"],
     "cmd report: Invalid value for '--max-rel-error': inf is not a finite number (see cmd report --help)"),
    (["report", "m.cmd.h5", "-o", "r", "--max-rel-error", "nan"],
     "cmd report: Invalid value for '--max-rel-error': nan is not a finite number (see cmd report --help)"),
    (["report", "m.cmd.h5", "-o", "r", "--max-rel-error-displacement", "-inf"], "cmd report: Invalid value for "
     "'--max-rel-error-displacement': -inf is not a finite number (see cmd report --help)"),
    (["watch", "run", "-o", "m.cmd.h5", "--warmup", "2", "--interval", "inf"],
     "cmd watch: Invalid value for '--interval': Input should be less than or equal to 86400 (see cmd watch --help)"),
    (["watch", "run", "-o", "m.cmd.h5", "--warmup", "2", "--interval", "nan"],
     "cmd watch: Invalid value for '--interval': Input should be less than or equal to 86400 (see cmd watch --help)"),
    (["frobnicate"], "cmd: No such command 'frobnicate'. (see cmd --help)"),
], ids=["unknown-option", "missing-argument", "bad-int", "negative-seed", "watch-negative-seed", "max-inf",
        "max-nan", "max-displacement-minus-inf", "interval-inf", "interval-nan", "unknown-command"])
def test_usage_errors_are_one_line(runner, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert error_line(cmd(runner, *args)) == message
    assert sorted(os.listdir(tmp_path)) == []


def test_infinite_requirement_is_refused(runner, tmp_path, fitted):
    out = tmp_path / "report"
    result = cmd(runner, "report", fitted, "-o", out, "--require", "s<inf")
    assert error_line(result) == "--require 's<inf': the threshold must be a finite number"
    assert not out.exists()


@pytest.mark.parametrize("body, problem", [
    ("import sys\ndef evaluate(state):\n    sys.exit(0)\n", "failed on checkpoint epoch_0.safetensors: "
     "called sys.exit(0)"),
    ("def evaluate(state):\n    raise SystemExit('done')\n", "failed on checkpoint epoch_0.safetensors: "
     "called sys.exit('done')"),
    ("def evaluate(state):\n    raise MemoryError()\n", "failed on checkpoint epoch_0.safetensors: MemoryError"),
], ids=["sys-exit-0", "system-exit-text", "memory-error"])
def test_eval_that_exits_or_raises_is_the_functions_failure(runner, tmp_path, fitted, body, problem):
    module = tmp_path / "evaluation.py"
    module.write_text(body)
    out = tmp_path / "report"
    before = snapshot(fitted.parent)
    result = cmd(runner, "report", fitted, "-o", out, "--eval", f"{module}:evaluate")
    assert error_line(result) == f"--eval {module}:evaluate: {problem}"
    assert not out.exists() and snapshot(fitted.parent) == before


def test_eval_module_that_exits_while_importing(runner, tmp_path, fitted):
    module = tmp_path / "exits.py"
    module.write_text("import sys\nsys.exit(3)\n")
    result = cmd(runner, "report", fitted, "-o", tmp_path / "report", "--eval", f"{module}:evaluate")
    assert error_line(result) == f"--eval '{module}:evaluate': importing {module} failed: called sys.exit(3)"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_many_metrics_plot_the_first_twelve(runner, tmp_path, fitted):
    module = tmp_path / "many.py"
    module.write_text("def evaluate(state):\n    s = float(state['fc.bias'].sum())\n"
                      "    return {f'class_{i:03d}': s + i for i in range(300)}\n")
    out = tmp_path / "report"
    result = cmd(runner, "report", fitted, "-o", out, "--eval", f"{module}:evaluate", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert len(report["evaluation"]["per_checkpoint"]["original"]) == 300  # every metric in the tables
    width, height = png_size(out / report["plots"]["metric"])
    assert (width, height) == (2080, 1080)  # 4 panels of 5.2 in by 3 rows of 3.6 in, at 100 dpi


def limited(limit: int, *args, cache: Path) -> subprocess.CompletedProcess:
    """``cmd ARGS`` in a process whose files may not grow beyond ``limit`` bytes: a full disk."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from cmdtool.cli import main; sys.argv = ['cmd'] + sys.argv[1:]; main()")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CMDTOOL_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0].removeprefix("error: ")


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, fitted):
    run = write_run(tmp_path / "run", plant(T=6).states())
    store, mode_file = tmp_path / "t.h5", tmp_path / "m.cmd.h5"
    before = snapshot(tmp_path)
    result = limited(20_000, "fit", run, "-o", mode_file, "--trajectory", store, cache=tmp_path / "cache")
    assert one_error_line(result).startswith(f"{store}: cannot write: File too large (needs about ")
    assert snapshot(tmp_path) == before

    ok = limited(10**9, "fit", run, "-o", mode_file, "--trajectory", store, "-m", "3", cache=tmp_path / "cache")
    assert ok.returncode == 0, ok.stderr
    other = tmp_path / "other.cmd.h5"
    before = snapshot(tmp_path)
    result = limited(store.stat().st_size // 2, "fit", run, "-o", other, "--trajectory", store,
                     cache=tmp_path / "cache")  # the store is reused; the mode file does not fit
    assert one_error_line(result).startswith(f"{other}: cannot write: File too large (needs about ")
    assert snapshot(tmp_path) == before

    out = tmp_path / "out"
    result = limited(2_000, "reconstruct", mode_file, "-o", out, "--at", "all", cache=tmp_path / "cache")
    # written directly (checkpoints/safetensors_writer.py): the blocks are reserved before any data
    assert one_error_line(result) == f"{out / 'epoch_0.safetensors'}: cannot write: File too large"
    assert snapshot(tmp_path) == before and not out.exists()

    report = tmp_path / "report"
    result = limited(30_000, "report", mode_file, "-o", report, cache=tmp_path / "cache")
    assert one_error_line(result) == f"{report}: File too large"
    assert snapshot(tmp_path) == before and not report.exists()


# The ``cmd`` console script (``from cmdtool.__main__ import main``), with an import hook that, at the
# first import after a Ctrl-C handler is in place, writes one byte to the file descriptor given as
# its first argument and waits there: the test interrupts it in the middle of its imports, known
# to be there by that byte rather than guessed by a sleep.
INTERRUPTED_WHILE_IMPORTING = """
import os, signal, sys, time
signal_fd = int(sys.argv.pop(1))
class Ready:
    def find_spec(self, name, path=None, target=None):
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            sys.meta_path.remove(self)
            os.write(signal_fd, b"r")
            os.close(signal_fd)
            time.sleep(120)  # still importing when the SIGINT comes
        return None
sys.meta_path.insert(0, Ready())
from cmdtool.__main__ import main
sys.exit(main())
"""


def test_ctrl_c_while_importing_prints_one_line(tmp_path):
    """SIGINT during the imports (numpy, h5py, typer: most of a second) is one line and exit 130."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = tmp_path / "cmd"  # the console script's name: the command line, not a library user
    script.write_text(INTERRUPTED_WHILE_IMPORTING)
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen([sys.executable, str(script), str(write_end), "info", str(tmp_path / "m.cmd.h5")],
                                   env=env, pass_fds=(write_end,), stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True)
        os.close(write_end)
        write_end = -1
        ready = os.read(read_end, 1)  # blocks until the child is importing with its handler in place
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if ready == b"r":
        process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert ready == b"r", stderr  # b"": the child ended without ever importing under a Ctrl-C handler
    assert (process.returncode, stderr, stdout) == (130, "interrupted: no output was written\n", "")
