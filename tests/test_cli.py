"""The command line: help pages (typer is version-bounded), JSON output, module entry point."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from cmdtool.cli import app
from cmdtool.modefile import open_mode_file
from helpers import plant, write_run


@pytest.mark.parametrize("command, expected", [
    ([], ["fit", "reconstruct", "info", "ls", "Exit codes"]),
    (["fit"], ["--output", "--modes", "--samples", "--seed", "--start", "--stop", "--every",
               "--include", "--exclude", "--ema", "--trajectory", "--force", "--json"]),
    (["reconstruct"], ["--output", "--at", "--force", "--format"]),
    (["ls"], ["CKPT_DIR", "--json"]),
    (["info"], ["--json", "MODEFILE"]),
])
def test_help_lists_every_option(runner, command, expected):
    result = runner.invoke(app, command + ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for word in expected:
        assert word in result.stdout, word
    assert "--tile-columns" not in result.stdout


def test_module_entry_point_and_version():
    result = subprocess.run([sys.executable, "-m", "cmdtool", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("cmdtool ")
    result = subprocess.run([sys.executable, "-m", "cmdtool", "fit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--modes" in result.stdout


def test_fit_and_info_json(tmp_path, runner):
    planted = plant(M=3, T=16)
    run = write_run(tmp_path / "run", planted.states())
    out = tmp_path / "m.cmd.h5"
    result = runner.invoke(app, ["fit", str(run), "-o", str(out), "-m", "3", "--json",
                                 "--trajectory", str(tmp_path / "t.h5")])
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)
    T, N = planted.W.shape
    assert fit["format_version"] == 1 and fit["checkpoints"] == T and fit["parameters"] == N
    assert fit["modes"] == 3 == len(fit["mode_sizes"]) and sum(fit["mode_sizes"]) == N
    assert fit["mode_file"] == str(out) and fit["trajectory_reused"] is False
    assert fit["compression_ratio"] == pytest.approx(4 * N * T / out.stat().st_size)

    # rel_error and rel_error_displacement, recomputed independently from the file's datasets.
    with open_mode_file(out) as modes:
        order = planted.permutation(modes.layout)
    W = planted.W[:, order].astype(np.float32).astype(np.float64)
    with h5py.File(out, "r") as f:
        W_hat = f["a"][()] * f["references"][()].astype(np.float64)[f["labels"][()]].T + f["b"][()]
    assert fit["rel_error"] == pytest.approx(np.linalg.norm(W - W_hat) / np.linalg.norm(W), rel=1e-4)
    assert fit["rel_error_displacement"] == pytest.approx(
        np.linalg.norm(W - W_hat) / np.linalg.norm(W - W[0]), rel=1e-4
    )

    result = runner.invoke(app, ["info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info == {k: v for k, v in fit.items() if k not in ("trajectory", "trajectory_reused")}


def test_human_output_goes_to_stdout_and_messages_to_stderr(tmp_path, runner, planted):
    run = write_run(tmp_path / "run", planted.states())
    out = tmp_path / ("a-long-folder-name-" * 6) / "m.cmd.h5"  # messages must not wrap long paths
    out.parent.mkdir()
    result = runner.invoke(app, ["fit", str(run), "-o", str(out), "-m", "3", "--trajectory", str(tmp_path / "t.h5")])
    assert result.exit_code == 0, result.output
    assert "rel_error" in result.stdout and "compression" in result.stdout
    assert f"wrote {out}" in result.stderr.splitlines() and "trajectory store: " in result.stderr
    assert "━" not in result.stderr  # no progress bar when stderr is not a terminal
    result = runner.invoke(app, ["info", str(out)], terminal_width=200)
    assert "reference parameter" in result.stdout
    assert re.search(r"^\s*0\s+[\d,]+\s+[\d.]+%\s+(conv|bn|fc)\.\w+\[[\d, ]+\]", result.stdout, re.M)


def test_ls_lists_checkpoints_and_skips(tmp_path, runner):
    run = write_run(tmp_path / "run", plant(T=3).states(), fmt="torch", wrapper="model")
    (run / "last.ckpt").write_bytes((run / "epoch_2.pt").read_bytes())
    (run / "checkpoint-9").mkdir()
    result = runner.invoke(app, ["ls", str(run), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "folder": str(run),
        "time_source": "epoch",
        "checkpoints": [
            {"position": t, "time": t, "name": f"epoch_{t}.pt", "format": "plain torch"} for t in range(3)
        ],
        "skipped": [
            {
                "name": "checkpoint-9",
                "reason": "folder without model weights (no model.safetensors, pytorch_model.bin or "
                "adapter_model.safetensors)",
            },
            {"name": "last.ckpt", "reason": "Lightning's copy of the latest checkpoint (save_last)"},
        ],
    }
    result = runner.invoke(app, ["ls", str(run)], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"3 checkpoints in {run}, time from the stored epoch"
    assert lines[1:5] == [
        "position  time  checkpoint  format",
        "0         0     epoch_0.pt  plain torch",
        "1         1     epoch_1.pt  plain torch",
        "2         2     epoch_2.pt  plain torch",
    ]
    assert lines[5:] == [
        "skipped 2",
        "entry         reason",
        "checkpoint-9  folder without model weights (no model.safetensors, pytorch_model.bin or "
        "adapter_model.safetensors)",
        "last.ckpt     Lightning's copy of the latest checkpoint (save_last)",
    ]


def test_sizes_against_the_checkpoints_own_bytes(tmp_path, runner):
    """A bfloat16 run: compression is quoted against its own bytes, and against float32 (labelled);
    no warning while the mode file is the smaller."""
    planted = plant(M=3, T=20, shapes={"w": (128, 256)})
    run = write_run(tmp_path / "run", planted.states(torch.bfloat16))
    out = tmp_path / "m.cmd.h5"
    result = runner.invoke(app, ["fit", str(run), "-o", str(out), "-m", "3", "--json",
                                 "--trajectory", str(tmp_path / "t.h5")])
    assert result.exit_code == 0, result.output
    fit, size = json.loads(result.stdout), out.stat().st_size
    T, N = planted.W.shape
    carried = T * 8  # the int64 step counter
    assert fit["checkpoint_bytes"] == 2 * N * T + carried and fit["checkpoint_dtypes"] == ["bfloat16"]
    assert fit["compression_ratio_checkpoint_bytes"] == pytest.approx((2 * N * T + carried) / size)
    assert fit["compression_ratio"] == pytest.approx(4 * N * T / size)
    assert "warning" not in result.stderr
    info = runner.invoke(app, ["info", str(out)], terminal_width=300)
    rows = [line.split("  ", 1) for line in info.stdout.splitlines() if line.startswith("compression")]
    assert [(label.strip(), text.strip()) for label, text in rows] == [
        ("compression", f"{(2 * N * T + carried) / size:.1f}× ({(2 * N * T + carried) / 1e6:.3g} MB of bfloat16 "
                        "checkpoint tensors)"),
        ("compression, float32", f"{4 * N * T / size:.1f}× ({4 * N * T / 1e6:.3g} MB of modelled parameters as "
                                 "float32)")]
    result = runner.invoke(app, ["report", str(out), "-o", str(tmp_path / "report"), "--json"])
    assert result.exit_code == 0, result.output
    compact = json.loads(result.stdout)["compactness"]
    assert compact["checkpoint_bytes_modelled"] == 2 * N * T and compact["checkpoint_dtypes"] == ["bfloat16"]
    assert compact["compression_ratio_modelled_checkpoint_bytes"] == pytest.approx(
        compact["compression_ratio_modelled"] / 2)
    assert (f"The checkpoints store them as bfloat16: against their own {2 * N * T / 1e6:.3g} MB, CMD's compression "
            f"is {compact['compression_ratio_modelled'] / 2:.1f}×") in (tmp_path / "report" / "report.md").read_text()


def test_warning_when_the_mode_file_is_not_smaller(tmp_path, runner):
    planted = plant(M=2, T=3, shapes={"w": (4, 4)})
    run = write_run(tmp_path / "run", planted.states())
    out = tmp_path / "m.cmd.h5"
    for command in (["fit", str(run), "-o", str(out), "-m", "2", "--trajectory", str(tmp_path / "t.h5")],
                    ["info", str(out)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert warnings == [f"warning: the mode file ({out.stat().st_size / 1e3:.3g} KB) is not smaller than the 3 "
                            f"checkpoints' tensors ({3 * (16 * 4 + 8)} B): it stores about 9 bytes per parameter "
                            "(a, b and a mode label) plus fixed overhead, so it saves space only with more "
                            "checkpoints or a larger model"], result.stderr
