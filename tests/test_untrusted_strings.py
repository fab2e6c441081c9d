"""Stored strings reach terminals and Markdown only escaped: ``cmd info``, ``cmd ls``, ``cmd update``
and ``cmd reconstruct`` write control characters of checkpoint names, ``settings.source`` and
``error_curve.rule`` as ``\\x1b``; report.md writes Markdown and HTML in them as text. And a mode
file's error curve is checked: no 10**400, ``chosen`` the M it was fitted with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.torch import save_file

from cmdtool.console import shown
from helpers import cmd, error_line, ok, plant

ESCAPE = "\x1b[2J\x1b]0;owned\x07"
NAME = f"epoch_{ESCAPE}0.safetensors"
HTML = "<script>alert(1)</script> ![x](http://example.invalid/x.png)"


@pytest.fixture(scope="module")
def auto_fit(tmp_path_factory) -> Path:
    """A --modes auto fit (it has an error curve) of a run whose first checkpoint's name holds
    escape sequences."""
    from typer.testing import CliRunner
    folder = tmp_path_factory.mktemp("strings")
    run = folder / "run"
    run.mkdir()
    for t, state in enumerate(plant(T=5).states()):
        save_file(state, str(run / (NAME if t == 0 else f"epoch_{t}.safetensors")), metadata={"epoch": str(t)})
    ok(cmd(CliRunner(), "fit", run, "-o", folder / "m.cmd.h5", "-m", "auto:3", "--trajectory", folder / "t.h5"))
    return folder / "m.cmd.h5"


def crafted(tmp_path: Path, source: Path, settings=None, curve=None) -> Path:
    path = tmp_path / "crafted.cmd.h5"
    shutil.copy(source, path)
    with h5py.File(path, "r+") as f:
        if settings:
            f.attrs["settings"] = json.dumps({**json.loads(f.attrs["settings"]), **settings})
        if curve:
            metrics = json.loads(f.attrs["metrics"])
            metrics["error_curve"].update(curve)
            f.attrs["metrics"] = json.dumps(metrics)
    return path


def test_shown_escapes_control_characters_only():
    assert shown("a\x1b[31mb\r\n\x9b\u202ec\udc80 é… ok") == "a\\x1b[31mb\\r\\n\\x9b\\u202ec\\udc80 é… ok"


@pytest.fixture
def wide(monkeypatch):
    """Tables as wide as their text (rich would wrap them at the runner's 80 columns)."""
    from rich.console import Console

    import cmdtool.console
    monkeypatch.setattr(cmdtool.console, "stdout", Console(highlight=False, width=5000))


def test_info_escapes_names_source_and_rule(runner, tmp_path, auto_fit, wide):
    path = crafted(tmp_path, auto_fit, settings={"source": f"/runs/{ESCAPE}"}, curve={"rule": f"{ESCAPE}{HTML}"})
    out = ok(cmd(runner, "info", path)).stdout
    assert "\x1b" not in out and "\x07" not in out
    assert shown(NAME) in out and f"of /runs/{shown(ESCAPE)}" in out and f": {shown(ESCAPE)}{HTML} (" in out
    assert json.loads(ok(cmd(runner, "info", path, "--json")).stdout)["checkpoint_names"][0] == NAME  # JSON: exact


def test_ls_update_and_reconstruct_escape_names(runner, tmp_path, auto_fit):
    run = auto_fit.parent / "run"
    listing = ok(cmd(runner, "ls", run)).stdout
    assert "\x1b" not in listing and shown(NAME) in listing
    out = tmp_path / "out"
    written = ok(cmd(runner, "reconstruct", auto_fit, "-o", out, "--at", "first")).stdout
    assert written == shown(out / NAME) + "\n" and (out / NAME).is_file()
    copy = tmp_path / "copy.cmd.h5"
    shutil.copy(auto_fit, copy)
    result = cmd(runner, "update", copy, run / NAME)
    assert result.exit_code == 0 and "\x1b" not in result.stderr + result.stdout
    assert f"skipped: {shown(NAME)}" in result.stderr


def test_report_md_writes_stored_markdown_and_html_as_text(runner, tmp_path, auto_fit):
    path = crafted(tmp_path, auto_fit, curve={"rule": HTML, "measured_on": "**bold** `code` _x_"})
    ok(cmd(runner, "report", path, "-o", tmp_path / "report"))
    for name in ("report.md", "summary.md"):
        markdown = (tmp_path / "report" / name).read_text()
        assert "<script>" not in markdown and "![x](" not in markdown and "\x1b" not in markdown
        assert ("(\\<script\\>alert(1)\\</script\\> \\!\\[x\\](http://example.invalid/x.png); measured on "
                "\\*\\*bold\\*\\* \\`code\\` \\_x\\_)") in markdown
        assert "(epoch\\_\\\\x1b\\[2J\\\\x1b\\]0;owned\\\\x070.safetensors … epoch_4.safetensors" in markdown
    page = (tmp_path / "report" / "report.html").read_text()
    assert ("(&lt;script&gt;alert(1)&lt;/script&gt; ![x](http://example.invalid/x.png); measured on "
            "**bold** `code` _x_)") in page
    assert "<script>" not in page


@pytest.mark.parametrize("curve, problem", [
    ({"rel_error": [10**400, 0.1, 0.1]}, "metrics.error_curve.rel_error must be finite numbers, not negative"),
    ({"chosen": 2}, "metrics.error_curve.chosen is 2, but the fit asked for at most 3 modes and found 3"),
], ids=["10**400", "chosen-not-M"])
def test_a_bad_error_curve_is_refused(runner, tmp_path, auto_fit, curve, problem):
    with h5py.File(auto_fit, "r") as f:
        assert json.loads(f.attrs["metrics"])["error_curve"]["chosen"] == 3 and f["references"].shape[0] == 3
    path = crafted(tmp_path, auto_fit, curve=curve)
    for command in (["info", path], ["report", path, "-o", tmp_path / "report"],
                    ["update", path, auto_fit.parent / "run"]):
        assert error_line(cmd(runner, *command)) == f"{path}: corrupt mode file ({problem})"
    assert not (tmp_path / "report").exists()
    assert np.array_equal(h5py.File(path, "r")["a"][()], h5py.File(auto_fit, "r")["a"][()])
