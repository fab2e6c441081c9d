"""The mode-file fields added since issue 11 are untrusted input too: ``metrics.error_curve``
(``--modes auto``), the group ``embedding`` (embedded CMD) and the settings' booleans. A crafted
value is refused when the file is opened, with one line and exit 2, and nothing is written."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import cmd, error_line, ok, plant, snapshot
from test_modefile_untrusted import replace
from test_training import planted_training

CORRUPT = "corrupt mode file"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """A ``--modes auto`` fit (its trajectory store kept, for ``cmd report``) and an embedded-CMD file."""
    folder = tmp_path_factory.mktemp("field-sources")
    run = folder / "run"
    run.mkdir()
    for t, state in enumerate(plant(M=3, T=6).states()):
        torch.save({"state_dict": state, "epoch": t}, run / f"epoch_{t}.pt")
    ok(cmd(CliRunner(), "fit", run, "-o", folder / "auto.cmd.h5", "-m", "auto", "--trajectory", folder / "auto.h5"))
    _, _, embedded, _ = planted_training(folder)
    return {"auto": folder / "auto.cmd.h5", "embedded": embedded.save(folder / "embedded.cmd.h5")}


def edit_json(attr: str, change):
    def edit(f):
        data = json.loads(f.attrs[attr])
        change(data)
        f.attrs[attr] = json.dumps(data)
    return edit


def curve(change):
    return edit_json("metrics", lambda m: change(m["error_curve"]))


def set_curve(value):
    return edit_json("metrics", lambda m: m.__setitem__("error_curve", value))


def set_attr(key, value):
    return lambda f: f["embedding"].attrs.__setitem__(key, value)


def set_embedded_at(change):
    return lambda f: replace(f, "embedding/embedded_at", change(f["embedding/embedded_at"][()]))


CASES = {
    "curve-string": ("auto", set_curve("x"), "metrics.error_curve is not a JSON object"),
    "curve-list": ("auto", set_curve([1, 2]), "metrics.error_curve is not a JSON object"),
    "curve-no-rule": ("auto", curve(lambda c: c.pop("rule")), "metrics.error_curve has no 'rule'"),
    "curve-bad-errors": ("auto", curve(lambda c: c.update(rel_error=["a", None] + c["rel_error"][2:])),
                         "metrics.error_curve.rel_error must be finite numbers, not negative"),
    "curve-nan-error": ("auto", curve(lambda c: c["rel_error"].__setitem__(0, float("nan"))),
                        "metrics.error_curve.rel_error must be finite numbers, not negative"),
    "curve-short": ("auto", curve(lambda c: c["found"].pop()),
                    "metrics.error_curve: modes, found and rel_error must be lists of one length"),
    "curve-float-modes": ("auto", curve(lambda c: c["modes"].__setitem__(0, 1.5)),
                          "metrics.error_curve.modes must be distinct integers of at least 1"),
    "curve-found-above": ("auto", curve(lambda c: c["found"].__setitem__(0, 7)),
                          "metrics.error_curve.found must be integers from 1 to the M tried"),
    "curve-chosen": ("auto", curve(lambda c: c.update(chosen=99)),
                     "metrics.error_curve.chosen must be one of its modes"),
    "curve-chosen-float": ("auto", curve(lambda c: c.update(chosen=float(c["chosen"]))),
                           "metrics.error_curve.chosen must be one of its modes"),
    "curve-rule-type": ("auto", curve(lambda c: c.update(rule=5)),
                        "metrics.error_curve: measured_on and rule must be strings"),
    "drop-unmodelled-string": ("auto", edit_json("settings", lambda s: s.update(drop_unmodelled="yes")),
                               "settings.drop_unmodelled is str, expected bool"),
    "ema-string": ("auto", edit_json("settings", lambda s: s.update(ema="no")), "settings.ema is str, expected bool"),
    "embedded-at-float": ("embedded", set_embedded_at(lambda v: v.astype(np.float64)),
                          "embedding embedded_at (dtype float64, shape (970,)) must be (970,) integers"),
    "embedded-at-shape": ("embedded", set_embedded_at(lambda v: v[:-1]),
                          "embedding embedded_at (dtype int32, shape (969,)) must be (970,) integers"),
    "embedded-at-missing": ("embedded", lambda f: f["embedding"].__delitem__("embedded_at"),
                            "embedding embedded_at (missing) must be (970,) integers"),
    "embedded-at-late": ("embedded", set_embedded_at(lambda v: np.where(np.arange(v.size) == 3, 16, v)),
                         "embedding embedded_at holds positions other than -1 and 6 … 15"),
    "embedded-at-warmup": ("embedded", set_embedded_at(lambda v: np.where(np.arange(v.size) == 3, 2, v)),
                           "embedding embedded_at holds positions other than -1 and 6 … 15"),
    "embedded-at-negative": ("embedded", set_embedded_at(lambda v: np.where(np.arange(v.size) == 3, -2, v)),
                             "embedding embedded_at holds positions other than -1 and 6 … 15"),
    "embedded-too-many": ("embedded", set_attr("embeddable", 10),
                          "embedding embedded_at embeds more than the 10 embeddable parameters"),
    "relative-string": ("embedded", set_attr("relative", "no"), "embedding attribute relative is 'no', expected "
                                                               "true or false"),
    "relative-int": ("embedded", set_attr("relative", 0), "embedding attribute relative is 0, expected true or false"),
    "warmup-float": ("embedded", set_attr("warmup", 6.0), "embedding attribute warmup is 6.0, expected an integer"),
    "window-missing": ("embedded", lambda f: f["embedding"].attrs.__delitem__("window"),
                       "embedding attribute window is None, expected an integer"),
    "percent-nan": ("embedded", set_attr("percent", np.nan), "embedding attribute percent is nan, expected a number"),
    "percent-range": ("embedded", set_attr("percent", 250.0), "embedding settings out of range (F = 6, L = 2, "
                                                             "P = 250, embeddable 968 of N = 970, T = 16)"),
    "warmup-other": ("embedded", set_attr("warmup", 5), "embedding settings out of range (F = 5"),
    "embedding-not-group": ("embedded", lambda f: (f.__delitem__("embedding"), f.create_dataset("embedding", data=1)),
                            "embedding is not a group"),
}


@pytest.mark.parametrize("kind, edit, problem", CASES.values(), ids=CASES)
def test_crafted_field_is_refused_and_writes_nothing(runner, tmp_path, sources, kind, edit, problem):
    crafted = tmp_path / "crafted.cmd.h5"
    shutil.copy(sources[kind], crafted)
    with h5py.File(crafted, "r+") as f:
        edit(f)
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(tmp_path)
    commands = [["info", crafted], ["info", crafted, "--json"],
                ["reconstruct", crafted, "-o", out / "weights", "--at", "all", "--force"]]
    if kind == "auto":
        commands.append(["report", crafted, "-o", out / "report"])
    for command in commands:
        message = error_line(cmd(runner, *command))
        assert message.startswith(f"{crafted}: {CORRUPT} (") and problem in message, (command, message)
    assert snapshot(tmp_path) == before and list(out.iterdir()) == []


def test_the_written_fields_still_open(runner, sources, tmp_path):
    for path in sources.values():
        ok(cmd(runner, "info", path))
    summary = json.loads(ok(cmd(runner, "info", sources["auto"], "--json")).stdout)
    assert summary["error_curve"]["chosen"] == summary["modes"] and summary["settings"]["auto_modes"]
    ok(cmd(runner, "report", sources["auto"], "-o", tmp_path / "report"))
    embedded = json.loads(ok(cmd(runner, "info", sources["embedded"], "--json")).stdout)["embedding"]
    assert embedded["relative"] is False and embedded["window"] == 2 and embedded["embedded"] > 0


def test_settings_booleans_are_checked_by_the_library():
    from cmdtool import CmdError
    from cmdtool.modes import FitSettings

    with pytest.raises(CmdError, match=r"drop_unmodelled must be true or false \(got 'yes'\)"):
        FitSettings(drop_unmodelled="yes")
    with pytest.raises(CmdError, match=r"ema must be true or false \(got 1\)"):
        FitSettings.from_json({"ema": 1})
