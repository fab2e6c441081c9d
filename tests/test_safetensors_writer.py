"""The direct safetensors writer (``checkpoints/safetensors_writer.py``) and the reconstruction that
uses it: the same bytes as ``safetensors``' ``save_file`` of ``arrays_at``, the same values as
``model_values`` cast to each dtype."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import cmdtool
from cmdtool.checkpoints.formats import NUMPY_DTYPES
from cmdtool.checkpoints.safetensors_writer import SafetensorsWriter, plan
from cmdtool.errors import CmdError
from cmdtool.modefile import open_mode_file
from cmdtool.modes import model_values
from cmdtool.reconstruct import arrays_at
from helpers import plant, write_run

reconstruct_module = sys.modules["cmdtool.reconstruct"]  # the package attribute is the function
SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


def _write_direct(path: Path, arrays: dict[str, np.ndarray], metadata) -> None:
    writer = SafetensorsWriter(path, [(n, str(v.dtype), v.shape) for n, v in arrays.items()], metadata)
    try:
        for name, values in reversed(list(arrays.items())):  # any order
            writer.write(name, np.ascontiguousarray(values))
    finally:
        writer.close()


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"é\n\"x\\": "ü\u2028\x01\x7f"}])
def test_same_bytes_as_save_file(tmp_path, metadata):
    """Every dtype numpy holds, names that need escaping or sort oddly, empty and 0-d tensors, and
    every header padding (names of 1 to 8 characters)."""
    rng = np.random.default_rng(0)
    for extra in range(8):
        arrays = {}
        for k, dtype in enumerate(sorted(NUMPY_DTYPES)):
            shape = [(3, 2), (), (0, 4), (5,)][k % 4]
            arrays[f"{'x' * (extra + 1)}{k}"] = np.asarray(rng.normal(size=shape) * 100).astype(dtype)
        arrays.update({"Z": np.ones(3, np.float32), "a.b": np.zeros(2, np.float32), "ä\t\"": np.ones(1, np.int64)})
        expected, got = tmp_path / f"e{extra}.safetensors", tmp_path / f"g{extra}.safetensors"
        save_file(arrays, str(expected), metadata=metadata)
        _write_direct(got, arrays, metadata)
        assert got.read_bytes() == expected.read_bytes()
        header, _, size = plan([(n, str(v.dtype), v.shape) for n, v in arrays.items()], metadata)
        assert size == expected.stat().st_size and expected.read_bytes().startswith(header)


def test_full_disk_is_a_cmd_error_naming_the_file(tmp_path, monkeypatch):
    import os

    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(CmdError, match="shown.safetensors: cannot write: No space left on device"):
        SafetensorsWriter(tmp_path / "x", [("w", "float32", (3,))], None, shown=tmp_path / "shown.safetensors")


class _Rows:
    """A stand-in writer: collects what ``_write_modelled`` writes, row by row."""

    def __init__(self, nbytes: int):
        self.data = np.zeros(nbytes, dtype=np.uint8)
        self.written = np.zeros(nbytes, dtype=np.int64)

    def write(self, name, data, at=0):
        view = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        self.data[at:at + len(view)] = view
        self.written[at:at + len(view)] += 1


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # float16 of the huge values, as before
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_values_are_model_values_cast(dtype, monkeypatch):
    """Bit for bit ``model_values(...).astype(dtype)`` at every checkpoint: random parameters,
    slices where every ``a`` is 0 (``b`` nonzero: the shortcut; ``b = ±0`` and ``a = -0``: the
    sign of ``0 · r`` decides, computed), and values where rounding twice could differ."""
    monkeypatch.setattr(reconstruct_module, "CHUNK_BYTES", 8 * 3 * 16)  # slices of 16 columns for 3 checkpoints
    monkeypatch.setattr(reconstruct_module, "STAGE_BYTES", np.dtype(dtype).itemsize * 3 * 40)
    rng = np.random.default_rng(1)
    M, T, n = 4, 7, 500
    R = np.vstack([rng.normal(size=(M, T)).astype(np.float32), np.float32([[-1, 0, 1, 2, -2, 1e-30, -1e30]])])
    labels = rng.integers(0, M + 1, size=n).astype(np.uint8)
    a = (rng.normal(size=n) * 10.0 ** rng.integers(-8, 8, size=n)).astype(np.float32)
    b = (rng.normal(size=n) * 10.0 ** rng.integers(-8, 8, size=n)).astype(np.float32)
    a[32:64] = 0.0                      # the shortcut: b is every value
    a[64:80], b[64:80] = 0.0, -0.0      # b = -0: +0 or -0, by the sign of r
    a[80:96], b[80:96] = -0.0, 0.0
    a[96:112] = np.float32(-0.0)
    a[112:128], b[112:128] = 1.0, np.float32(2.0 ** -24)  # r + tiny b: a tie in float32 after float64
    indices = [0, 3, 6]
    spec = cmdtool.layout.TensorSpec("w", (n,), dtype, True, 0)
    rows = [_Rows(n * np.dtype(dtype).itemsize) for _ in indices]
    R64 = R.astype(np.float64)
    reconstruct_module._write_modelled(rows, spec, np.ascontiguousarray(R64[:, indices].T), labels, a, b)
    for t, row in zip(indices, rows):
        assert (row.written == 1).all()
        expected = model_values(labels, a, b, R64[:, t]).astype(dtype)
        assert row.data.tobytes() == expected.tobytes()


def _reference_files(mode_file: Path, folder: Path) -> dict[str, bytes]:
    """What the code before the direct writer wrote: ``save_file`` of ``arrays_at``."""
    folder.mkdir()
    out = {}
    with open_mode_file(mode_file) as modes:
        for i, name in enumerate(modes.names):
            save_file(arrays_at(modes, i), str(folder / name), metadata=modes.infos[i].metadata)
            out[name] = (folder / name).read_bytes()
    return out


def test_reconstructed_run_is_save_files_bytes(tmp_path, monkeypatch):
    """A planted run with carried int64 steps, a float16 tensor, a frozen tensor (``a = 0``), a
    tensor of zeros and one of ``-0.0``; written in groups of 3 files and small slices."""
    planted = plant(T=11)
    states = []
    for state in planted.states():
        state = dict(state)
        state["conv.weight"] = state["conv.weight"].to(torch.float16)
        state["fc.bias"] = torch.linspace(-1, 1, 10)  # frozen
        state["bn.weight"] = torch.zeros(8)
        state["bn.running_mean"] = torch.full((8,), -0.0)
        states.append(state)
    run = write_run(tmp_path / "run", states)
    mode_file = tmp_path / "m.cmd.h5"
    cmdtool.fit(run, mode_file, modes=3, trajectory=tmp_path / "t.h5")
    expected = _reference_files(mode_file, tmp_path / "expected")
    monkeypatch.setattr(reconstruct_module, "GROUP_FILES", 3)
    monkeypatch.setattr(reconstruct_module, "CHUNK_BYTES", 8 * 3 * 20)
    monkeypatch.setattr(reconstruct_module, "STAGE_BYTES", 4 * 3 * 50)
    cmdtool.reconstruct_checkpoints(mode_file, tmp_path / "out", "all")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == expected
    cmdtool.reconstruct_checkpoints(mode_file, tmp_path / "last", "last")
    assert [p.name for p in (tmp_path / "last").iterdir()] == ["epoch_10.safetensors"]
    assert (tmp_path / "last" / "epoch_10.safetensors").read_bytes() == expected["epoch_10.safetensors"]


def test_sample_run_is_save_files_bytes(tmp_path):
    mode_file = tmp_path / "m.cmd.h5"
    cmdtool.fit(SAMPLES, mode_file, trajectory=tmp_path / "t.h5")
    expected = _reference_files(mode_file, tmp_path / "expected")
    cmdtool.reconstruct_checkpoints(mode_file, tmp_path / "out", "all")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == expected
