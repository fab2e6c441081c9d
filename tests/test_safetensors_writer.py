"""The direct safetensors writer (``checkpoints/safetensors_writer.py``) and the reconstruction that
uses it: the same bytes as ``safetensors``' ``save_file`` of ``arrays_at`` (and of torch's state
dict, bfloat16 included), the same values as ``model_values`` cast to each dtype as torch casts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import cmdtool
from cmdtool.checkpoints.formats import NUMPY_DTYPES
from cmdtool.checkpoints.safetensors_writer import BFLOAT16_NAN, SafetensorsWriter, cast, plan
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


def _bits(values: torch.Tensor) -> np.ndarray:
    return values.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]).numpy()


# float64 values at the edges of the 16-bit dtypes: ±0, infinities, the largest finite values and
# those just past them, subnormals and the smallest steps below them, and values one float32 step
# from a tie of bfloat16 (1 + 2^-8) or float16 (1 + 2^-11), which rounding twice (through float32,
# as torch does) and rounding once (numpy's float64 -> float16) round apart
EDGES = np.array([0.0, -0.0, np.inf, -np.inf, 1.0, -1.0, 3.4028234663852886e38, 3.4028235677973366e38, 1e39, -1e300,
                  3.3895313892515355e38, 3.3961e38, -3.3961e38, 65504.0, 65519.99, 65520.0, -65520.0, 6e-8, 2.98e-8,
                  5.96e-8, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 + 2.0 ** -50, 1e-40, -1e-40, 2.0 ** -149,
                  2.0 ** -150, 2.0 ** -150 + 2.0 ** -200, 9.183549615799121e-41, 1 + 2.0 ** -8,
                  1 + 2.0 ** -8 + 2.0 ** -40, 1 + 3 * 2.0 ** -8 - 2.0 ** -40, -(1 + 2.0 ** -8 + 2.0 ** -40),
                  1 + 2.0 ** -11 + 2.0 ** -40, 1 + 3 * 2.0 ** -11 - 2.0 ** -40, 1 + 2.0 ** -11 - 2.0 ** -40])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_cast_rounds_as_torch(dtype):
    """``cast`` gives torch's ``.to(dtype)`` bits: random values over the whole range (float64 and
    float32 inputs, more than one of torch's vector blocks) and the edges; NaN as torch's scalar
    conversion writes it (NaNs in whole 16-element blocks torch's vector kernel writes otherwise)."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=20_000) * np.exp(rng.uniform(-110, 110, size=20_000))
    wanted = getattr(torch, dtype)
    with np.errstate(over="ignore"):
        single = values.astype(np.float32)
    for x in (values, single, EDGES, np.tile(EDGES, 5)[::-1].copy()):
        expected = _bits(torch.from_numpy(x).to(wanted))
        assert cast(x, dtype).tobytes() == expected.tobytes()
    out = np.zeros((3, len(EDGES)), dtype=cast(EDGES[:1], dtype).dtype)
    cast(EDGES, dtype, out)  # broadcast into rows
    assert all(row.tobytes() == cast(EDGES, dtype).tobytes() for row in out)
    nan = np.array([np.nan, -np.nan, 1.0, np.nan])
    assert cast(nan, dtype).tobytes() == _bits(torch.from_numpy(nan).to(wanted)).tobytes()
    if dtype == "bfloat16":
        assert cast(nan, dtype).tolist() == [BFLOAT16_NAN, BFLOAT16_NAN, 0x3F80, BFLOAT16_NAN]


def test_float16_rounds_twice_as_torch_does():
    """The one value of ``EDGES`` where rounding once and twice differ for float16: torch's 1.0."""
    value = np.array([1 + 2.0 ** -11 + 2.0 ** -40])
    assert value.astype(np.float16).view(np.uint16)[0] == 0x3C01  # numpy: rounded once, up
    assert cast(value, "float16").view(np.uint16)[0] == 0x3C00 == _bits(torch.from_numpy(value).half())[0]


def test_bfloat16_in_a_file_is_torch_save_files_bytes(tmp_path):
    """A file with bfloat16 among the other dtypes: ``save_file`` of torch's state dict, byte for byte."""
    from safetensors.torch import save_file as torch_save_file

    rng = np.random.default_rng(3)
    state = {f"t{k}": torch.from_numpy(rng.normal(size=(3, k + 1)) * 100).to(getattr(torch, dtype))
             for k, dtype in enumerate(["bfloat16", "float16", "float32", "int64", "uint8", "bool", "int16",
                                        "bfloat16", "float64", "int32"])}
    state["z"] = torch.zeros(0, 2, dtype=torch.bfloat16)
    expected, got = tmp_path / "e.safetensors", tmp_path / "g.safetensors"
    torch_save_file(state, str(expected), metadata={"format": "pt"})
    dtypes = {name: str(value.dtype).removeprefix("torch.") for name, value in state.items()}
    writer = SafetensorsWriter(got, [(n, dtypes[n], tuple(v.shape)) for n, v in state.items()], {"format": "pt"})
    try:
        for name, value in state.items():
            data = cast(value.double().numpy(), "bfloat16") if dtypes[name] == "bfloat16" else value.numpy()
            writer.write(name, data)
    finally:
        writer.close()
    assert got.read_bytes() == expected.read_bytes()


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


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_values_are_model_values_cast(dtype, monkeypatch):
    """Bit for bit ``model_values(...)`` cast as torch casts it (``state_dict_at``) at every
    checkpoint: random parameters, slices where every ``a`` is 0 (``b`` nonzero: the shortcut;
    ``b = ±0`` and ``a = -0``: the sign of ``0 · r`` decides, computed), values where rounding twice
    could differ, and spans of frozen columns (read a span at a time)."""
    monkeypatch.setattr(reconstruct_module, "CHUNK_BYTES", 8 * 3 * 16)  # slices of 16 columns for 3 checkpoints
    monkeypatch.setattr(reconstruct_module, "STAGE_BYTES", 4 * 3 * 40)
    monkeypatch.setattr(reconstruct_module, "SPAN_COLUMNS", 32)
    rng = np.random.default_rng(1)
    M, T, n = 4, 7, 500
    R = np.vstack([rng.normal(size=(M, T)).astype(np.float32),
                   np.float32([[-1, 0, 1, 1 + 2.0 ** -20, -2, 1e-30, -1e30]])])
    labels = rng.integers(0, M + 1, size=n).astype(np.uint8)
    a = (rng.normal(size=n) * 10.0 ** rng.integers(-8, 8, size=n)).astype(np.float32)
    b = (rng.normal(size=n) * 10.0 ** rng.integers(-8, 8, size=n)).astype(np.float32)
    a[32:64] = 0.0                      # the shortcut: b is every value, a whole span
    a[64:80], b[64:80] = 0.0, -0.0      # b = -0: +0 or -0, by the sign of r
    a[80:96], b[80:96] = -0.0, 0.0
    a[96:112] = np.float32(-0.0)
    a[112:128], b[112:128] = 1.0, np.float32(2.0 ** -24)  # r + tiny b: a tie in float32 after float64
    # (1 + 2^-20)² + 255·2^-19 = 1 + 2^-11 + 2^-40: float16 rounds it to 1 through float32, up at once
    labels[128:144], a[128:144], b[128:144] = M, np.float32(1 + 2.0 ** -20), np.float32(255 * 2.0 ** -19)
    indices = [0, 3, 6]
    spec = cmdtool.layout.TensorSpec("w", (n,), dtype, True, 0)
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    rows = [_Rows(n * itemsize) for _ in indices]
    R64 = R.astype(np.float64)
    reconstruct_module._write_modelled(rows, spec, np.ascontiguousarray(R64[:, indices].T),
                                       lambda start, stop: (labels[start:stop], a[start:stop], b[start:stop]))
    for t, row in zip(indices, rows):
        assert (row.written == 1).all()
        expected = _bits(torch.from_numpy(model_values(labels, a, b, R64[:, t])).to(getattr(torch, dtype)))
        assert row.data.tobytes() == expected.tobytes()
    if dtype == "float16":
        assert (rows[1].data.view(np.uint16)[128:144] == 0x3C00).all()  # not numpy's 0x3C01


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
