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
# holds (``formats.NUMPY_DTYPES``), each checked against ``save_file``; bfloat16, float8 and complex
# tensors are written through torch and ``save_file`` instead
DTYPE_ORDER = ("BOOL", "U8", "I8", "I16", "U16", "F16", "I32", "U32", "F32", "F64", "I64", "U64")
_RANK = {code: rank for rank, code in enumerate(DTYPE_ORDER)}


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


class DeferredFiles:
    """The ``state`` of ``write_checkpoint`` for safetensors files whose bytes the caller writes
    afterwards: ``write_checkpoint`` then only creates the file with its header (``open``), and
    the caller fills every tensor of every file through ``writers``, in whatever order suits it
    (``reconstruct`` computes each tensor once for many checkpoints), then closes them."""

    def __init__(self, tensors: Sequence[tuple[str, str, tuple[int, ...]]]):
        self.tensors = list(tensors)
        self.writers: list[SafetensorsWriter] = []

    def open(self, path: Path, metadata: Mapping[str, str] | None, shown: Path | None = None) -> None:
        self.writers.append(SafetensorsWriter(path, self.tensors, metadata, shown))

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
