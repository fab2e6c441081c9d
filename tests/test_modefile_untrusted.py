"""A mode file is untrusted input (issue 11, item 1): crafted files are refused when opened, with
one line, before anything is allocated or written; nothing outside the output folder is ever
created, replaced or deleted, ``--force`` or not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from helpers import cmd, error_line, plant, snapshot

VICTIM = "victim.sh"


def hf_run(folder: Path) -> Path:
    """Three Hugging Face checkpoint folders, each in two shards with an index and a config.json."""
    for step, state in zip((10, 20, 30), plant(T=3).states()):
        target = folder / f"checkpoint-{step}"
        target.mkdir(parents=True)
        state = {k: v for k, v in state.items() if k != "bn.num_batches_tracked"}
        state["pos.ids"] = torch.arange(4, dtype=torch.int64)
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
        for shard, keys in shards.items():
            save_file({k: state[k] for k in keys}, str(target / shard), metadata={"format": "pt"})
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (target / "config.json").write_text('{"model_type": "toy"}')
    return folder


def build_sources(folder: Path) -> dict[str, Path]:
    """Valid mode files to craft from: a plain torch run (carried int64) and a sharded HF run."""
    runner = CliRunner()
    plain_run = folder / "plain"
    plain_run.mkdir()
    for t, state in enumerate(plant(T=4).states()):
        torch.save({"state_dict": state, "epoch": t}, plain_run / f"epoch_{t}.pt")
    out = {}
    for name, run in (("plain", plain_run), ("hf", hf_run(folder / "hf"))):
        result = cmd(runner, "fit", run, "-o", folder / f"{name}.cmd.h5", "-m", "3", "--trajectory",
                     folder / f"{name}.h5")
        assert result.exit_code == 0, result.stderr
        out[name] = folder / f"{name}.cmd.h5"
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    return build_sources(tmp_path_factory.mktemp("sources"))


def craft(sources, tmp_path, kind: str, edit) -> Path:
    """A copy of a valid mode file, changed by ``edit(h5py.File)``."""
    path = tmp_path / "crafted.cmd.h5"
    shutil.copy(sources[kind], path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def replace(f, name: str, data) -> None:
    del f[name]
    f[name] = data


def set_names(names):
    return lambda f: replace(f, "checkpoints", np.array(names, dtype=h5py.string_dtype()))


def set_info(position: int, change):
    def edit(f):
        infos = [s.decode() if isinstance(s, bytes) else s for s in f["checkpoint_info"][()]]
        info = json.loads(infos[position])
        change(info)
        infos[position] = json.dumps(info)
        replace(f, "checkpoint_info", np.array(infos, dtype=h5py.string_dtype()))
    return edit


def set_layout(change):
    def edit(f):
        layout = json.loads(f["layout"][()])
        change(layout)
        replace(f, "layout", json.dumps(layout))
    return edit


def huge_labels(f):
    """2^34 parameters declared by the layout and by datasets that the 100 KB file cannot hold."""
    layout = json.loads(f["layout"][()])
    layout[0][1], shift = [2**34], 2**34 - int(np.prod(layout[0][1]))
    for entry in layout[1:]:
        if entry[3]:
            entry[4] += shift
    replace(f, "layout", json.dumps(layout))
    for name, dtype in (("labels", "u1"), ("a", "f4"), ("b", "f4")):
        del f[name]
        f.create_dataset(name, shape=(sum(int(np.prod(e[1])) for e in layout if e[3]),), dtype=dtype)


def nested(depth: int):
    return "[" * depth + "]" * depth


CORRUPT = "corrupt mode file"
CASES = [
    ("plain", set_names(["/tmp/x.pt", "epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]),
     "checkpoint name '/tmp/x.pt' is not a plain file name"),
    ("plain", set_names([f"../{VICTIM}", "epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]),
     f"checkpoint name '../{VICTIM}' is not a plain file name"),
    ("plain", set_names(["", "epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]),
     "checkpoint name '' is not a plain file name"),
    ("plain", set_names([".", "epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]),
     "checkpoint name '.' is not a plain file name"),
    ("plain", set_names(["epoch_1.pt", "epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]), "checkpoint names are not unique"),
    ("hf", set_info(2, lambda i: i["files"].update({f"../{VICTIM}": i["files"].pop("config.json")})),
     f"copied file '../{VICTIM}' is not a plain file name"),
    ("hf", set_info(2, lambda i: i["shards"].update({"../x.safetensors": i["shards"].pop(
        "model-00001-of-00002.safetensors")})), "shard '../x.safetensors' is not a plain file name"),
    ("hf", set_info(2, lambda i: i["index"].update(name="")), "index '' is not a plain file name"),
    ("hf", set_info(2, lambda i: i["files"].update({"model-00001-of-00002.safetensors": i["files"]["config.json"]})),
     "checkpoint_info of 'checkpoint-30': a file name is used twice"),
    ("hf", set_info(2, lambda i: i["shards"]["model-00001-of-00002.safetensors"].append("ghost.weight")),
     "checkpoint_info of 'checkpoint-30': the shards lists the unknown tensor 'ghost.weight'"),
    ("hf", set_info(2, lambda i: i["shards"]["model-00001-of-00002.safetensors"].pop()),
     "checkpoint_info of 'checkpoint-30': the shards do not list every tensor exactly once"),
    ("plain", set_info(0, lambda i: i["extras"].update(state_dict=1)),
     "checkpoint_info of 'epoch_0.pt': extras hold the wrapper key 'state_dict'"),
    ("plain", lambda f: replace(f, "reference_index", np.array([0, 1, 10**6])),
     "reference_index out of range (N = 970)"),
    ("plain", lambda f: replace(f, "labels", f["labels"][()].astype(np.float32)),
     "labels has dtype float32, expected integers"),
    ("plain", lambda f: replace(f, "labels", np.where(np.arange(970) == 7, -1, f["labels"][()].astype(np.int8))),
     "labels out of range (M = 3)"),
    ("plain", lambda f: replace(f, "references", np.full(f["references"].shape, np.nan, dtype=np.float32)),
     "references holds NaN or Inf"),
    ("plain", lambda f: f.attrs.__setitem__("format_version", 1.9), "format_version 1.9 is not an integer"),
    ("plain", lambda f: f.attrs.modify("metrics", "{}"), "KeyError: 'rel_error'"),
    ("plain", lambda f: f.attrs.modify("settings", '{"include": "conv.*"}'), "settings.include is str, expected list"),
    ("plain", set_layout(lambda layout: layout[-1].__setitem__(2, "int3")),
     "tensor 'bn.num_batches_tracked' has dtype "
     "'int3', not one of float16, bfloat16, float32, float64, bool, uint8, int8, int16, uint16, int32, uint32, int64, "
     "uint64, float8_e4m3fn, float8_e5m2, float8_e4m3fnuz, float8_e5m2fnuz, float8_e8m0fnu, complex32, complex64, "
     "complex128"),
    ("plain", set_layout(lambda layout: layout[-1].__setitem__(1, [-1])),
     "layout entry for tensor 'bn.num_batches_tracked' has fields of the wrong type"),
    ("plain", lambda f: replace(f, "carried/bn.num_batches_tracked", np.zeros((4, 7), np.uint8)),
     "carried tensor 'bn.num_batches_tracked' missing"),
    ("plain", huge_labels, f"dataset 'a' declares {4 * (2**34 + 970 - 8 * 27)} bytes, more than the file's"),
    ("plain", lambda f: replace(f, "checkpoint_info", np.array([nested(10**5)] * 4, dtype=h5py.string_dtype())),
     "RecursionError"),
]
IDS = ["absolute-name", "dotdot-name", "empty-name", "dot-name", "duplicate-names", "copied-file-traversal",
       "shard-traversal", "empty-index-name", "shard-and-file-same-name", "shard-unknown-tensor",
       "shard-misses-tensor", "extras-wrapper-key", "reference-index", "float-labels", "negative-label",
       "nan-references", "float-version", "empty-metrics", "settings-type", "unknown-dtype", "negative-shape",
       "carried-size", "declared-2^34", "deep-json"]


@pytest.mark.parametrize("kind, edit, problem", CASES, ids=IDS)
def test_crafted_mode_file_is_refused_and_writes_nothing(runner, tmp_path, sources, kind, edit, problem):
    crafted = craft(sources, tmp_path, kind, edit)
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / VICTIM).write_text("#!/bin/sh\necho original\n")
    before = snapshot(tmp_path)
    for command in (["info", crafted], ["reconstruct", crafted, "-o", out, "--at", "all", "--force"]):
        message = error_line(cmd(runner, *command))
        assert message.startswith(f"{crafted}: {CORRUPT} (") and problem in message, message
    assert snapshot(tmp_path) == before and list(out.iterdir()) == []


def test_names_that_collide_as_safetensors_are_refused(runner, tmp_path, sources):
    """``a.pt`` and ``a.pth`` both become ``a.safetensors`` with ``--format safetensors``."""
    crafted = craft(sources, tmp_path, "plain", set_names(["e.pt", "e.pth", "f.pt", "g.pt"]))
    out = tmp_path / "out"
    message = error_line(cmd(runner, "reconstruct", crafted, "-o", out, "--at", "0,1", "--format", "safetensors"))
    assert message == f"{out / 'e.safetensors'}: two checkpoints would be written under this name"
    assert not out.exists()


def test_symlink_in_output_is_not_replaced(runner, tmp_path, sources):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / VICTIM
    victim.write_text("original")
    (out / "epoch_3.pt").symlink_to(victim)
    message = error_line(cmd(runner, "reconstruct", sources["plain"], "-o", out, "--force"))
    assert message == f"{out / 'epoch_3.pt'}: is a symbolic link; cmdtool does not replace links (remove it first)"
    assert victim.read_text() == "original"


def test_valid_files_still_open_and_reconstruct(runner, tmp_path, sources):
    for kind in ("plain", "hf"):
        out = tmp_path / kind
        result = cmd(runner, "reconstruct", sources[kind], "-o", out, "--at", "all")
        assert result.exit_code == 0, result.stderr
        assert len(list(out.iterdir())) in (3, 4)
