"""A safetensors file read with plain ``pread``s into caller's buffers: no memory map, no torch
(``_portable.read_at``: a seek and a read where the platform has no ``pread``).

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length ``H``,
``H`` bytes of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``), then the data; offsets count from the end of the header. The header is validated
before any size or offset in it is trusted: every tensor inside the file, its byte count equal to
its dtype's size times its shape, no two tensors overlapping.

Reading into a buffer the caller reuses costs one copy from the page cache and no page faults,
where a memory map faults on every page of every tensor. A file that is shortened while it is
memory-mapped kills the reader with SIGBUS; here a short read, or a size or modification time
that differs after reading from before, is a ``CmdError`` naming the file.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._portable import open_fd, read_at, read_full
from ..errors import CmdError
from ..layout import DTYPE_SIZES

# safetensors dtype -> (dtype name as cmdtool writes it, bytes per element)
# (other codes, such as F4 and F6_* with elements smaller than a byte, are refused by name)
DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
          "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "F8_E8M0": ("float8_e8m0fnu", 1),
          "C64": ("complex64", 8), "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
          "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1), "BOOL": ("bool", 1)}
MAX_HEADER = 100 * 2**20  # the format's own limit


@dataclass(frozen=True)
class Entry:
    dtype: str              # cmdtool's name: "float32", "bfloat16", ...
    shape: tuple[int, ...]
    start: int              # absolute byte position in the file
    nbytes: int


class SafetensorsFile:
    """One open safetensors file: ``entries`` (sorted by name), ``metadata``, and reads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = open_fd(self.path, os.O_RDONLY)
        try:
            st = os.fstat(self.fd)
            self._stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            self.entries, self.metadata = self._parse(st.st_size)
        except BaseException:
            os.close(self.fd)
            raise

    def _bad(self, problem: str) -> CmdError:
        return CmdError(f"{self.path}: cannot read checkpoint, truncated or corrupt (safetensors header: {problem})")

    def _parse(self, size: int) -> tuple[dict[str, Entry], dict[str, str] | None]:
        head = bytearray(8)
        if read_full(self.fd, memoryview(head), 0) < 8:
            raise self._bad("shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER, size - 8):
            raise self._bad(f"header length {header_len} runs past the end of the {size}-byte file")
        try:
            header = json.loads(self._read_bytes(8, header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict) and
                                         all(isinstance(v, str) for v in metadata.values())):
            raise self._bad("__metadata__ must map strings to strings")
        data_start, data_len = 8 + header_len, size - 8 - header_len
        entries, spans = {}, []
        for name, spec in sorted(header.items()):  # by name, as safetensors' own ``keys()``
            try:
                code = spec["dtype"]
                shape = tuple(spec["shape"])
                begin, end = spec["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"tensor {name!r}: needs a dtype, a shape and two data_offsets") from None
            if code not in DTYPES:
                raise CmdError(f"{self.path}: tensor {name!r} has dtype {str(code).lower()}, which cmdtool cannot "
                               f"carry or model (supported: {', '.join(DTYPE_SIZES)})")
            dtype, itemsize = DTYPES[code]
            if not all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)):
                raise self._bad(f"tensor {name!r}: shape and offsets must be non-negative integers")
            if not begin <= end <= data_len:
                raise self._bad(f"tensor {name!r}: bytes {begin}..{end} lie outside the {data_len} data bytes")
            if end - begin != itemsize * math.prod(shape):
                raise self._bad(f"tensor {name!r}: {end - begin} bytes for {dtype} {list(shape)}, "
                                f"which needs {itemsize * math.prod(shape)}")
            entries[name] = Entry(dtype, shape, data_start + begin, end - begin)
            spans.append((begin, end, name))
        spans.sort()
        for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
            if begin < end:
                raise self._bad(f"tensors {first!r} and {second!r} overlap")
        return entries, metadata

    def _read_bytes(self, position: int, n: int) -> bytes:
        data = bytearray(n)
        if read_full(self.fd, memoryview(data), position) != n:
            raise self._changed()
        return bytes(data)

    def _changed(self) -> CmdError:
        return CmdError(f"{self.path}: the file changed while it was read (truncated or rewritten); "
                        f"read it again once it is complete")

    def read_into(self, name: str, out: np.ndarray) -> None:
        """The raw bytes of tensor ``name`` into ``out`` (any C-contiguous array of that many bytes)."""
        entry = self.entries[name]
        self._pread(name, entry.start, entry.nbytes, out)

    def read_range(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """The raw bytes of elements ``start:stop`` of tensor ``name`` (flat, in C order) into
        ``out`` (a C-contiguous array of that many bytes): only those bytes are read."""
        entry = self.entries[name]
        itemsize = DTYPE_SIZES[entry.dtype]
        if not 0 <= start <= stop <= entry.nbytes // itemsize:
            raise ValueError(f"{name}: elements {start}:{stop} of {entry.nbytes // itemsize}")
        self._pread(name, entry.start + start * itemsize, (stop - start) * itemsize, out)

    def _pread(self, name: str, position: int, nbytes: int, out: np.ndarray) -> None:
        view = memoryview(out).cast("B")
        if len(view) != nbytes:
            raise ValueError(f"{name}: buffer of {len(view)} bytes for {nbytes}")
        while view:
            n = read_at(self.fd, view, position)
            if n == 0:
                raise self._changed()
            view, position = view[n:], position + n

    def read_float32(self, name: str, out: np.ndarray, scratch: np.ndarray | None = None,
                     span: tuple[int, int] | None = None) -> None:
        """A floating-point tensor's values into ``out`` (flat float32 of its size): float32 read
        straight into ``out``, another dtype through ``scratch`` (uint8, at least the tensor's
        bytes, reused by the caller) and converted exactly. With ``span = (start, stop)`` only
        those elements (flat) are read, into an ``out`` of ``stop - start``."""
        entry = self.entries[name]

        def read(buffer: np.ndarray) -> None:
            if span is None:
                self.read_into(name, buffer)
            else:
                self.read_range(name, *span, buffer)

        if entry.dtype == "float32":
            read(out)
            return
        nbytes = entry.nbytes if span is None else (span[1] - span[0]) * DTYPE_SIZES[entry.dtype]
        if scratch is None or len(scratch) < nbytes:
            scratch = np.empty(nbytes, dtype=np.uint8)
        raw = scratch[:nbytes]
        read(raw)
        if entry.dtype == "bfloat16":  # the upper half of a float32: exact by shifting
            np.left_shift(raw.view("<u2"), 16, out=out.view(np.uint32), dtype=np.uint32)
        elif entry.dtype in ("float16", "float64"):
            np.copyto(out, raw.view(entry.dtype), casting="same_kind")
        else:  # float8: numpy has no such type
            from .._lazy import torch
            out[:] = torch.from_numpy(raw).view(getattr(torch, entry.dtype)).to(torch.float32).numpy()

    def check_unchanged(self) -> None:
        """Raise ``CmdError`` if the file at the path is no longer the one opened, with the same size
        and modification time (truncated, rewritten or replaced while it was read)."""
        try:
            st = os.stat(self.path)
        except OSError:
            raise self._changed() from None
        if (st.st_ino, st.st_size, st.st_mtime_ns) != self._stamp:
            raise self._changed()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
