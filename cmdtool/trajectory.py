"""The trajectory store: checkpoints stacked as an HDF5 matrix ``W`` of shape ``(T, N)``.

``W`` keeps the run's own precision: when every modelled tensor is bfloat16 (or every one float16)
it holds their 16-bit values (bfloat16 as its bits in ``uint16``, attribute ``W_dtype``), so the
store is no bigger than the checkpoints; otherwise float32. Readers see float32 either way
(``EncodedRows``: bfloat16 and float16 widen to float32 exactly). ``W`` is contiguous (no chunks,
no compression) and allocated up front, so it is memory-mapped with numpy at the dataset's file
offset: ingest writes one checkpoint row at a time, the fit reads ``(T, tile)`` column blocks.
The store also keeps what a fit needs without reopening the checkpoints: the layout, the time
axis, per-checkpoint write-back info, carried tensors (raw bytes), the files a Hugging Face folder
copies back (``attachments/<sha256>``, each stored once) and a ``varies`` flag per parameter (not
constant over time). A fingerprint of the inputs (file names, sizes, modification times,
selection) lets an unchanged folder reuse its store. Knows nothing about CMD.
"""

from __future__ import annotations

import hashlib
import json
import os
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from ._files import require_regular, special_kind, temporary_sibling
from ._hdf5 import check_links, check_space, read_strings, read_text, write_text
from ._portable import allocate, open_fd, write_full
from ._threads import in_threads
from .checkpoints.schema import CheckpointInfo
from .errors import CmdError
from .layout import DTYPE_SIZES, Layout, build_layout, check_same_tensors, dataset_key

if TYPE_CHECKING:
    from .checkpoints.discover import Checkpoint

STORE_KIND = "cmdtool-trajectory"
STORE_VERSION = 3  # 2: attachments, --ema; 3: W in the run's 16-bit dtype (an older reader would misread it)
# How W stores values of each kind of run: HDF5 type, numpy dtype of the stored elements.
STORED_TYPES = {"float32": (h5py.h5t.IEEE_F32LE, np.dtype("<f4")), "float16": (h5py.h5t.IEEE_F16LE, np.dtype("<f2")),
                "bfloat16": (h5py.h5t.STD_U16LE, np.dtype("<u2"))}


def stored_dtype(layout: Layout) -> str:
    """How a store keeps the run's values: its one 16-bit float dtype when every modelled tensor
    has it (exact, half the bytes of float32), else float32 (which holds every float16 and
    bfloat16 value exactly; float64 tensors are rounded to it, as they always were)."""
    dtypes = {spec.dtype for spec in layout.modelled}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= {"float16", "bfloat16"} else "float32"


def encode(values: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """float32 ``values`` read from tensors of ``dtype`` as the store keeps them (into ``out`` for a
    16-bit dtype). Exact: the values are that dtype's, widened, so bfloat16's are float32's upper half."""
    if dtype == "bfloat16":
        np.right_shift(values.view(np.uint32), 16, out=out, casting="unsafe")
    elif dtype == "float16":
        np.copyto(out, values, casting="same_kind")
    else:
        return values
    return out


def decode(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored elements as float32 (a new array; bfloat16 bits become the upper half of float32's)."""
    if dtype == "bfloat16":  # a copy, then a shift in place: 4-6x faster than one shift that casts as it goes
        widened = stored.astype(np.uint32)
        np.left_shift(widened, 16, out=widened)
        return widened.view(np.float32)
    return np.asarray(stored, dtype=np.float32).copy() if dtype == "float16" else np.asarray(stored)


class EncodedRows:
    """A 16-bit store's ``W`` (a memory map of its stored elements) read as float32: indexing reads
    the stored elements it selects and widens them (``decode``); other than that an array-like as
    the float32 map is (``W[t]``, ``W[:, start:stop]``, ``W[:, index]``, ``np.asarray(W)``; ``W[a:b]``
    is the rows' ``EncodedRows``, read when indexed)."""

    def __init__(self, stored: np.ndarray, dtype: str):
        self.stored, self.stored_dtype = stored, dtype
        self.shape, self.ndim, self.dtype = stored.shape, stored.ndim, np.dtype(np.float32)

    def __getitem__(self, key) -> np.ndarray | EncodedRows:
        if isinstance(key, slice):  # rows only: still a view (the warm-up's first F rows), as a map's slice is
            return EncodedRows(self.stored[key], self.stored_dtype)
        return decode(np.asarray(self.stored[key]), self.stored_dtype)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self).astype(dtype)

    def block(self, start: int, stop: int) -> EncodedBlock:
        """Columns ``start:stop`` still as stored (a view of the map, as a plain array: slicing a
        ``np.memmap`` costs tens of microseconds each time), widened when indexed."""
        return EncodedBlock(np.asarray(self.stored[:, start:stop]), self.stored_dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:, :], dtype=dtype)

class EncodedBlock:
    """A ``(T, n)`` column block of a 16-bit store as stored: indexing widens only what it selects
    to float32 (``decode``). The fit reads a tile this way, one cache-sized slice at a time, instead
    of widening the whole tile first and reading it back from memory."""

    def __init__(self, stored: np.ndarray, dtype: str):
        self.stored, self.stored_dtype, self.shape = stored, dtype, stored.shape
        self.nbytes = stored.nbytes

    def __getitem__(self, key) -> np.ndarray:
        return decode(np.asarray(self.stored[key]), self.stored_dtype)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:, :], dtype=dtype)


def column_block(W, start: int, stop: int) -> np.ndarray | EncodedBlock:
    """``W[:, start:stop]`` for the fit: a 16-bit store's columns as an ``EncodedBlock``, else as
    a float32 array."""
    block = getattr(W, "block", None)
    return block(start, stop) if block is not None else np.asarray(W[:, start:stop])


def column_tiles(W, start: int, stop: int, width: int) -> Iterator[tuple[int, int, np.ndarray | EncodedBlock]]:
    """``(first, last, column_block(W, first, last))`` for the tiles ``width`` wide of columns
    ``start:stop``: what the fit's and the report's passes read, here or on a Dask worker."""
    for first in range(start, stop, width):
        last = min(first + width, stop)
        yield first, last, column_block(W, first, last)


Advance = Callable[[int], None]
SPAN = 1 << 22  # values of one tensor read, checked and written at a time by build_store


def fingerprint(checkpoints: Sequence[Checkpoint], include: Sequence[str], exclude: Sequence[str],
                ema: bool = False, tensor_order: Sequence[str] | None = None) -> str:
    """Identifies the inputs of a store: any changed, added or removed checkpoint file changes it
    (and a ``tensor_order`` asked for, see ``read_signatures``)."""
    files = []
    for c in checkpoints:
        for path in c.files:
            st = path.stat()
            files.append([str(path.resolve()), c.time, st.st_size, st.st_mtime_ns])
    inputs = {"version": STORE_VERSION, "files": files, "ema": ema, "include": list(include), "exclude": list(exclude)}
    if tensor_order is not None:
        inputs["tensor_order"] = list(tensor_order)
    text = json.dumps(inputs)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Trajectory:
    """A ``(T, N)`` float32 trajectory with its layout and checkpoints: what a fit reads
    (``fitting.TrajectorySource``). ``W`` is any array-like of rows: a store's memory map, or rows
    held in memory; ``carried`` and ``attachments`` are read by the subclasses."""
    layout: Layout
    time: np.ndarray           # (T,) step or epoch numbers
    names: list[str]           # (T,) checkpoint file names
    infos: list[CheckpointInfo]
    varies: np.ndarray         # (N,) bool: the parameter is not constant over the run
    W: np.ndarray              # (T, N) float32, read-only

    @property
    def T(self) -> int:
        return self.W.shape[0]

    @property
    def N(self) -> int:
        return self.W.shape[1]

    def tiles(self, tile_columns: int, stored: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(start, stop, W[:, start:stop])`` column blocks covering all N parameters; with
        ``stored``, a 16-bit store's blocks as ``EncodedBlock`` (``column_block``)."""
        if stored:
            yield from column_tiles(self.W, 0, self.N, tile_columns)
            return
        for start in range(0, self.N, tile_columns):
            stop = min(start + tile_columns, self.N)
            yield start, stop, np.asarray(self.W[:, start:stop])

    def columns(self, index: np.ndarray) -> np.ndarray:
        """The trajectories of the parameters ``index`` (sorted), as a ``(T, len(index))`` array."""
        return np.asarray(self.W[:, index])

    def carried(self, name: str) -> np.ndarray:
        """A carried tensor's raw bytes, ``(T, nbytes)`` uint8."""
        raise NotImplementedError

    def attachments(self) -> dict[str, bytes]:
        """The files copied back with Hugging Face folders, by SHA-256."""
        raise NotImplementedError


@dataclass
class InMemoryTrajectory(Trajectory):
    """Rows held in memory (or a view of a store's rows), with their carried tensors and attachments."""
    carried_rows: dict[str, np.ndarray] = field(default_factory=dict)   # name -> (T, nbytes) uint8
    attachment_files: dict[str, bytes] = field(default_factory=dict)

    def carried(self, name: str) -> np.ndarray:
        return self.carried_rows[name]

    def attachments(self) -> dict[str, bytes]:
        return dict(self.attachment_files)


def moving_parameters(W, tile_columns: int = 1 << 20, rows: int | None = None) -> np.ndarray:
    """Which columns of the rows ``W`` (its first ``rows``: ``W[:rows]`` of a 16-bit or sharded store
    would widen them all at once) are not constant, read in column tiles."""
    varies = np.zeros(W.shape[1], dtype=bool)
    for start in range(0, W.shape[1], tile_columns):
        block = np.asarray(W[:rows, start:start + tile_columns])
        varies[start:start + tile_columns] = (block[1:] != block[0]).any(axis=0)
    return varies


@dataclass
class TrajectoryStore(Trajectory):
    """A trajectory store on disk (see the module docstring); ``W`` is a read-only memory map.

    Everything is read through the file opened by ``open_store`` (``handle``, and ``W`` mapped from
    the same descriptor), never by path again: another process may replace the store at ``path``
    meanwhile (a fit of another selection of the folder), and a fit must not mix two stores."""
    path: Path | None = None
    fingerprint: str = ""
    handle: h5py.File | None = None

    def carried(self, name: str) -> np.ndarray:
        if self.handle is None:  # a store made without open_store
            with h5py.File(self.path, "r") as f:
                return f["carried"][dataset_key(name)][()]
        return self.handle["carried"][dataset_key(name)][()]

    def attachments(self) -> dict[str, bytes]:
        if self.handle is None:
            with h5py.File(self.path, "r") as f:
                group = f.get("attachments", {})
                return {digest: group[digest][()].tobytes() for digest in group}
        group = self.handle.get("attachments", {})
        return {digest: group[digest][()].tobytes() for digest in group}


def open_store(path: Path) -> TrajectoryStore:
    """Open a complete store read-only; raise CmdError if it is not one."""
    f = None
    try:
        require_regular(path, "a trajectory store")
        f = h5py.File(path, "r")
        if f.attrs.get("kind") != STORE_KIND or not f.attrs.get("complete"):
            raise CmdError(f"{path}: not a complete cmdtool trajectory store")
        check_links(f)
        layout = Layout.from_json(read_text(f, "layout"))
        time = f["time"][()]
        names = read_strings(f, "names")
        infos = [CheckpointInfo.from_json(s) for s in read_strings(f, "infos")]
        flags = f["varies"]
        flags_shape, flags_offset = flags.shape, flags.id.get_offset() if flags.dtype == bool else None
        ds = f["W"]
        shape, offset = ds.shape, ds.id.get_offset()
        if offset is None or shape != (len(names), layout.n_parameters) or flags_shape != (layout.n_parameters,):
            raise CmdError(f"{path}: trajectory store is inconsistent")
        dtype = str(f.attrs.get("W_dtype", "float32"))
        if dtype not in STORED_TYPES or ds.dtype != STORED_TYPES[dtype][1]:
            raise CmdError(f"{path}: trajectory store is inconsistent (W is {ds.dtype}, said to be {dtype})")
        with os.fdopen(os.dup(f.id.get_vfd_handle()), "rb") as same_file:  # the inode h5py opened
            W = np.memmap(same_file, dtype=STORED_TYPES[dtype][1], mode="r", offset=offset, shape=shape)
            W = W if dtype == "float32" else EncodedRows(W, dtype)
            # varies mapped like W (page cache, not a byte per parameter of the process's own)
            varies = (flags[()].astype(bool, copy=False) if flags_offset is None else
                      np.memmap(same_file, dtype=np.bool_, mode="r", offset=flags_offset, shape=flags_shape))
        return TrajectoryStore(layout, time, names, infos, varies, W, path=Path(path),
                               fingerprint=str(f.attrs.get("fingerprint", "")), handle=f)
    except CmdError:
        if f is not None:
            f.close()
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        if f is not None:
            f.close()
        raise CmdError(f"{path}: not a readable cmdtool trajectory store ({e})") from None


def store_fingerprint(path: Path) -> str | None:
    """The fingerprint of a complete store at ``path``, or None if there is none."""
    try:
        if special_kind(path) is not None:  # a FIFO or device: never opened
            return None
        with h5py.File(path, "r") as f:
            if f.attrs.get("kind") == STORE_KIND and f.attrs.get("complete"):
                return str(f.attrs["fingerprint"])
    except OSError:
        pass
    return None


def read_signatures(checkpoints: Sequence[Checkpoint], include: Sequence[str], exclude: Sequence[str],
                    ema: bool = False, advance: Advance = lambda n: None,
                    tensor_order: Sequence[str] | None = None) -> tuple[Layout, list[CheckpointInfo]]:
    """Open every checkpoint's header: all must share tensor names, shapes and dtypes. Each
    checkpoint's own key set counts (Hugging Face files leave tied weights out). The layout follows
    the first checkpoint's tensor order, or ``tensor_order`` when it names the same tensors (a mode
    file's order: a training loop lays out ``state_dict()`` order, a safetensors file sorts names)."""
    first, layout, infos = None, None, []
    for c in checkpoints:
        with c.open(ema) as reader:
            if first is None:
                first = (c, reader.signature)
                signature = reader.signature
                if tensor_order is not None and sorted(tensor_order) == sorted(signature):
                    signature = {name: signature[name] for name in tensor_order}
                try:
                    layout = build_layout(signature, include, exclude)
                except CmdError as e:
                    raise CmdError(f"{c.path.parent}: {e}") from None
            else:
                check_same_tensors(c.path, reader.signature, first[1], first[0].name)
            infos.append(reader.info)
        advance(1)
    return layout, infos


def check_unreplaced(path: Path, signature: Mapping[str, tuple], layout: Layout) -> None:
    """A checkpoint opened for the ingest still has the tensors its header had when
    ``read_signatures`` checked it: a file replaced meanwhile by one of another layout is refused."""
    try:
        check_same_tensors(path, signature, layout.signature, "the layout checked before the ingest")
    except CmdError as e:
        raise CmdError(f"{e}: the file was replaced during the ingest") from None


def check_finite(row: np.ndarray, source: object, name: str) -> None:
    """Refuse NaN and Inf in tensor ``name`` of ``source`` (a path, or words such as "observation 3").

    A finite sum proves every value finite without a mask the size of the tensor; only a sum that
    overflowed or hit a NaN/Inf is looked at value by value."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(row)) or np.isfinite(row).all():
            return
    bad = "NaN" if np.isnan(row).any() else "Inf"
    raise CmdError(f"{source}: tensor {name!r} contains {bad} values")


def read_columns(reader, path: Path, specs: Sequence, offsets: Sequence[int], start: int,
                 stop: int) -> tuple[np.ndarray, int]:
    """Columns ``start:stop`` of one open checkpoint's trajectory row (``specs``: the layout's
    modelled tensors, ``offsets`` their first columns), flat float32, read span by span of the
    tensors they cover (``read_float32``: from a safetensors file only those elements' bytes),
    NaN and Inf refused with ``path`` in the message. Returns the values and the bytes read."""
    out, nbytes = np.empty(stop - start, dtype=np.float32), 0
    for spec in specs[max(0, bisect_right(offsets, start) - 1):]:  # from the tensor holding ``start``
        if spec.offset >= stop:
            break
        lo, hi = max(start, spec.offset), min(stop, spec.offset + spec.size)
        if lo < hi:
            piece = out[lo - start:hi - start]
            reader.read_float32(spec.name, piece, span=(lo - spec.offset, hi - spec.offset))
            nbytes += (hi - lo) * DTYPE_SIZES[spec.dtype]
            check_finite(piece, path, spec.name)
    return out, nbytes


# The exponent bits of the 16-bit stored elements: all ones is Inf or NaN.
_EXPONENT = {"bfloat16": np.uint16(0x7F80), "float16": np.uint16(0x7C00)}


def check_finite_stored(stored: np.ndarray, dtype: str, source: object, name: str, scratch: np.ndarray) -> None:
    """``check_finite`` of 16-bit elements as stored, from their exponent bits (no widening):
    ``scratch`` is a uint16 buffer of their length."""
    exponent = _EXPONENT[dtype]
    np.bitwise_and(stored.view(np.uint16), exponent, out=scratch)
    if len(scratch) and scratch.max() == exponent:
        check_finite(decode(stored, dtype), source, name)


def differs_from(stored: np.ndarray, first: np.ndarray, dtype: str, out: np.ndarray, scratch: np.ndarray) -> None:
    """``out = stored != first`` as numbers, compared as the store keeps them (no widening; every
    value finite). bfloat16 elements are bits, equal exactly when the numbers are but for +0 and
    −0: a pair that differs only there (both zero once the sign bit is shifted out) is equal.
    ``scratch``: a uint16 buffer at least that long (None for other dtypes)."""
    np.not_equal(stored, first, out=out)
    if dtype == "bfloat16":
        zero = scratch[:len(out)]
        np.bitwise_or(stored, first, out=zero)
        np.left_shift(zero, 1, out=zero)
        np.logical_and(out, zero, out=out)


READ_AHEAD = 2  # spans read (and checked) by the ingest's reading thread ahead of the one being written


class _SpanBuffers:
    """One span's buffers for the ingest's reading thread: float32 values, the store's 16-bit
    elements and the finiteness check's scratch, and the bytes of a dtype converted on the way."""

    def __init__(self, largest: int, dtype: str, layout: Layout):
        self.dtype = dtype
        self.values = np.empty(largest, dtype=np.float32)
        converted = [DTYPE_SIZES[spec.dtype] for spec in layout.modelled if spec.dtype != "float32"]
        self.scratch = np.empty(largest * max(converted), dtype=np.uint8) if converted else None
        wide = dtype == "float32"
        self.encoded = None if wide else np.empty(largest, dtype=STORED_TYPES[dtype][1])
        self.bits = None if wide else np.empty(largest, dtype=np.uint16)

    def read(self, reader, path: Path, spec, lo: int, n: int) -> np.ndarray:
        """Elements ``lo : lo + n`` of tensor ``spec`` as the store keeps them, NaN and Inf refused."""
        span = None if n == spec.size else (lo, lo + n)
        if self.encoded is not None and reader.read_stored(spec.name, self.encoded[:n], span):
            stored = self.encoded[:n]  # a 16-bit tensor's elements as the store keeps them
            check_finite_stored(stored, self.dtype, path, spec.name, self.bits[:n])
            return stored
        values = self.values[:n]
        reader.read_float32(spec.name, values, self.scratch, span)
        check_finite(values, path, spec.name)
        return encode(values, self.dtype, None if self.encoded is None else self.encoded[:n])


def _read_ahead(read: Callable, jobs: Sequence, buffers: Sequence) -> Iterator[tuple]:
    """``(job, read(job, buffer))`` for each job in order, the reads done by one thread of their own
    up to ``len(buffers) − 1`` jobs ahead of the one handed out, each into the next buffer in turn
    (one no longer in use: the caller is done with a job when it asks for the next; ``in_threads``).
    One thread, so a checkpoint reader is only ever used by one thread at a time; reading overlaps
    the caller's writes. An error of a read is raised here, in its turn."""
    def run(numbered: tuple) -> tuple:
        k, job = numbered
        return job, read(job, buffers[k % len(buffers)])

    return in_threads(run, enumerate(jobs), 1, ahead=len(buffers) - 1)


class _RowWriter:
    """Plain ``pwrite``s of trajectory rows into the store file, beside h5py's own handle (a seek
    and a write on a descriptor of its own where the platform has no ``pwrite``)."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def reserve(self, position: int, nbytes: int) -> None:
        """Allocate the file's blocks for ``nbytes`` at ``position`` before the rows are written:
        writing into a hole makes the filesystem allocate as it goes, measured 1.2–7× slower."""
        self._open()
        try:
            allocate(self.fd, position, nbytes)  # not on every platform: then the writes allocate
        except OSError:  # a filesystem without fallocate: the writes allocate instead
            pass

    def _open(self) -> None:
        if self.fd is None:
            self.fd = open_fd(self.path, os.O_WRONLY)

    def write(self, data: np.ndarray, position: int) -> None:
        """Write all of ``data`` at byte ``position`` (a single ``pwrite`` may be partial)."""
        self._open()
        write_full(self.fd, memoryview(data).cast("B"), position)

    def __enter__(self) -> "_RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)


def build_store(checkpoints: Sequence[Checkpoint], layout: Layout, infos: Sequence[CheckpointInfo], path: Path,
                fingerprint_: str, ema: bool = False, advance: Advance = lambda n: None) -> TrajectoryStore:
    """Stack the checkpoints into a new store at ``path``, one tensor at a time (bounded memory).

    Each tensor is read, ``SPAN`` elements at a time, into one reused buffer (a safetensors
    float32 tensor straight from the file, no memory map), checked for NaN/Inf, compared in place
    with the first checkpoint's values (``varies``) and written with one ``pwrite`` into the
    preallocated ``W``, in the store's dtype (``stored_dtype``: a 16-bit run stays 16-bit, its
    elements read, checked and compared as they are, never widened, where the reader can give
    them: ``read_stored``), each checkpoint's spans read ahead by a thread of its own
    (``_read_ahead``): the buffers are about 30 bytes a value of one span (the reading thread's
    three sets and the comparison's), however large the tensor (GPT-2's embedding is a third of
    the model), and the ``varies`` flags are written into the store as they are found
    (through a map of the file), not held in memory. Carried tensors are gathered in memory and
    written once each. Written to a temporary file beside ``path`` and renamed into place only when
    complete.
    """
    path = Path(path)
    T, N = len(checkpoints), layout.n_parameters
    tmp = temporary_sibling(path)
    modelled = layout.modelled
    largest = min(SPAN, max(spec.size for spec in modelled))
    differs = np.empty(largest, dtype=bool)
    dtype = stored_dtype(layout)
    h5type, element = STORED_TYPES[dtype]
    bits = np.empty(largest, dtype=np.uint16) if dtype != "float32" else None  # the comparisons' scratch
    buffers = [_SpanBuffers(largest, dtype, layout) for _ in range(READ_AHEAD + 1)]
    carried = {spec.name: np.empty((T, spec.nbytes), dtype=np.uint8) for spec in layout.carried}
    moving = np.zeros(len(modelled), dtype=bool)      # every parameter of the tensor already varies
    varies = None  # the store's own flags, mapped (page cache, not a byte a parameter of this process)
    first = None  # the first checkpoint's row, read back through a read-only map of the store
    try:
        with h5py.File(tmp, "w") as f, _RowWriter(tmp) as rows:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            size = element.itemsize
            check_space(tmp, size * T * N + T * sum(spec.nbytes for spec in layout.carried) + 2**16, path)
            h5py.h5d.create(f.id, b"W", h5type, h5py.h5s.create_simple((T, N)), dcpl=dcpl)
            offset = f["W"].id.get_offset()
            rows.reserve(offset, size * T * N)
            h5py.h5d.create(f.id, b"varies", h5py.h5t.py_create(np.dtype(bool)), h5py.h5s.create_simple((N,)),
                            dcpl=dcpl)
            flags = f["varies"].id.get_offset()
            zeros = np.zeros(min(SPAN, N), dtype=bool)
            for lo in range(0, N, SPAN):  # written, so that the map below lies inside the file
                rows.write(zeros[:min(SPAN, N - lo)], flags + lo)
            varies = (np.memmap(tmp, dtype=np.bool_, mode="r+", offset=flags, shape=(N,)) if N else
                      np.zeros(0, dtype=bool))
            attachments = f.create_group("attachments")
            for t, c in enumerate(checkpoints):
                with c.open(ema) as reader:
                    check_unreplaced(c.path, reader.signature, layout)
                    for digest, data in reader.attachments.items():
                        if digest not in attachments:
                            attachments.create_dataset(digest, data=np.frombuffer(data, dtype=np.uint8))
                    compare = ~moving if t > 0 else np.zeros(len(modelled), dtype=bool)  # once moved, always varies
                    all_moved = np.ones(len(modelled), dtype=bool)
                    spans = [(j, spec, lo, min(SPAN, spec.size - lo))
                             for j, spec in enumerate(modelled) for lo in range(0, spec.size, SPAN)]

                    def read(job: tuple, into: _SpanBuffers, reader=reader, path=c.path) -> np.ndarray:
                        _, spec, lo, n = job
                        return into.read(reader, path, spec, lo, n)

                    for (j, spec, lo, n), stored in _read_ahead(read, spans, buffers):
                        rows.write(stored, offset + size * (t * N + spec.offset + lo))
                        if compare[j]:
                            columns = slice(spec.offset + lo, spec.offset + lo + n)
                            differs_from(stored, first[columns], dtype, differs[:n], bits)
                            np.logical_or(varies[columns], differs[:n], out=varies[columns])
                            all_moved[j] = all_moved[j] and bool(differs[:n].all())
                            if lo + n == spec.size:  # the tensor's last span
                                moving[j] = all_moved[j]
                    for name, raw in carried.items():
                        reader.raw_bytes(name, raw[t])
                if t == 0:
                    first = np.memmap(tmp, dtype=element, mode="r", offset=offset, shape=(N,))
                advance(1)
            if N:
                varies.flush()
            first = varies = None
            group = f.create_group("carried")
            for spec in layout.carried:
                group.create_dataset(spec.key, data=carried[spec.name])
            f.create_dataset("time", data=np.array([c.time for c in checkpoints], dtype=np.int64))
            f.create_dataset("names", data=[c.name for c in checkpoints], dtype=h5py.string_dtype())
            f.create_dataset("infos", data=[i.to_json() for i in infos], dtype=h5py.string_dtype())
            write_text(f, "layout", layout.to_json())
            f.attrs.update(kind=STORE_KIND, version=STORE_VERSION, fingerprint=fingerprint_, complete=True,
                           W_dtype=dtype)
        store = open_store(tmp)  # opened before the rename: this store, whatever replaces it at ``path`` later
        try:
            os.replace(tmp, path)
        except PermissionError:  # Windows renames no open file; there, none can replace it while it is open
            store.handle.close()
            del store  # and its maps of the file
            os.replace(tmp, path)
            store = open_store(path)
        store.path = path
    finally:
        first = varies = None  # no map left on the file (Windows removes no mapped file)
        tmp.unlink(missing_ok=True)
    return store
