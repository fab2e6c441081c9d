"""cmdtool/checkpoints: discovery and ordering, format sniffing, reading (both formats, wrappers),
signatures and write-back."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cmdtool.checkpoints import (
    CHECKPOINT_SUFFIXES,
    CheckpointInfo,
    CheckpointReader,
    discover,
    dtype_name,
    natural_key,
    sniff_format,
    write_checkpoint,
)
from cmdtool.checkpoints.schema import WRAPPER_KEYS
from cmdtool.errors import CmdError


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(4, 3, generator=g), "layer.bias": torch.randn(4, generator=g),
            "bn.num_batches_tracked": torch.tensor(7 + seed, dtype=torch.int64)}


def save_safetensors(path: Path, state=None, metadata=None) -> Path:
    save_file(state if state is not None else small_state(), str(path), metadata=metadata)
    return path


def save_torch(path: Path, obj=None, legacy: bool = False) -> Path:
    obj = obj if obj is not None else small_state()
    if legacy:
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(obj, path)
    return path


def read_all(path: Path, fmt: str) -> tuple[dict[str, torch.Tensor], CheckpointInfo, dict]:
    with CheckpointReader(path, fmt) as reader:
        state = {name: reader.tensor(name).clone() for name in reader.signature}
        return state, reader.info, dict(reader.signature)


def assert_states_equal(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), name


# --------------------------------------------------------------------------- natural sort, time


def test_natural_key_orders_numbers_numerically():
    names = ["epoch_1.pt", "epoch_2.pt", "epoch_10.pt", "epoch_9.pt"]
    assert sorted(names, key=natural_key) == ["epoch_1.pt", "epoch_2.pt", "epoch_9.pt", "epoch_10.pt"]
    # plain string sort would get this wrong, so the test means something
    assert sorted(names) != sorted(names, key=natural_key)


def test_discover_natural_order_and_times_from_names(tmp_path):
    for n in (1, 2, 10, 9):
        save_safetensors(tmp_path / f"epoch_{n}.safetensors", small_state(n))
    found = discover(tmp_path).checkpoints
    assert [c.name for c in found] == ["epoch_1.safetensors", "epoch_2.safetensors",
                                       "epoch_9.safetensors", "epoch_10.safetensors"]
    assert [c.time for c in found] == [1, 2, 9, 10]
    assert all(c.format == "safetensors" for c in found)
    assert all(c.path.parent == tmp_path for c in found)


def test_discover_time_is_last_number_in_stem(tmp_path):
    # "resnet18" carries a number too; the step number is the last one.
    for step in (500, 1000, 50):
        save_torch(tmp_path / f"resnet18_step{step}.pt", small_state(step))
    found = discover(tmp_path).checkpoints
    assert [c.time for c in found] == [50, 500, 1000]
    assert [c.name for c in found] == ["resnet18_step50.pt", "resnet18_step500.pt", "resnet18_step1000.pt"]


@pytest.mark.parametrize("names, order", [
    (("charlie", "alpha", "bravo"), ["alpha", "bravo", "charlie"]),             # no numbers
    (("epoch_3", "epoch_7", "final"), ["epoch_3", "epoch_7", "final"]),         # some without
], ids=["no-numbers", "some-without-numbers"])
def test_discover_falls_back_to_positions(tmp_path, names, order):
    for name in names:
        save_safetensors(tmp_path / f"{name}.safetensors")
    found = discover(tmp_path).checkpoints
    assert [c.path.stem for c in found] == order
    assert [c.time for c in found] == [0, 1, 2]


def test_discover_same_time_keeps_the_first_and_warns(tmp_path):
    for name in ("run_a_epoch_5", "run_b_epoch_5", "run_c_epoch_6"):
        save_safetensors(tmp_path / f"{name}.safetensors")
    found = discover(tmp_path)
    assert [(c.path.stem, c.time) for c in found.checkpoints] == [("run_a_epoch_5", 5), ("run_c_epoch_6", 6)]
    assert [(s.path.name, s.reason) for s in found.skipped] == [
        ("run_b_epoch_5.safetensors", "same time 5 (name) as run_a_epoch_5.safetensors")]
    assert found.warnings == [f"{tmp_path / 'run_b_epoch_5.safetensors'}: same time 5 (name) as "
                              f"run_a_epoch_5.safetensors; kept run_a_epoch_5.safetensors"]


# --------------------------------------------------------------------------- suffixes


def test_checkpoint_suffixes_constant():
    assert set(CHECKPOINT_SUFFIXES) == {".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pth.tar"}


def test_discover_finds_every_suffix_and_ignores_other_files(tmp_path):
    expected = {}
    for i, suffix in enumerate([".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pth.tar"]):
        path = tmp_path / f"ckpt_{i}{suffix}"
        if suffix == ".safetensors":
            save_safetensors(path, small_state(i))
            expected[path.name] = "safetensors"
        else:
            save_torch(path, small_state(i))
            expected[path.name] = "torch"
    # things that are not checkpoints, or are hidden
    (tmp_path / "README.md").write_text("# my run\n")
    (tmp_path / "config.json").write_text('{"lr": 0.1}')
    import numpy as np
    np.savez(tmp_path / "ckpt_99.npz", w=np.zeros(3))
    save_torch(tmp_path / ".ckpt_50.pt", small_state(50))               # hidden checkpoint
    save_safetensors(tmp_path / ".ckpt_51.safetensors", small_state(51))
    (tmp_path / "sub").mkdir()
    save_torch(tmp_path / "sub" / "ckpt_77.pt")                       # not directly in the folder
    (tmp_path / "notes.txt").write_text("epoch 3 looked odd")
    found = discover(tmp_path).checkpoints
    assert {c.name: c.format for c in found} == expected
    assert [c.name for c in found] == list(expected)  # ckpt_0 .. ckpt_5 in order
    assert [c.time for c in found] == [0, 1, 2, 3, 4, 5]


def test_discover_pth_tar_time_from_stem(tmp_path):
    for n in (3, 12):
        save_torch(tmp_path / f"checkpoint_{n}.pth.tar", small_state(n))
    found = discover(tmp_path).checkpoints
    assert [c.time for c in found] == [3, 12]
    assert [c.format for c in found] == ["torch", "torch"]


def test_discover_errors(tmp_path):
    with pytest.raises(CmdError, match="no such folder"):
        discover(tmp_path / "missing")
    (tmp_path / "file.pt").write_bytes(b"")
    with pytest.raises(CmdError, match="expected a folder"):
        discover(tmp_path / "file.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("nothing")
    with pytest.raises(CmdError, match="no checkpoint files found"):
        discover(empty)
    with pytest.raises(CmdError, match="not a safetensors or torch checkpoint"):
        discover(tmp_path)  # file.pt is empty


# --------------------------------------------------------------------------- sniffing


def test_sniff_safetensors_named_bin(tmp_path):
    path = save_safetensors(tmp_path / "pytorch_model.bin", small_state())
    assert sniff_format(path) == "safetensors"
    found = discover(tmp_path).checkpoints
    assert [(c.name, c.format) for c in found] == [("pytorch_model.bin", "safetensors")]
    state, info, _ = read_all(path, "safetensors")
    assert_states_equal(state, small_state())
    assert info.format == "safetensors"


def test_sniff_torch_zip_named_safetensors(tmp_path):
    path = save_torch(tmp_path / "model.safetensors", small_state(3))
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    assert sniff_format(path) == "torch"
    assert [c.format for c in discover(tmp_path).checkpoints] == ["torch"]
    state, info, _ = read_all(path, "torch")
    assert_states_equal(state, small_state(3))
    assert info.format == "torch"


def test_sniff_legacy_torch(tmp_path):
    path = save_torch(tmp_path / "old.pth", small_state(2), legacy=True)
    assert path.read_bytes()[:1] == b"\x80"
    assert sniff_format(path) == "torch"


@pytest.mark.parametrize("content", [b"", b"\x00" * 3, b"hello world, not a checkpoint",
                                     b"\x10\x00\x00\x00\x00\x00\x00\x00{"])  # header longer than file
def test_sniff_rejects_garbage(tmp_path, content):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    assert sniff_format(path) is None


def test_sniff_ignores_extension_for_npz(tmp_path):
    import numpy as np
    np.savez(tmp_path / "a.npz", w=np.zeros(2))
    # npz is a zip archive too; sniffing alone says torch, but discovery never looks at .npz
    assert sniff_format(tmp_path / "a.npz") == "torch"
    save_torch(tmp_path / "b.pt")
    assert [c.name for c in discover(tmp_path).checkpoints] == ["b.pt"]


HEADER_STATE = {"w": torch.tensor([1.0, -2.0])}  # one small tensor: the shortest header is under 128 bytes


def save_with_header_length(path: Path, header_len: int) -> Path:
    """A real ``save_file`` of ``HEADER_STATE`` whose header is exactly ``header_len`` bytes (a
    multiple of 8, as safetensors pads it with spaces): metadata padded to reach it."""
    save_safetensors(path, HEADER_STATE, {"pad": ""})
    data = path.read_bytes()
    unpadded = len(data[8:8 + int.from_bytes(data[:8], "little")].rstrip(b" "))
    assert unpadded <= header_len
    save_safetensors(path, HEADER_STATE, {"pad": "x" * (header_len - unpadded)})
    assert int.from_bytes(path.read_bytes()[:8], "little") == header_len
    return path


@pytest.mark.parametrize("header_len", [n for n in range(128, 70_000, 256)])
def test_sniff_safetensors_whose_header_length_starts_like_a_pickle(tmp_path, header_len):
    """Every header length up to 70 KB whose low byte is 0x80 (a pickle's first byte): a
    safetensors file, read back exactly; ``discover`` takes it too."""
    path = save_with_header_length(tmp_path / "epoch_1.pt", header_len)
    assert path.read_bytes()[:1] == b"\x80"
    assert sniff_format(path) == "safetensors"
    assert_states_equal(read_all(path, "safetensors")[0], HEADER_STATE)
    assert [(c.name, c.format) for c in discover(tmp_path).checkpoints] == [("epoch_1.pt", "safetensors")]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header_len=st.integers(128 // 8, 2**17).map(lambda n: 8 * n))
def test_sniff_safetensors_at_any_header_length(tmp_path, header_len):
    path = save_with_header_length(tmp_path / "any.pt", header_len)
    assert sniff_format(path) == "safetensors"
    assert_states_equal(read_all(path, "safetensors")[0], HEADER_STATE)


def test_sniff_legacy_pickle_is_not_taken_for_safetensors(tmp_path):
    """A legacy torch pickle starts with 0x80 too; its bytes do not frame a safetensors header."""
    path = save_torch(tmp_path / "old.pth", small_state(4), legacy=True)
    assert sniff_format(path) == "torch"
    assert_states_equal(read_all(path, "torch")[0], small_state(4))


# --------------------------------------------------------------------------- reading torch files


def test_legacy_torch_file_loads(tmp_path):
    state = small_state(5)
    path = save_torch(tmp_path / "legacy.pt", {"state_dict": state, "epoch": 4}, legacy=True)
    loaded, info, signature = read_all(path, "torch")
    assert_states_equal(loaded, state)
    assert info.wrapper == "state_dict"
    assert info.extras == {"epoch": 4}
    assert signature == {"layer.weight": ((4, 3), "float32"), "layer.bias": ((4,), "float32"),
                         "bn.num_batches_tracked": ((), "int64")}


def test_legacy_plain_state_dict_loads(tmp_path):
    state = small_state(6)
    path = save_torch(tmp_path / "legacy.pt", state, legacy=True)
    loaded, info, _ = read_all(path, "torch")
    assert_states_equal(loaded, state)
    assert info.wrapper is None


def test_plain_state_dict(tmp_path):
    state = small_state(1)
    loaded, info, _ = read_all(save_torch(tmp_path / "plain.pt", state), "torch")
    assert_states_equal(loaded, state)
    assert info == CheckpointInfo("torch")
    assert info.wrapper is None and info.extras == {} and info.dropped == []


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model", "net"])
def test_wrapper_keys_found_with_extras_and_dropped(tmp_path, key):
    state = small_state(2)
    obj = {key: state, "epoch": 12, "arch": "resnet18", "best_acc": 0.875, "note": None,
           "optimizer": {"lr": 0.1, "momentum": [torch.zeros(2)]}, "scheduler": {"last_epoch": 12}}
    loaded, info, _ = read_all(save_torch(tmp_path / "wrapped.pt", obj), "torch")
    assert_states_equal(loaded, state)
    assert info.format == "torch"
    assert info.wrapper == key
    assert info.extras == {"epoch": 12, "arch": "resnet18", "best_acc": 0.875, "note": None}
    assert isinstance(info.extras["epoch"], int)
    assert sorted(info.dropped) == ["optimizer", "scheduler"]


def test_wrapper_prefers_state_dict_key_order(tmp_path):
    a, b = small_state(1), small_state(2)
    obj = {"model": b, "state_dict": a}
    loaded, info, _ = read_all(save_torch(tmp_path / "two.pt", obj), "torch")
    assert info.wrapper == "state_dict"
    assert_states_equal(loaded, a)
    assert info.dropped == ["model"]  # a dict of tensors is not a plain value


def test_all_wrapper_keys_listed():
    assert WRAPPER_KEYS[:4] == ("state_dict", "model_state_dict", "model", "net")


def test_torch_without_state_dict_is_refused(tmp_path):
    path = save_torch(tmp_path / "bad.pt", {"epoch": 3, "optimizer": {"lr": 0.1}})
    with pytest.raises(CmdError, match="no state dict found") as e:
        CheckpointReader(path, "torch")
    assert str(path) in str(e.value)
    path2 = save_torch(tmp_path / "tensor.pt", torch.zeros(3))
    with pytest.raises(CmdError, match="no state dict found"):
        CheckpointReader(path2, "torch")


def test_torch_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": small_state(), "payload": Evil()}, f, protocol=2)
    with pytest.raises(CmdError) as e:
        CheckpointReader(path, "torch")
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_truncated_files_are_cmd_errors(tmp_path):
    good = save_safetensors(tmp_path / "a.safetensors")
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 20])
    with pytest.raises(CmdError, match="cut.safetensors"):
        with CheckpointReader(cut, "safetensors") as r:
            [r.tensor(n) for n in r.signature]
    tgood = save_torch(tmp_path / "b.pt")
    tcut = tmp_path / "cut.pt"
    tcut.write_bytes(tgood.read_bytes()[:200])
    with pytest.raises(CmdError, match="cut.pt"):
        CheckpointReader(tcut, "torch")


# --------------------------------------------------------------------------- signatures


def mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
            "b.f16": torch.randn(5, generator=g).to(torch.float16),
            "c.f32": torch.randn(1, 2, 2, generator=g),
            "d.f64": torch.randn(3, generator=g, dtype=torch.float64),
            "e.i64": torch.tensor(42, dtype=torch.int64),
            "f.i32": torch.arange(4, dtype=torch.int32),
            "g.u8": torch.arange(3, dtype=torch.uint8),
            "h.bool": torch.tensor([True, False])}


EXPECTED_SIGNATURE = {"a.bf16": ((2, 3), "bfloat16"), "b.f16": ((5,), "float16"), "c.f32": ((1, 2, 2), "float32"),
                      "d.f64": ((3,), "float64"), "e.i64": ((), "int64"), "f.i32": ((4,), "int32"),
                      "g.u8": ((3,), "uint8"), "h.bool": ((2,), "bool")}


def test_dtype_name():
    assert dtype_name(torch.bfloat16) == "bfloat16"
    assert dtype_name(torch.float16) == "float16"
    assert dtype_name(torch.int64) == "int64"
    assert dtype_name(torch.float32) == "float32"


def test_signature_safetensors(tmp_path):
    path = save_safetensors(tmp_path / "m.safetensors", mixed_state())
    state, info, signature = read_all(path, "safetensors")
    assert signature == EXPECTED_SIGNATURE
    assert_states_equal(state, mixed_state())


@pytest.mark.parametrize("legacy", [False, True])
def test_signature_torch(tmp_path, legacy):
    path = save_torch(tmp_path / "m.pt", {"model_state_dict": mixed_state(), "step": 9}, legacy=legacy)
    state, info, signature = read_all(path, "torch")
    assert signature == EXPECTED_SIGNATURE
    assert list(signature) == list(mixed_state())  # torch keeps the dict order
    assert_states_equal(state, mixed_state())
    assert info.extras == {"step": 9}


def test_signature_same_across_formats(tmp_path):
    s = save_safetensors(tmp_path / "m.safetensors", mixed_state())
    t = save_torch(tmp_path / "m.pt", mixed_state())
    assert read_all(s, "safetensors")[2] == read_all(t, "torch")[2]


# --------------------------------------------------------------------------- write-back


def test_info_json_round_trip():
    info = CheckpointInfo("torch", wrapper="state_dict", extras={"epoch": 3, "arch": "x", "acc": 0.5, "n": None},
                          dropped=["optimizer"], metadata=None)
    assert CheckpointInfo.from_json(info.to_json()) == info
    info2 = CheckpointInfo("safetensors", metadata={"epoch": "3", "format": "pt"})
    assert CheckpointInfo.from_json(info2.to_json()) == info2


def test_write_safetensors_keeps_metadata(tmp_path):
    source = save_safetensors(tmp_path / "src.safetensors", mixed_state(), metadata={"epoch": "7", "format": "pt"})
    state, info, _ = read_all(source, "safetensors")
    assert info.metadata == {"epoch": "7", "format": "pt"}
    out = tmp_path / "out.safetensors"
    write_checkpoint(out, state, CheckpointInfo.from_json(info.to_json()))
    assert sniff_format(out) == "safetensors"
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"epoch": "7", "format": "pt"}
    assert_states_equal(load_file(str(out)), mixed_state())


def test_write_safetensors_without_metadata(tmp_path):
    source = save_safetensors(tmp_path / "src.safetensors", small_state())
    state, info, _ = read_all(source, "safetensors")
    out = tmp_path / "out.safetensors"
    write_checkpoint(out, state, info)
    assert_states_equal(load_file(str(out)), small_state())


def test_write_torch_wrapper_restored_with_extras(tmp_path):
    obj = {"state_dict": mixed_state(), "epoch": 5, "arch": "cnn",
           "optimizer": {"lr": 0.1, "momentum": [torch.zeros(1)]}}
    source = save_torch(tmp_path / "src.pt", obj)
    state, info, _ = read_all(source, "torch")
    out = tmp_path / "out.pt"
    write_checkpoint(out, state, CheckpointInfo.from_json(info.to_json()))
    assert sniff_format(out) == "torch"
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == {"state_dict", "epoch", "arch"}
    assert loaded["epoch"] == 5 and isinstance(loaded["epoch"], int)
    assert loaded["arch"] == "cnn"
    assert_states_equal(loaded["state_dict"], mixed_state())
    # and reads back the same way
    again, info2, _ = read_all(out, "torch")
    assert_states_equal(again, mixed_state())
    assert info2.wrapper == "state_dict" and info2.extras == {"epoch": 5, "arch": "cnn"} and info2.dropped == []


def test_write_torch_plain(tmp_path):
    source = save_torch(tmp_path / "src.pt", small_state(4))
    state, info, _ = read_all(source, "torch")
    out = tmp_path / "out.pth"
    write_checkpoint(out, state, info)
    loaded = torch.load(out, weights_only=True)
    assert_states_equal(loaded, small_state(4))


# --------------------------------------------------------------------------- how training stacks lay out folders


class Touch:
    """Unpickling this touches ``marker``: proves a file was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_stack_leftovers_are_skipped_with_reasons_and_never_loaded(tmp_path):
    for n in (1, 2):
        save_torch(tmp_path / f"epoch={n}-step={10 * n}.ckpt", {"state_dict": small_state(n), "global_step": 10 * n})
    marker = tmp_path.parent / "loaded"
    leftovers = {
        "last.ckpt": "Lightning's copy of the latest checkpoint (save_last)",
        "last-v1.ckpt": "Lightning's copy of the latest checkpoint (save_last)",
        "last.pth.tar": "timm's copy of the latest checkpoint",
        "model_best.pth.tar": "timm's copy of the best checkpoint",
        "tmp.pth.tar": "timm's temporary file",
        "recovery-3-100.pth.tar": "timm's mid-epoch recovery checkpoint",
        "optimizer.pt": "training state, not weights (not loaded)",
        "scheduler.pt": "training state, not weights (not loaded)",
        "rng_state_0.pth": "training state, not weights (not loaded)",
        "training_args.bin": "training state, not weights (not loaded)",
    }
    for name in leftovers:
        torch.save({"x": Touch(marker)}, tmp_path / name)
    (tmp_path / "tmp-checkpoint-30").mkdir()
    save_safetensors(tmp_path / "tmp-checkpoint-30" / "model.safetensors")
    (tmp_path / "runs").mkdir()  # e.g. TensorBoard logs
    found = discover(tmp_path)
    assert [c.name for c in found.checkpoints] == ["epoch=1-step=10.ckpt", "epoch=2-step=20.ckpt"]
    assert {s.path.name: s.reason for s in found.skipped} == {
        **leftovers, "tmp-checkpoint-30": "leftover of an interrupted Hugging Face save",
        "runs": "folder without model weights (no model.safetensors, pytorch_model.bin or adapter_model.safetensors)"}
    assert not marker.exists()


def test_stored_time_comes_before_names(tmp_path):
    # Names say b < a, the stored global_step says a < b; epoch is the same in both.
    save_torch(tmp_path / "a_1.pt", {"model": small_state(0), "global_step": 100, "epoch": 0})
    save_torch(tmp_path / "b_0.pt", {"model": small_state(1), "global_step": 200, "epoch": 0})
    found = discover(tmp_path)
    assert [(c.name, c.time) for c in found.checkpoints] == [("a_1.pt", 100), ("b_0.pt", 200)]
    assert found.time_source == "global_step"


def test_stored_time_that_does_not_vary_is_not_used(tmp_path):
    for n in (3, 1):
        save_torch(tmp_path / f"ep_{n}.pt", {"model": small_state(n), "epoch": 0})
    found = discover(tmp_path)
    assert [(c.name, c.time) for c in found.checkpoints] == [("ep_1.pt", 1), ("ep_3.pt", 3)]
    assert found.time_source == "name"


def test_safetensors_metadata_time(tmp_path):
    save_safetensors(tmp_path / "x.safetensors", small_state(0), metadata={"step": "40"})
    save_safetensors(tmp_path / "y.safetensors", small_state(1), metadata={"step": "20"})
    found = discover(tmp_path)
    assert [(c.name, c.time) for c in found.checkpoints] == [("y.safetensors", 20), ("x.safetensors", 40)]
    assert found.time_source == "step"


def test_same_file_reached_twice_counts_once(tmp_path):
    for n in (1, 2):
        save_safetensors(tmp_path / f"epoch_{n}.safetensors", small_state(n))
    (tmp_path / "epoch_3.safetensors").hardlink_to(tmp_path / "epoch_2.safetensors")
    (tmp_path / "epoch_4.safetensors").symlink_to(tmp_path / "epoch_1.safetensors")
    found = discover(tmp_path)
    assert [c.name for c in found.checkpoints] == ["epoch_1.safetensors", "epoch_2.safetensors"]
    assert [(s.path.name, s.reason) for s in found.skipped] == [
        ("epoch_3.safetensors", "same file as epoch_2.safetensors"),
        ("epoch_4.safetensors", "same file as epoch_1.safetensors")]
    assert found.warnings == []


def test_huggingface_folder_roles(tmp_path):
    folder = tmp_path / "checkpoint-500"
    folder.mkdir()
    save_safetensors(folder / "model-00001-of-00002.safetensors", {"a.weight": torch.ones(2)})
    save_safetensors(folder / "model-00002-of-00002.safetensors", {"b.weight": torch.zeros(3)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": 20}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                                       "b.weight": "model-00002-of-00002.safetensors"}}))
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    save_torch(folder / "optimizer.pt", {"state": {}})
    (folder / "global_step500").mkdir()  # DeepSpeed's shards beside consolidated weights: not needed
    (folder / "global_step500" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    [c] = discover(tmp_path).checkpoints
    assert (c.stack, c.format, c.time) == ("huggingface", "safetensors", 500)  # no trainer_state.json: the name
    assert c.folder.weights == ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    assert (c.folder.index, c.folder.copied, c.folder.dropped) == (
        "model.safetensors.index.json", ("config.json", "tokenizer.json"), ("optimizer.pt",))
    with c.open() as reader:
        assert reader.signature == {"a.weight": ((2,), "float32"), "b.weight": ((3,), "float32")}
        assert torch.equal(reader.tensor("b.weight"), torch.zeros(3))
        assert reader.info.shards == {"model-00001-of-00002.safetensors": ["a.weight"],
                                      "model-00002-of-00002.safetensors": ["b.weight"]}
        assert set(reader.info.files) == {"config.json", "tokenizer.json"}


def test_ema_reads_state_dict_ema(tmp_path):
    path = save_torch(tmp_path / "checkpoint-1.pth.tar",
                      {"state_dict": small_state(0), "state_dict_ema": small_state(1), "epoch": 1, "arch": "x"})
    with CheckpointReader(path, "torch", ema=True) as reader:
        assert torch.equal(reader.tensor("layer.weight"), small_state(1)["layer.weight"])
        info = reader.info
        assert (info.wrapper, info.dropped, info.stack) == ("state_dict_ema", ["state_dict"], "timm")
    with CheckpointReader(path, "torch") as reader:
        assert (reader.info.wrapper, reader.info.dropped, reader.info.stack) == (
            "state_dict",
            ["state_dict_ema"],
            "timm",
        )


def test_info_from_before_huggingface_folders_still_reads():
    """Mode files written before issue 4 have checkpoint_info without shards, index and files."""
    old = '{"format": "torch", "wrapper": "model", "extras": {"epoch": 3}, "dropped": ["optimizer"], "metadata": null}'
    info = CheckpointInfo.from_json(old)
    assert (info.wrapper, info.extras, info.is_folder, info.files) == ("model", {"epoch": 3}, False, {})


def test_plain_values_kept_training_state_dropped(tmp_path):
    obj = {
        "state_dict": small_state(),
        "hyper_parameters": {"lr": 0.1, "layers": [2, 3], "betas": (0.9, 0.99), "name": None},
        "lr_schedulers": [{"step_size": 1}],
        "optimizer_states": [{"state": {}}],
        "bad": float("nan"),
    }
    _, info, _ = read_all(save_torch(tmp_path / "x.ckpt", obj), "torch")
    assert CheckpointInfo.from_json(info.to_json()).extras == {  # as the mode file keeps them: tuples as lists
        "hyper_parameters": {"lr": 0.1, "layers": [2, 3], "betas": [0.9, 0.99], "name": None}
    }
    assert info.dropped == ["lr_schedulers", "optimizer_states", "bad"]
