"""A safetensors file written as ``safetensors``' own ``save_file`` writes it, without building the
tensors first: the header is computed up front from the names, dtypes and shapes, and each tensor's
bytes are then written at their place (``pwrite``, or a seek and a write where the platform has
none), from whatever buffer the caller reuses.

What ``save_file`` writes (checked byte for byte against it in ``tests/test_safetensors_writer.py``):
8 bytes little-endian header length, the header as compact JSON (``__metadata__`` first when given,
then the tensors in the order of their data) padded with spaces to a multiple of 8 bytes, then the
data with no gaps, the tensors sorted by dtype (descending in safetensors' ``Dtype`` order, so that
larger elements come first and every tensor stays aligned) and then by name. The one difference:
``save_file`` writes a metadata dict of several keys in a hash map's order, which changes from one
process to the next; here the dict's own order is kept.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .._portable import open_fd, reserve, write_full
from ..errors import CmdError
from .safetensors_file import DTYPES

CODES = {dtype: code for code, (dtype, _) in DTYPES.items()}  # cmdtool dtype name -> safetensors code
SIZES = {dtype: size for dtype, size in DTYPES.values()}
# safetensors' ``Dtype`` enum in declaration order, the data sorted by it descending: the dtypes numpy
# holds (``formats.NUMPY_DTYPES``) and bfloat16 (written as its bits, ``cast``), each checked against
# ``save_file``; float8 and complex tensors are written through torch and ``save_file`` instead
DTYPE_ORDER = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
_RANK = {code: rank for rank, code in enumerate(DTYPE_ORDER)}
WRITTEN_DTYPES = frozenset(dtype for dtype, code in CODES.items() if code in _RANK)  # what this writer writes
BFLOAT16_NAN = 0x7FC0  # c10::BFloat16's NaN


def stored(dtype: str) -> np.dtype:
    """The numpy dtype of a tensor's elements as written: bfloat16 as its bits (``uint16``)."""
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def cast(values: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Float ``values`` rounded to ``dtype`` as torch's ``.to(dtype)`` rounds them, as the elements
    written (``stored(dtype)``; into ``out`` when given). torch converts a float64 to a float16 or a
    bfloat16 through float32 (rounding twice, which can differ by one unit from rounding once, as
    numpy's float64 -> float16 does), so these go through float32 here too; bfloat16 is then the
    upper half of float32's bits rounded to nearest even, NaN written as ``BFLOAT16_NAN`` (torch's
    scalar conversion; its vectorised kernel writes 0xFFFF for the NaNs in whole blocks of 16, so
    torch's own bytes for a NaN depend on where it lies). Too large a value becomes ±inf, silently
    as in torch. Checked value for value against torch in ``tests/test_safetensors_writer.py``."""
    out = np.empty(np.shape(values), dtype=stored(dtype)) if out is None else out
    with np.errstate(over="ignore"):
        if dtype != "bfloat16":
            np.copyto(out, np.asarray(values, dtype=np.float32) if dtype == "float16" else values, casting="unsafe")
            return out
        single = np.array(values, dtype=np.float32)  # a copy: its bits are rounded in place
    nan = np.isnan(single)
    bits = single.view(np.uint32)
    rounding = bits >> 16
    rounding &= 1
    rounding += 0x7FFF
    bits += rounding  # wraps around only for NaNs, which are replaced below
    bits >>= 16
    np.copyto(out, bits, casting="unsafe")
    if nan.any():
        np.copyto(out, BFLOAT16_NAN, where=nan)  # ``values`` may be broadcast into ``out``
    return out


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def plan(tensors: Sequence[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None
         ) -> tuple[bytes, dict[str, int], int]:
    """The first bytes of the file (length and header), each tensor's absolute byte position, and
    the file's size, for ``tensors`` given as ``(name, dtype, shape)``."""
    order = sorted(tensors, key=lambda t: (-_RANK[CODES[t[1]]], t[0]))
    parts, relative, offset = [], {}, 0
    if metadata is not None:
        parts.append(f"{_json('__metadata__')}:{_json(dict(metadata))}")
    for name, dtype, shape in order:
        nbytes = SIZES[dtype] * int(np.prod(shape, dtype=np.int64))
        parts.append(f'{_json(name)}:{{"dtype":"{CODES[dtype]}","shape":{_json([int(d) for d in shape])},'
                     f'"data_offsets":[{offset},{offset + nbytes}]}}')
        relative[name] = offset
        offset += nbytes
    header = ("{" + ",".join(parts) + "}").encode()
    header += b" " * (-len(header) % 8)
    start = 8 + len(header)
    return struct.pack("<Q", len(header)) + header, {n: start + o for n, o in relative.items()}, start + offset


class SafetensorsWriter:
    """One safetensors file being written: ``write(name, data, at)`` puts ``data`` (any C-contiguous
    array) at byte ``at`` of tensor ``name``'s data; every byte of every tensor must be written
    once before ``close``. The file's blocks are reserved up front (a full disk fails here, before
    any data is written). A failed write is a ``CmdError`` naming ``shown`` (default ``path``)."""

    def __init__(self, path: Path, tensors: Sequence[tuple[str, str, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None, shown: Path | None = None):
        head, self.positions, self.size = plan(tensors, metadata)
        self.shown, self.fd = shown or path, None
        try:
            self.fd = open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                reserve(self.fd, self.size, Path(path).parent)
            except OSError as e:  # a filesystem without fallocate: the writes allocate instead
                if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG):
                    raise
            self._pwrite(memoryview(head), 0)
        except OSError as e:
            self.close()
            raise self._failed(e) from None
        except BaseException:
            self.close()
            raise

    def _failed(self, e: OSError) -> CmdError:
        return CmdError(f"{self.shown}: cannot write: {e.strerror or e}")

    def _pwrite(self, view: memoryview, position: int) -> None:
        try:
            write_full(self.fd, view, position)
        except OSError as e:
            raise self._failed(e) from None

    def write(self, name: str, data: np.ndarray, at: int = 0) -> None:
        self._pwrite(memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8)), self.positions[name] + at)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ShardedFiles:
    """The safetensors files of one Hugging Face folder, written as one file is: ``write(name, ...)``
    goes to the file that holds tensor ``name``."""

    def __init__(self) -> None:
        self.files: list[SafetensorsWriter] = []
        self.holding: dict[str, SafetensorsWriter] = {}

    def open(self, path: Path, tensors: Sequence[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str] | None,
             shown: Path | None = None) -> None:
        self.files.append(SafetensorsWriter(path, tensors, metadata, shown))
        self.holding.update(dict.fromkeys((name for name, _, _ in tensors), self.files[-1]))

    def write(self, name: str, data: np.ndarray, at: int = 0) -> None:
        self.holding[name].write(name, data, at)

    def close(self) -> None:
        for writer in self.files:
            writer.close()


class DeferredFiles:
    """The ``state`` of ``write_checkpoint`` for safetensors files whose bytes the caller writes
    afterwards: ``write_checkpoint`` then only creates the file with its header (``open``; a
    Hugging Face folder: its weight files, ``open_folder``, and the rest of the folder), and the
    caller fills every tensor of every checkpoint through ``writers`` (one per checkpoint), in
    whatever order suits it (``reconstruct`` computes each tensor once for many checkpoints), then
    closes them."""

    def __init__(self, tensors: Sequence[tuple[str, str, tuple[int, ...]]]):
        self.tensors = list(tensors)
        self.writers: list[SafetensorsWriter | ShardedFiles] = []

    def open(self, path: Path, metadata: Mapping[str, str] | None, shown: Path | None = None) -> None:
        self.writers.append(SafetensorsWriter(path, self.tensors, metadata, shown))

    def open_folder(self, folder: Path, shards: Mapping[str, Sequence[str]], metadata: Mapping[str, str] | None,
                    shown: Path) -> None:
        """The weight files ``shards`` (file name -> its tensors) in ``folder``, as one writer."""
        self.writers.append(files := ShardedFiles())
        tensors = {tensor[0]: tensor for tensor in self.tensors}
        for file_name, names in shards.items():
            files.open(folder / file_name, [tensors[name] for name in names], metadata, shown / file_name)

    def nbytes(self, name: str) -> int:
        """Bytes of tensor ``name``'s data."""
        _, dtype, shape = next(tensor for tensor in self.tensors if tensor[0] == name)
        return SIZES[dtype] * int(np.prod(shape, dtype=np.int64))

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
