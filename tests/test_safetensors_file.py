"""cmdtool/checkpoints/safetensors_file.py: the header validated before it is trusted, tensors read
into the caller's buffers exactly as safetensors loads them, and a file changed while read refused."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cmdtool.checkpoints import CheckpointReader
from cmdtool.checkpoints.safetensors_file import SafetensorsFile
from cmdtool.errors import CmdError


def mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"w32": torch.randn(5, 7, generator=g), "w16": torch.randn(9, generator=g).half(),
            "w64": torch.randn(3, 2, generator=g, dtype=torch.float64),
            "wbf": torch.randn(4, 4, generator=g).bfloat16(), "count": torch.tensor(12, dtype=torch.int64),
            "flag": torch.tensor([True, False, True]), "scalar": torch.tensor(0.5)}


def write_raw(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_entries_and_bytes_equal_what_safetensors_reads(tmp_path):
    path = tmp_path / "m.safetensors"
    state = mixed_state()
    save_file(state, str(path), metadata={"epoch": "3", "note": "x"})
    f = SafetensorsFile(path)
    with safe_open(str(path), framework="pt") as reference:
        assert list(f.entries) == list(reference.keys())  # sorted by name, as safetensors' keys()
        assert f.metadata == reference.metadata()
        for name in reference.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            expected = reference.get_tensor(name)
            raw = np.empty(f.entries[name].nbytes, dtype=np.uint8)
            f.read_into(name, raw)
            assert raw.tobytes() == expected.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name
            assert f.entries[name].shape == tuple(expected.shape)
    f.close()


def test_float32_values_of_every_float_dtype_are_torch_conversions(tmp_path):
    path = tmp_path / "m.safetensors"
    state = mixed_state()
    save_file(state, str(path))
    scratch = np.zeros(64, dtype=np.uint8)
    with CheckpointReader(path, "safetensors") as reader:
        for name in ("w32", "w16", "w64", "wbf", "scalar"):
            out = np.full(state[name].numel(), np.nan, dtype=np.float32)
            reader.read_float32(name, out, scratch)
            assert np.array_equal(out, state[name].to(torch.float32).reshape(-1).numpy()), name
            assert torch.equal(reader.tensor(name), state[name]), name
        assert reader.raw_bytes("count").view(np.int64).tolist() == [12]


@pytest.mark.parametrize("header, data, problem", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "outside the 8 data bytes"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, "16 bytes for float32 [3]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative"),
    ({"__metadata__": {"k": 3}}, b"", "__metadata__"),
])
def test_an_inconsistent_header_is_refused_before_any_read(tmp_path, header, data, problem):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    message = f"bad.safetensors: cannot read checkpoint, truncated or corrupt .*{re.escape(problem)}"
    with pytest.raises(CmdError, match=message):
        CheckpointReader(path, "safetensors")


def test_an_unknown_dtype_code_is_refused_by_name_before_any_read(tmp_path):
    path = write_raw(tmp_path / "odd.safetensors", {"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}},
                     b"\0" * 8)
    with pytest.raises(CmdError, match=r"odd.safetensors: tensor 'a' has dtype x9, which cmdtool cannot carry"):
        CheckpointReader(path, "safetensors")


def test_a_header_length_past_the_end_is_refused(tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CmdError, match="long.safetensors: .*header length 1000 runs past the end"):
        SafetensorsFile(path)


def test_a_file_truncated_while_read_is_a_cmd_error_not_sigbus(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(path))
    out = np.empty(1000, dtype=np.float32)
    with pytest.raises(CmdError, match="m.safetensors: the file changed while it was read"), \
            CheckpointReader(path, "safetensors") as reader:
        os.truncate(path, path.stat().st_size - 100)
        reader.read_float32("w", out)


def test_a_file_rewritten_while_read_is_refused_when_the_reader_closes(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(10, dtype=torch.float32)}, str(path))
    out = np.empty(10, dtype=np.float32)
    with pytest.raises(CmdError, match="m.safetensors: the file changed while it was read"), \
            CheckpointReader(path, "safetensors") as reader:
        reader.read_float32("w", out)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert out.tolist() == list(range(10))
