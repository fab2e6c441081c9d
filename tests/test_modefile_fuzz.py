"""Fuzzing the mode-file reader (issue 11): random structural mutations of valid mode files (JSON
fields, names, numeric datasets, attributes, deleted parts, ``--modes auto``'s error curve and
embedded CMD's group). Every outcome of ``cmd info`` and ``cmd reconstruct --at all --force`` is
success or exit 2 with one ``error:`` line: never a traceback, a hang, or a file created, changed
or removed outside the output folder.

``CMDTOOL_FUZZ_EXAMPLES`` sets the number of mutated files (default 1500; each is opened by both
commands). Derandomized, so a failure reproduces."""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import typer.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import cmd, snapshot
from test_modefile_untrusted import VICTIM, build_sources
from test_training import planted_training

EXAMPLES = int(os.environ.get("CMDTOOL_FUZZ_EXAMPLES", "1500"))
JSON_ATTRS = ("settings", "metrics")
PLAIN_ATTRS = ("format_version", "tool_version", "format")
JSON_DATASETS = ("layout",)
STRING_DATASETS = ("checkpoints", "checkpoint_info")
NUMERIC = ("references", "reference_offset", "reference_scale", "reference_index", "labels", "a", "b", "time",
           "mode_sizes")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6)
    | st.sampled_from(["", ".", "..", "/", "../x", "/tmp/x", "state_dict", "float32", "int3", "config.json"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
hdf5_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8)  # storable
names = (hdf5_text
         | st.sampled_from(["", ".", "..", "../victim.sh", "/tmp/abs", "a/b", "epoch_0.pt"]))
SOURCES = {"json_dataset": "layout", "strings": "checkpoints", "info_field": "checkpoint_info", "numeric": "a"}
dtypes = st.sampled_from(["int8", "uint8", "int16", "int64", "float32", "float64", "bool"])


def mutate_json(data, draw):
    """Replace, delete or insert one value somewhere inside a parsed JSON document."""
    if isinstance(data, (list, dict)) and data and draw(st.booleans()):
        keys = list(range(len(data))) if isinstance(data, list) else list(data)
        key = draw(st.sampled_from(keys))
        action = draw(st.sampled_from(["recurse", "replace", "delete"]))
        if action == "delete":
            del data[key]
        elif action == "replace":
            data[key] = draw(json_values)
        else:
            data[key] = mutate_json(data[key], draw)
        return data
    return draw(json_values)


def text_of(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def numeric_array(draw, shape: tuple[int, ...]) -> np.ndarray:
    dtype = np.dtype(draw(dtypes))
    if draw(st.booleans()):  # another shape: one more or fewer, or an extra axis
        shape = draw(st.sampled_from([(max(0, (shape or (1,))[0] - 1),), ((shape or (1,))[0] + 1,), (2, 3), (0,)]))
    special = [0, -1, 1, 255, 2**31, -2**40] + ([np.nan, np.inf, 1e30] if dtype.kind == "f" else [])
    fill = draw(st.sampled_from(["special", "random"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.choice(special, size=shape) if fill == "special" else rng.normal(0, 50, size=shape)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(values).astype(dtype)


def mutate(f: h5py.File, draw) -> None:
    target = draw(st.sampled_from(["json_attr", "plain_attr", "json_dataset", "strings", "numeric", "carried",
                                   "delete", "info_field", "curve", "embedding"]))
    if target == "curve":  # --modes auto's error-vs-M curve, when the file has one
        metrics = json.loads(f.attrs["metrics"])
        if isinstance(metrics, dict) and "error_curve" in metrics:
            metrics["error_curve"] = mutate_json(metrics["error_curve"], draw)
            f.attrs["metrics"] = json.dumps(metrics)
    elif target == "embedding":  # embedded CMD's group, when the file has one
        group = f.get("embedding")
        if isinstance(group, h5py.Group):
            key = draw(st.sampled_from(["warmup", "window", "percent", "relative", "embeddable", "embedded_at"]))
            if key != "embedded_at":
                group.attrs[key] = draw(st.integers(-3, 2000) | st.floats() | st.booleans() | hdf5_text)
            elif key in group:
                data = numeric_array(draw, group[key].shape)
                del group[key]
                group[key] = data
    elif target == "json_attr":
        name = draw(st.sampled_from(JSON_ATTRS))
        f.attrs[name] = json.dumps(mutate_json(json.loads(f.attrs[name]), draw))
    elif target == "plain_attr":
        f.attrs[draw(st.sampled_from(PLAIN_ATTRS))] = draw(
            st.integers(-3, 3) | st.floats(0, 3) | hdf5_text | st.just("cmdtool-modes"))
    elif target in SOURCES and SOURCES[target] not in f:
        return  # deleted by an earlier mutation
    elif target == "json_dataset":
        layout = mutate_json(json.loads(text_of(f["layout"][()])), draw)
        del f["layout"]
        f["layout"] = json.dumps(layout)
    elif target in ("strings", "info_field"):
        name = "checkpoints" if target == "strings" else "checkpoint_info"
        values = [text_of(v) for v in f[name][()]]
        position = draw(st.integers(0, len(values) - 1))
        if target == "strings":
            values[position] = draw(names)
            if draw(st.booleans()):
                values = values[:-1] if draw(st.booleans()) else values + [draw(names)]
        else:
            values[position] = json.dumps(mutate_json(json.loads(values[position]), draw))
        del f[name]
        f[name] = np.array(values, dtype=h5py.string_dtype())
    elif target == "numeric":
        name = draw(st.sampled_from([n for n in NUMERIC if n in f] or ["a"]))
        if name not in f:
            return
        data = numeric_array(draw, f[name].shape)
        del f[name]
        f[name] = data
    elif target == "carried":
        keys = list(f["carried"]) if isinstance(f.get("carried"), h5py.Group) else []
        if keys:
            key = draw(st.sampled_from(keys))
            data = numeric_array(draw, f["carried"][key].shape)
            del f["carried"][key]
            f["carried"][key] = data
    else:
        victim = draw(st.sampled_from([*NUMERIC, *STRING_DATASETS, "layout", "carried", "attachments"]))
        if victim in f:
            del f[victim]


@pytest.fixture(scope="module")
def fuzz_sources(tmp_path_factory):
    """The plain and Hugging Face files, a ``--modes auto`` fit (``metrics.error_curve``) and an
    embedded-CMD file (the group ``embedding``)."""
    folder = tmp_path_factory.mktemp("fuzz-sources")
    sources = build_sources(folder)
    result = cmd(typer.testing.CliRunner(), "fit", folder / "plain", "-o", folder / "auto.cmd.h5", "-m", "auto",
                 "--trajectory", folder / "auto.h5")
    assert result.exit_code == 0, result.stderr
    _, _, embedded, _ = planted_training(folder)
    return {**sources, "auto": folder / "auto.cmd.h5", "embedded": embedded.save(folder / "embedded.cmd.h5")}


def outcome_is_clean(result) -> None:
    assert result.exit_code in (0, 2), f"exit {result.exit_code}: {result.stderr}\n{result.exception!r}"
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_mutated_mode_files_fail_cleanly(fuzz_sources, runner, monkeypatch):
    # speed only: the click command is built once, not per call, and the cases live in memory (tmpfs) when
    # there is one; what runs is the same CLI
    monkeypatch.setattr(typer.testing, "_get_command", functools.lru_cache(maxsize=None)(typer.testing._get_command))
    shm = Path("/dev/shm")
    fast = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="cmdtool-fuzz-", dir=fast))
    counts = {"ok": 0, "refused": 0}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(["plain", "hf", "auto", "embedded"]), data=st.data())
    def one(kind, data):
        case = Path(tempfile.mkdtemp(dir=work))
        crafted, out = case / "crafted.cmd.h5", case / "out"
        shutil.copy(fuzz_sources[kind], crafted)
        with h5py.File(crafted, "r+") as f:
            for _ in range(data.draw(st.integers(1, 3))):
                mutate(f, data.draw)
        (case / VICTIM).write_text("#!/bin/sh\necho original\n")
        before = snapshot(case)
        for command in (["info", crafted], ["reconstruct", crafted, "-o", out, "--at", "all", "--force"]):
            result = cmd(runner, *command)
            outcome_is_clean(result)
            counts["ok" if result.exit_code == 0 else "refused"] += 1
        after = {k: v for k, v in snapshot(case).items() if not k.startswith("out/")}
        assert after == before
        shutil.rmtree(case)

    try:
        one()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"fuzz: {EXAMPLES} mutated mode files, {counts['ok']} successful and {counts['refused']} refused commands")
    assert counts["refused"] > counts["ok"] / 10  # the mutations reach the checks
