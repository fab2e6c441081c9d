"""Checkpoints are untrusted input (issue 11, item 2): every dtype safetensors or torch can hold is
modelled, carried exactly or refused with one line naming file and tensor; storage records are
checked against what the tensors need; numbers in names and metadata are ASCII digits within int64;
tensor names that are HDF5 paths are carried under encoded names; deep nesting is refused cleanly.
Each refusal: exit 2, the exact message, and nothing changed outside the outputs."""

from __future__ import annotations

import json
import os
import struct
import warnings
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from cmdtool.checkpoints import discover
from cmdtool.layout import DTYPE_SIZES, dataset_key
from cmdtool.modefile import open_mode_file
from cmdtool.trajectory import open_store
from helpers import cmd, error_line, plant, snapshot, write_run

warnings.filterwarnings("ignore", message=".*(deprecated|experimental|beta state|prototype stage).*")


def fit(runner, tmp_path, run, *extra):
    return cmd(runner, "fit", run, "-o", tmp_path / "modes.cmd.h5", "--trajectory", tmp_path / "traj.h5", *extra)


def refused(runner, tmp_path, run, expected: str) -> None:
    """``cmd fit`` of ``run`` fails with exactly ``expected``; no output, nothing else touched."""
    before = snapshot(tmp_path)
    assert error_line(fit(runner, tmp_path, run)) == expected
    assert snapshot(tmp_path) == before


def roundtrip(runner, tmp_path, run, names) -> dict:
    """Fit, reconstruct the last checkpoint in the source format; the reconstructed file's tensors."""
    result = fit(runner, tmp_path, run, "-m", "3")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"
    result = cmd(runner, "reconstruct", tmp_path / "modes.cmd.h5", "-o", out, "--at", "last")
    assert result.exit_code == 0, result.stderr
    path = out / names[-1]
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True)


def carry(states, extra) -> list[dict]:
    """The planted states, each with the tensors ``extra(t)`` added."""
    return [{**state, **extra(t)} for t, state in enumerate(states)]


# 1. dtypes: every one safetensors holds is modelled or carried exactly

def safetensors_extras(t: int) -> dict:
    base = torch.arange(6) + 1000 * t
    return {"tok.u16": base.to(torch.uint16), "tok.u32": base.to(torch.uint32), "tok.u64": base.to(torch.uint64),
            "fp8.e4m3": (base / 7).to(torch.float8_e4m3fn), "fp8.e5m2": (base / 7).to(torch.float8_e5m2),
            "fp8.e8m0": (base + 1).float().to(torch.float8_e8m0fnu), "mask": base % 2 == 0,
            "phase": torch.complex(base.float(), -base.float())}


def test_every_safetensors_dtype_is_carried_exactly(runner, tmp_path):
    states = carry(plant(T=4).states(), safetensors_extras)
    run = write_run(tmp_path / "run", states)
    back = roundtrip(runner, tmp_path, run, [f"epoch_{t}.safetensors" for t in range(4)])
    for name, tensor in safetensors_extras(3).items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert back["bn.num_batches_tracked"].item() == 300


def test_safetensors_dtype_without_a_torch_name_is_refused(runner, tmp_path):
    """F4 (packed 4-bit floats) has no one-byte element: refused by name, not read as garbage."""
    run = write_run(tmp_path / "run", plant(T=3).states())
    path = run / "epoch_1.safetensors"
    header = {"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\x00\x00")
    refused(runner, tmp_path, run, f"{path}: tensor 'w' has dtype f4, which cmdtool cannot carry or model "
            f"(supported: {', '.join(DTYPE_SIZES)})")


# 2. torch tensors: dense views are values; what is not plain dense values is refused by name

def torch_run(tmp_path, extra) -> object:
    return write_run(tmp_path / "run", carry(plant(T=4).states(), extra), fmt="torch")


def test_torch_views_dtypes_and_shared_storage(runner, tmp_path):
    """Non-contiguous, overlapping (stride 0) and storage-sharing tensors are read as their values:
    modelled ones into the trajectory store exactly, carried ones back byte for byte."""
    def extra(t):
        base = torch.arange(24, dtype=torch.float32) * (t + 1)
        return {"view.t": base.view(4, 6).t(), "view.slice": base[3:9], "view.expand": base[:3].expand(5, 3),
                "tok.u16": (torch.arange(5) + t).to(torch.uint16), "fp8": (base[:4] / 5).to(torch.float8_e5m2),
                "cplx": torch.complex(base[:2], base[2:4]).to(torch.complex128)}
    back = roundtrip(runner, tmp_path, torch_run(tmp_path, extra), [f"epoch_{t}.pt" for t in range(4)])
    store = open_store(tmp_path / "traj.h5")
    for name, tensor in extra(3).items():
        assert back[name].shape == tensor.shape and back[name].dtype == tensor.dtype, name
        spec = next(s for s in store.layout.tensors if s.name == name)
        if spec.modelled:
            assert (store.W[3, spec.columns] == tensor.reshape(-1).numpy()).all(), name
        else:
            assert torch.equal(back[name].contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)), name
    assert [s.name for s in store.layout.modelled if s.name.startswith("view")] == ["view.t", "view.slice",
                                                                                   "view.expand"]


@pytest.mark.parametrize("tensor, problem", [
    (torch.eye(3).to_sparse(), "is sparse (sparse_coo); save it dense (tensor.to_dense()) to use it with cmdtool"),
    (torch.eye(3).to_sparse_csr(), "is sparse (sparse_csr); save it dense (tensor.to_dense()) to use it with cmdtool"),
    (torch.empty(3, device="meta"),
     "is on the meta device and holds no values (saved from a model that was never materialised)"),
    (torch.quantize_per_tensor(torch.ones(3), 0.1, 2, torch.qint8),
     "is quantized (qint8, per_tensor_affine): its scale and zero point would be lost; "
     "save tensor.dequantize() or tensor.int_repr() instead"),
    (torch.quantize_per_tensor(torch.ones(3), 0.5, 0, torch.qint32),
     "is quantized (qint32, per_tensor_affine): its scale and zero point would be lost; "
     "save tensor.dequantize() or tensor.int_repr() instead"),
    (torch.quantize_per_channel(torch.ones(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), 0, torch.quint8),
     "is quantized (quint8, per_channel_affine): its scale and zero point would be lost; "
     "save tensor.dequantize() or tensor.int_repr() instead"),
    (torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
     "is a nested tensor; save its components as separate dense tensors"),
], ids=["sparse-coo", "sparse-csr", "meta", "qint8", "qint32", "quint8-per-channel", "nested"])
def test_exotic_torch_tensor_is_refused(runner, tmp_path, tensor, problem):
    run = torch_run(tmp_path, lambda t: {})
    torch.save({**plant(T=4).states()[1], "odd": tensor}, run / "epoch_1.pt")
    refused(runner, tmp_path, run, f"{run / 'epoch_1.pt'}: tensor 'odd' {problem}")


def overlapping_record(path) -> None:
    """Rewrite a torch zip so that the first storage record is short but still declares its full
    size, which then reaches into a padding record: torch maps those bytes without complaint."""
    with zipfile.ZipFile(path) as archive:
        records = [(info, archive.read(info.filename)) for info in archive.infolist()]
    target = next(info.filename for info, _ in records if info.filename.endswith("/data/0"))
    full = len(next(data for info, data in records if info.filename == target))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in records:
            if info.filename == target:
                archive.writestr(info, data[:8])
                archive.writestr(target.replace("data/0", "pad"), b"\xff" * (2 * full))
            else:
                archive.writestr(info, data)
    raw = bytearray(path.read_bytes())
    name, at = target.encode(), raw.find(b"PK\x01\x02")
    while at != -1:  # central directory entries, then the local header they point to
        if raw[at + 46:at + 46 + struct.unpack_from("<H", raw, at + 28)[0]] == name:
            struct.pack_into("<II", raw, at + 20, full, full)
            local = struct.unpack_from("<I", raw, at + 42)[0]
            struct.pack_into("<II", raw, local + 18, full, full)
        at = raw.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(raw))


def test_storage_record_reaching_into_the_next_is_refused(runner, tmp_path):
    run = torch_run(tmp_path, lambda t: {})
    path = run / "epoch_2.pt"
    overlapping_record(path)
    with zipfile.ZipFile(path) as archive:
        record = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    refused(runner, tmp_path, run, f"{path}: storage record {record.filename!r} declares {record.file_size} bytes, "
            f"more than the archive holds before the next record (truncated or crafted file)")


def test_pickled_function_is_refused_with_its_name(runner, tmp_path):
    """torch 2.13 words a blocked module ("posix is blocked") differently from a disallowed global."""
    class Shell:
        def __reduce__(self):
            return (os.system, ("true",))
    run = torch_run(tmp_path, lambda t: {})
    torch.save({"state_dict": plant(T=4).states()[1], "hook": Shell()}, run / "epoch_1.pt")
    refused(runner, tmp_path, run, f"{run / 'epoch_1.pt'}: refused: the file holds a pickled posix.system, and "
            f"loading it could run code; keep only tensors and plain values in checkpoints")


# 3. tensor names that are HDF5 paths

def test_carried_names_that_are_hdf5_paths_round_trip(runner, tmp_path):
    names = ["/W", "", ".", "..", "a/b", "a", "%2F", "time"]
    run = torch_run(tmp_path, lambda t: {n: torch.tensor([i, t], dtype=torch.int64) for i, n in enumerate(names)})
    back = roundtrip(runner, tmp_path, run, [f"epoch_{t}.pt" for t in range(4)])
    for i, name in enumerate(names):
        assert back[name].tolist() == [i, 3], name
    assert len({dataset_key(n) for n in names}) == len(names) and all("/" not in dataset_key(n) for n in names)


# 4. numbers: ASCII digits, within int64

def test_unicode_digits_and_undecodable_names_do_not_crash_discovery(runner, tmp_path):
    run = write_run(tmp_path / "run", plant(T=3).states())
    (run / "notes_v1²").write_text("not a checkpoint")
    save_file(plant(T=1).states()[0], str(run / "epoch_١.safetensors"))  # an Arabic-Indic one, no stored epoch
    (run / os.fsdecode(b"readme-\xff.txt")).write_text("ignored")
    found = discover(run)
    assert [(c.name, c.time) for c in found.checkpoints] == [
        ("epoch_0.safetensors", 0), ("epoch_1.safetensors", 1), ("epoch_2.safetensors", 2),
        ("epoch_١.safetensors", 3)]  # not every name has an ASCII number: position
    assert found.time_source == "position"
    bad = run / os.fsdecode(b"epoch_\xff.safetensors")
    bad.write_bytes((run / "epoch_2.safetensors").read_bytes())
    refused(runner, tmp_path, run, f"{run}: entry 'epoch_\\udcff.safetensors': the name is not valid UTF-8, "
            f"so it cannot be recorded in a mode file; rename it")


def test_times_beyond_int64_or_not_ascii_are_not_times(runner, tmp_path):
    states = plant(T=4).states()
    run = tmp_path / "run"
    run.mkdir()
    for t, epoch in enumerate(["7", "2" * 30, "²"]):  # only the first is a stored epoch: names give the times
        save_file(states[t], str(run / f"epoch_{t}.safetensors"), metadata={"epoch": epoch})
    assert (discover(run).time_source, [c.time for c in discover(run).checkpoints]) == ("name", [0, 1, 2])
    save_file(states[3], str(run / f"epoch_{'9' * 25}.safetensors"))  # beyond int64: not a time
    found = discover(run)
    assert (found.time_source, [c.time for c in found.checkpoints]) == ("position", [0, 1, 2, 3])
    assert found.checkpoints[-1].name == f"epoch_{'9' * 25}.safetensors"  # natural order, by value
    result = fit(runner, tmp_path, run)
    assert result.exit_code == 0, result.stderr
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    for t, state in enumerate(states):
        torch.save({"state_dict": state, "global_step": 2**70 + t}, wrapped / f"ckpt_{t}.pt")
    assert discover(wrapped).time_source == "name"


# 5. deep nesting

def test_deeply_nested_json_is_refused(runner, tmp_path):
    run = tmp_path / "run"
    for step in (10, 20):
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(plant(T=1, seed=step).states()[0], str(folder / "model.safetensors"))
        (folder / "config.json").write_text("{}")
    state = run / "checkpoint-20" / "trainer_state.json"
    state.write_text("[" * 100_000 + "]" * 100_000)
    refused(runner, tmp_path, run, f"{state}: refused: JSON nested too deeply")


def test_deeply_nested_wrapper_value_is_dropped_not_recursed(runner, tmp_path):
    deep = []
    for _ in range(200):
        deep = [deep]
    run = tmp_path / "run"
    run.mkdir()
    for t, state in enumerate(plant(T=3).states()):
        torch.save({"state_dict": state, "epoch": t, "deep": deep, "lr": 0.1}, run / f"e{t}.pt")
    result = fit(runner, tmp_path, run)
    assert result.exit_code == 0, result.stderr
    with open_mode_file(tmp_path / "modes.cmd.h5") as modes:
        assert modes.infos[0].extras == {"epoch": 0, "lr": 0.1} and "deep" in modes.infos[0].dropped
