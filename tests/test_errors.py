"""Bad input: exit code 2, one clear ``error: PATH: problem`` line on stderr, no traceback, and no
partial output (no mode file, no trajectory store, no ``.*.tmp`` left behind). DESIGN.md, "Error policy"."""

from __future__ import annotations

import argparse
import pathlib

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import cmd, error_line, plant, write_run


class Evil:
    """Unpickling this touches ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def fit(runner, tmp_path, ckpt_dir, *extra, out=None):
    out = out or tmp_path / "modes.cmd.h5"
    return cmd(runner, "fit", ckpt_dir, "-o", out, "--trajectory", tmp_path / "traj.h5", *extra)


def assert_nothing_written(tmp_path, *paths):
    for path in paths:
        assert not path.exists(), f"{path} was left behind"
    assert sorted(tmp_path.rglob(".*.tmp")) == []


def fit_outputs(tmp_path):
    return tmp_path / "modes.cmd.h5", tmp_path / "traj.h5"


def small_run(tmp_path, states=None, fmt="safetensors"):
    return write_run(tmp_path / "run", states if states is not None else plant(T=3).states(), fmt=fmt)


@pytest.fixture
def mode_file(runner, tmp_path, run_dir):
    """A valid mode file of the 20-checkpoint planted run."""
    result = fit(runner, tmp_path, run_dir)
    assert result.exit_code == 0, result.stderr
    return tmp_path / "modes.cmd.h5"


# 1. the checkpoint folder

def test_missing_checkpoint_folder(runner, tmp_path):
    missing = tmp_path / "nope"
    assert error_line(fit(runner, tmp_path, missing)) == f"{missing}: no such folder"
    assert_nothing_written(tmp_path, *fit_outputs(tmp_path))


@pytest.mark.parametrize("files", [{}, {"README.txt": "notes"}], ids=["empty", "readme-only"])
def test_folder_without_checkpoints(runner, tmp_path, files):
    folder = tmp_path / "run"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    message = error_line(fit(runner, tmp_path, folder))
    assert message.startswith(f"{folder}: no checkpoint files found (looked for *.safetensors, *.pt")
    assert_nothing_written(tmp_path, *fit_outputs(tmp_path))


def test_checkpoint_dir_is_a_file(runner, tmp_path):
    path = tmp_path / "epoch_0.safetensors"
    path.write_bytes(b"x")
    assert error_line(fit(runner, tmp_path, path)) == f"{path}: is a file, expected a folder of checkpoints"
    assert_nothing_written(tmp_path, *fit_outputs(tmp_path))


# 2. too few checkpoints

def test_single_checkpoint(runner, tmp_path):
    run = small_run(tmp_path, plant(T=1).states())
    assert error_line(fit(runner, tmp_path, run)) == f"{run}: CMD needs at least 2 checkpoints, found 1"
    assert_nothing_written(tmp_path, *fit_outputs(tmp_path))


# 3. checkpoints that disagree: the message names the FIRST differing file (epoch_1, not epoch_2)

def _drop_bias(state):
    del state["fc.bias"]


def _add_extra(state):
    state["extra.weight"] = torch.zeros(2)


def _reshape_bias(state):
    state["fc.bias"] = torch.zeros(11)


def _double_bias(state):
    state["fc.bias"] = state["fc.bias"].double()


@pytest.mark.parametrize("edit, problem", [
    (_drop_bias, "tensor 'fc.bias' is missing (present in epoch_0.safetensors)"),
    (_add_extra, "tensor 'extra.weight' is not in epoch_0.safetensors"),
    (_reshape_bias, "tensor 'fc.bias' is float32 [11], but float32 [10] in epoch_0.safetensors"),
    (_double_bias, "tensor 'fc.bias' is float64 [10], but float32 [10] in epoch_0.safetensors"),
], ids=["missing-tensor", "extra-tensor", "shape", "dtype"])
def test_mismatched_checkpoints(runner, tmp_path, edit, problem):
    states = plant(T=3).states()
    edit(states[1])
    edit(states[2])
    run = small_run(tmp_path, states)
    assert error_line(fit(runner, tmp_path, run)) == f"{run / 'epoch_1.safetensors'}: {problem}"
    assert_nothing_written(tmp_path, *fit_outputs(tmp_path))


# 4. unreadable files

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(1000))  # seeded: starts with no known magic


def _random_bytes_pickle_magic(path):
    path.write_bytes(b"\x80" + np.random.default_rng(1).bytes(999))  # looks like a legacy torch pickle


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("fmt, spoil", [
    ("safetensors", _truncate), ("torch", _truncate), ("torch", _random_bytes),
    ("torch", _random_bytes_pickle_magic), ("safetensors", _empty),
], ids=["truncated-safetensors", "truncated-torch", "random-bytes-pt", "random-bytes-pickle-magic-pt",
        "empty-safetensors"])
def test_corrupt_checkpoint(runner, tmp_path, fmt, spoil):
    run = small_run(tmp_path, fmt=fmt)
    bad = run / f"epoch_1.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    spoil(bad)
    message = error_line(fit(runner, tmp_path, run))
    assert message.startswith(f"{bad}: ")
    assert "truncated or corrupt" in message
    assert "refused" not in message  # garbage is not a security refusal
    assert_nothing_written(tmp_path, *fit_outputs(tmp_path))


# 5. pickles that would run code are refused, and the code never runs

def test_code_executing_pickle_is_refused(runner, tmp_path):
    marker = tmp_path / "pwned"
    run = small_run(tmp_path, fmt="torch")
    bad = run / "epoch_1.pt"
    torch.save({"x": Evil(marker)}, bad)
    message = error_line(fit(runner, tmp_path, run))
    assert message.startswith(f"{bad}: refused: ")
    assert "could run code" in message
    assert not marker.exists()
    assert_nothing_written(tmp_path, *fit_outputs(tmp_path))


def test_refusal_names_the_offending_object(runner, tmp_path):
    """The common real case: hyper-parameters saved as an argparse.Namespace beside the weights.
    The user must learn WHICH object to strip, not only that something was refused."""
    run = small_run(tmp_path, fmt="torch")
    bad = run / "epoch_1.pt"
    torch.save({"state_dict": plant(T=3).states()[1], "args": argparse.Namespace(lr=0.1)}, bad)
    message = error_line(fit(runner, tmp_path, run))
    assert message.startswith(f"{bad}: refused: ")
    assert "argparse.Namespace" in message
    assert_nothing_written(tmp_path, *fit_outputs(tmp_path))


# 6. non-finite weights

@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weights(runner, tmp_path, value, word):
    states = plant(T=3).states()
    states[1]["fc.weight"][3, 5] = value
    run = small_run(tmp_path, states)
    message = error_line(fit(runner, tmp_path, run))
    assert message == f"{run / 'epoch_1.safetensors'}: tensor 'fc.weight' contains {word} values"
    assert_nothing_written(tmp_path, *fit_outputs(tmp_path))


# 7. an existing mode file is overwritten only with --force

def test_existing_mode_file_needs_force(runner, tmp_path):
    run = small_run(tmp_path)
    out, traj = fit_outputs(tmp_path)
    out.write_bytes(b"precious")
    assert error_line(fit(runner, tmp_path, run)) == f"{out}: already exists (use --force to overwrite)"
    assert out.read_bytes() == b"precious"
    assert_nothing_written(tmp_path, traj)

    result = fit(runner, tmp_path, run, "--force")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "cmdtool-modes"
    assert_nothing_written(tmp_path)


# 8. reconstruct does not overwrite without --force

def test_reconstruct_existing_target_needs_force(runner, tmp_path, mode_file):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "epoch_19.safetensors"
    target.write_bytes(b"precious")
    message = error_line(cmd(runner, "reconstruct", mode_file, "-o", out))
    assert message == f"{target}: already exists (use --force to overwrite)"
    assert target.read_bytes() == b"precious"
    assert [p.name for p in out.iterdir()] == ["epoch_19.safetensors"]

    result = cmd(runner, "reconstruct", mode_file, "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    assert set(load_file(str(target))) == set(plant().states()[0])
    assert_nothing_written(tmp_path)


# 9. a mode file from a future version

@pytest.mark.parametrize("command", ["info", "reconstruct"])
def test_unknown_format_version(runner, tmp_path, mode_file, command):
    with h5py.File(mode_file, "r+") as f:
        f.attrs["format_version"] = 99
    out = tmp_path / "out"
    args = ["info", mode_file] if command == "info" else ["reconstruct", mode_file, "-o", out]
    message = error_line(cmd(runner, *args))
    assert message.startswith(f"{mode_file}: mode-file format version 99 is not supported")
    assert_nothing_written(tmp_path, out)


# 10. a folder where a file is expected, and a file where a folder is expected

@pytest.mark.parametrize("command", ["info", "reconstruct", "fit"])
def test_directory_where_file_expected(runner, tmp_path, command):
    folder = tmp_path / "folder.cmd.h5"
    folder.mkdir()
    out = tmp_path / "out"
    if command == "info":
        result, expected = cmd(runner, "info", folder), f"{folder}: is a directory, expected a mode file"
    elif command == "reconstruct":
        result = cmd(runner, "reconstruct", folder, "-o", out)
        expected = f"{folder}: is a directory, expected a mode file"
    else:
        result = fit(runner, tmp_path, small_run(tmp_path), out=folder)
        expected = f"{folder}: is a directory, expected a mode-file path"
    assert error_line(result) == expected
    assert folder.is_dir() and list(folder.iterdir()) == []
    assert_nothing_written(tmp_path, out, tmp_path / "traj.h5")


def test_reconstruct_output_is_a_file(runner, tmp_path, mode_file):
    out = tmp_path / "out"
    out.write_bytes(b"precious")
    message = error_line(cmd(runner, "reconstruct", mode_file, "-o", out))
    assert message == f"{out}: is a file, expected an output folder"
    assert out.read_bytes() == b"precious"
    assert_nothing_written(tmp_path)


# 11. info on things that are not mode files


def test_info_not_hdf5(runner, tmp_path):
    path = tmp_path / "notes.cmd.h5"
    path.write_text("just text\n")
    assert error_line(cmd(runner, "info", path)) == f"{path}: not a mode file (not HDF5, or truncated)"


def test_info_hdf5_but_not_a_mode_file(runner, tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    assert error_line(cmd(runner, "info", path)) == f"{path}: not a cmdtool mode file"


def test_info_missing_file(runner, tmp_path):
    path = tmp_path / "missing.cmd.h5"
    assert error_line(cmd(runner, "info", path)) == f"{path}: no such file"


# 12. reconstruct --at


@pytest.mark.parametrize(
    "at, expected",
    [
        ("20", "--at '20': position 20 is out of range (the mode file has 20 checkpoints, 0..19)"),
        ("0,-21", "--at '0,-21': position -21 is out of range (the mode file has 20 checkpoints, 0..19)"),
        ("foo", "--at 'foo': expected last, first, all or positions like 0,5,-1"),
    ],
    ids=["too-large", "too-negative", "garbage"],
)
def test_reconstruct_bad_at(runner, tmp_path, mode_file, at, expected):
    out = tmp_path / "out"
    assert error_line(cmd(runner, "reconstruct", mode_file, "-o", out, "--at", at)) == expected
    assert_nothing_written(tmp_path, out)


# 13. a selection that leaves nothing to model


def test_include_matches_nothing(runner, tmp_path):
    run = small_run(tmp_path)
    message = error_line(fit(runner, tmp_path, run, "--include", "nomatch*"))
    assert "no floating-point tensors to model" in message
    assert "--include" in message
    assert str(run) in message  # names the folder (or its first checkpoint), as the error policy asks
    assert_nothing_written(tmp_path, *fit_outputs(tmp_path))


# 14. torch files without a state dict


@pytest.mark.parametrize(
    "obj, problem",
    [
        ([1, 2, 3], "no state dict found (the file holds a list)"),
        ({"epoch": 3, "lr": 0.1}, "no state dict found (top-level keys: epoch, lr;"),
    ],
    ids=["list", "dict-of-non-tensors"],
)
def test_torch_file_without_state_dict(runner, tmp_path, obj, problem):
    run = small_run(tmp_path, fmt="torch")
    bad = run / "epoch_1.pt"
    torch.save(obj, bad)
    assert error_line(fit(runner, tmp_path, run)).startswith(f"{bad}: {problem}")
    assert_nothing_written(tmp_path, *fit_outputs(tmp_path))


# positive control: the errors above are specific, a wrapped torch state dict is fine


def test_wrapped_torch_state_dict_fits(runner, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for t, state in enumerate(plant(T=3).states()):
        torch.save({"state_dict": state, "epoch": 3}, run / f"epoch_{t}.pt")
    out, traj = fit_outputs(tmp_path)
    result = fit(runner, tmp_path, run)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[-1] == f"wrote {out}"
    assert out.is_file() and traj.is_file()
    assert sorted(tmp_path.rglob(".*.tmp")) == []


# 9. checkpoint layouts that cannot be read on one machine (or are broken), and options that do not fit the folder

DCP = (
    "a torch.distributed.checkpoint folder (.distcp shards) cannot be read as one checkpoint; consolidate it "
    "first with torch.distributed.checkpoint.format_utils.dcp_to_torch_save(folder, 'model.pt')"
)
ONE_DCP = (
    "is one torch.distributed.checkpoint checkpoint; point cmdtool at the folder that holds the run's checkpoint "
    "folders (step_100/, step_200/, ...)"
)
ZERO = (
    "a DeepSpeed ZeRO checkpoint (weights sharded across ranks) cannot be read as one checkpoint; consolidate "
    "it first with DeepSpeed's zero_to_fp32.py (python zero_to_fp32.py CHECKPOINT_DIR OUTPUT_FILE)"
)


@pytest.mark.parametrize(
    "layout, refused, problem",
    [
        ({"__0_0.distcp": b"x", ".metadata": b"x"}, ".", ONE_DCP),  # the folder itself: one checkpoint
        (
            {"epoch=0-step=5.ckpt/__0_0.distcp": b"x", "epoch=0-step=5.ckpt/.metadata": b"x"},  # Lightning FSDP
            "epoch=0-step=5.ckpt/.metadata",
            "cannot read torch.distributed.checkpoint metadata, truncated or corrupt (UnpicklingError: invalid "
            "load key, 'x')",
        ),
        (
            {"epoch=0-step=5.ckpt/__0_0.distcp": b"x"},  # an interrupted save
            "epoch=0-step=5.ckpt",
            "a torch.distributed.checkpoint folder without its .metadata file (an interrupted save?)",
        ),
        (
            {"checkpoint-5/pytorch_model_fsdp_0/__0_0.distcp": b"x", "checkpoint-5/trainer_state.json": b"{}"},
            "checkpoint-5/pytorch_model_fsdp_0",
            DCP,
        ),  # HF Trainer FSDP
        (
            {
                "global_step5/mp_rank_00_model_states.pt": b"x",  # DeepSpeed
                "global_step5/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"x",
                "latest": b"global_step5",
            },
            "global_step5",
            ZERO,
        ),
        (
            {"checkpoint-5/global_step5/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt": b"x"},  # HF + DeepSpeed
            "checkpoint-5/global_step5",
            ZERO,
        ),
    ],
    ids=["dcp-folder", "lightning-fsdp-corrupt", "dcp-no-metadata", "hf-fsdp", "deepspeed", "hf-deepspeed"],
)
def test_sharded_across_ranks_is_refused_with_the_consolidation_tool(runner, tmp_path, layout, refused, problem):
    run = small_run(tmp_path)
    for name, data in layout.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(data)
    expected = run if refused == "." else run / refused
    assert error_line(fit(runner, tmp_path, run)) == f"{expected}: {problem}"
    assert_nothing_written(tmp_path, *fit_outputs(tmp_path))
    assert error_line(cmd(runner, "ls", run)) == f"{expected}: {problem}"


def test_ema_without_state_dict_ema(runner, tmp_path):
    run = write_run(tmp_path / "run", plant(T=3).states(), fmt="torch", wrapper="state_dict")
    assert error_line(fit(runner, tmp_path, run, "--ema")) == (
        f"{run / 'epoch_0.pt'}: --ema: no state_dict_ema in this checkpoint (timm writes it when trained with "
        "--model-ema)"
    )
    assert_nothing_written(tmp_path, *fit_outputs(tmp_path))


def test_reconstruct_unknown_format(runner, tmp_path, mode_file):
    out = tmp_path / "out"
    assert error_line(cmd(runner, "reconstruct", mode_file, "-o", out, "--format", "onnx")) == (
        "--format 'onnx': expected one of source, safetensors"
    )
    assert not out.exists()


def test_huggingface_folder_target_needs_force(runner, tmp_path):
    run = tmp_path / "run"
    for step, state in zip((10, 20, 30), plant(T=3).states()):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        save_file(
            {k: v for k, v in state.items() if k != "bn.num_batches_tracked"},
            str(run / f"checkpoint-{step}" / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (run / f"checkpoint-{step}" / "config.json").write_text('{"model_type": "toy"}')
    assert fit(runner, tmp_path, run).exit_code == 0
    out = tmp_path / "out"
    (out / "checkpoint-30").mkdir(parents=True)
    (out / "checkpoint-30" / "stale.txt").write_text("old")
    reconstruct = ("reconstruct", tmp_path / "modes.cmd.h5", "-o", out)
    assert (
        error_line(cmd(runner, *reconstruct)) == f"{out / 'checkpoint-30'}: already exists (use --force to overwrite)"
    )
    assert sorted(p.name for p in (out / "checkpoint-30").iterdir()) == ["stale.txt"]
    assert cmd(runner, *reconstruct, "--force").exit_code == 0
    assert sorted(p.name for p in (out / "checkpoint-30").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-30"]  # nothing temporary left
