"""``cmd update`` streams (cmdtool/online/update.py): the file it writes is the one the in-memory
update of ``OnlineState`` writes, bit for bit, however the columns are tiled and the new
checkpoints grouped, and whichever source the first checkpoint's values come from."""

from __future__ import annotations

import hashlib
import importlib
import shutil
from pathlib import Path

import h5py
import pytest
import torch
from safetensors.torch import save_file

import cmdtool
from cmdtool.checkpoints import checkpoint_at
from cmdtool.errors import CmdError
from cmdtool.modefile import open_mode_file, write_mode_file
from cmdtool.online.least_squares import BLOCK
from cmdtool.online.state import OnlineState, read_checkpoint
from cmdtool.online.update import plan_update
from helpers import assert_same_mode_files, plant, write_run

streaming = importlib.import_module("cmdtool.online.update")  # the module (cmdtool.online.update is the function)
F, T = 8, 14  # checkpoints in the mode file before the update, and in the run
SHAPES = {"w": (200, 700), "b": (700,), "bn.weight": (8,)}
N = 140_708  # two whole blocks of update_parameters and a part


def update_in_memory(mode_file: Path, paths: list[Path], first: Path | None = None) -> None:
    """The update as it was before it streamed: every parameter in an ``OnlineState``, each new
    checkpoint read as a whole row, the mode file written at the end (``first``: the first
    checkpoint, for a mode file without online state)."""
    with open_mode_file(mode_file) as modes:
        name = modes.names[0]
        row = None if first is None else read_checkpoint(checkpoint_at(first), modes.layout, name)[0]
        state = OnlineState.from_modes(modes.load(), row)
        _, new = plan_update(modes, [checkpoint_at(p) for p in paths])
        for c in new:
            w, carried, info, attachments = read_checkpoint(c, modes.layout, name)
            state.observe(w, c.name, c.time, info, carried, attachments)
        write_mode_file(mode_file, state.to_modes(), replaces=modes)


@pytest.fixture
def run(tmp_path):
    planted = plant(M=3, T=T, noise=1e-2, seed=5, shapes=SHAPES)
    return write_run(tmp_path / "run", planted.states())


def later(run: Path) -> list[Path]:
    return [run / f"epoch_{t}.safetensors" for t in range(F, T)]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of one block and groups of 2 checkpoints: 3 tiles, and 3 passes over them through the
    float64 scratch file (by default N is one tile and the 6 new checkpoints one group)."""
    monkeypatch.setattr(streaming, "TILE_COLUMNS", BLOCK)
    monkeypatch.setattr(streaming, "OPEN_AT_ONCE", 2)


@pytest.mark.parametrize("tiling", ["defaults", "small tiles"])
def test_update_of_an_online_fit_equals_the_in_memory_update(tmp_path, run, request, tiling):
    if tiling == "small tiles":
        request.getfixturevalue("small_tiles")
    fitted = tmp_path / "fitted.cmd.h5"
    cmdtool.fit(run, fitted, modes=3, warmup=F - 2, stop=F, trajectory=tmp_path / "t.h5")
    streamed, in_memory = tmp_path / "streamed.cmd.h5", tmp_path / "in_memory.cmd.h5"
    shutil.copy(fitted, streamed)
    shutil.copy(fitted, in_memory)
    cmdtool.update(streamed, later(run))
    update_in_memory(in_memory, later(run))
    assert_same_mode_files(streamed, in_memory)
    with open_mode_file(streamed) as modes:
        assert modes.T == T and modes.warmup == F - 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no scratch left


@pytest.mark.parametrize("source", ["store", "checkpoint", "folder"])
def test_first_update_of_a_plain_fit_equals_the_in_memory_update(tmp_path, run, small_tiles, source):
    """A plain ``cmd fit`` has no online state: the first checkpoint's values come, tile by tile,
    from the fit's trajectory store, a checkpoint of that name passed along, or the fit's folder."""
    fitted = tmp_path / "fitted.cmd.h5"
    cmdtool.fit(run, fitted, modes=3, stop=F, trajectory=tmp_path / "t.h5")
    paths = later(run)
    if source != "store":
        (tmp_path / "t.h5").unlink()
    if source == "checkpoint":
        copy = tmp_path / "copy"
        copy.mkdir()
        shutil.copy(run / "epoch_0.safetensors", copy)
        paths = [copy / "epoch_0.safetensors", *paths]
        (run / "epoch_0.safetensors").rename(tmp_path / "away.safetensors")  # not from the folder
    streamed, in_memory = tmp_path / "streamed.cmd.h5", tmp_path / "in_memory.cmd.h5"
    shutil.copy(fitted, streamed)
    shutil.copy(fitted, in_memory)
    result = cmdtool.update(streamed, paths)
    assert result.absorbed == [p.name for p in later(run)]
    first = paths[0] if source == "checkpoint" else run / "epoch_0.safetensors"
    update_in_memory(in_memory, later(run), first)
    assert_same_mode_files(streamed, in_memory)
    with h5py.File(streamed) as f:
        assert f["online"].attrs["warmup"] == F and f["online/first"].shape == (N,)


@pytest.mark.parametrize("fmt, dtype", [("pt", torch.float32), ("safetensors", torch.bfloat16)])
def test_torch_files_and_bfloat16_stream_as_they_read_whole(tmp_path, small_tiles, fmt, dtype):
    """Spans of a torch file's tensors (cut from the loaded tensor) and of bfloat16 tensors
    (converted span by span) are the values a whole row holds."""
    planted = plant(M=3, T=T, noise=1e-2, seed=6, shapes=SHAPES)
    run = write_run(tmp_path / "run", planted.states(dtype), fmt=fmt)
    fitted = tmp_path / "fitted.cmd.h5"
    cmdtool.fit(run, fitted, modes=3, warmup=F, stop=F, trajectory=tmp_path / "t.h5")
    paths = [run / f"epoch_{t}.{fmt}" for t in range(F, T)]
    streamed, in_memory = tmp_path / "streamed.cmd.h5", tmp_path / "in_memory.cmd.h5"
    shutil.copy(fitted, streamed)
    shutil.copy(fitted, in_memory)
    cmdtool.update(streamed, paths)
    update_in_memory(in_memory, paths)
    assert_same_mode_files(streamed, in_memory)


def test_a_bad_value_in_the_last_group_leaves_the_file_untouched(tmp_path, run, small_tiles):
    """NaN in the last tensor of the last new checkpoint, found in the last pass: the old file stays,
    and neither the new file nor the scratch file is left behind."""
    fitted = tmp_path / "m.cmd.h5"
    cmdtool.fit(run, fitted, modes=3, warmup=F, stop=F, trajectory=tmp_path / "t.h5")
    state = plant(M=3, T=T, noise=1e-2, seed=5, shapes=SHAPES).states()[T - 1]
    state["w"][-1, -1] = float("nan")
    save_file(state, str(run / f"epoch_{T - 1}.safetensors"))
    before = digest(fitted)
    with pytest.raises(CmdError, match=rf"epoch_{T - 1}.safetensors: tensor 'w' contains NaN values"):
        cmdtool.update(fitted, later(run))
    assert digest(fitted) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
