"""The sharded trajectory store: the ``(T, N)`` trajectory split into column shards, one HDF5 file
each, plus a small index file, in one folder that every Dask worker sees.

``FOLDER/index.h5`` holds what a single-file store holds besides ``W`` (layout, time, names, write-back
infos, carried tensors, attachments, the fingerprint) and the shard bounds; ``FOLDER/shard-00000.h5``
… hold ``W[:, lo:hi]`` as a contiguous ``(T, hi − lo)`` dataset in the single-file store's dtype
(``trajectory.stored_dtype``; memory-mapped, read as float32) and that shard's ``varies`` flags.
Each shard file is written by one task, which reads its column range from every checkpoint
(``read_columns``: for plain safetensors files only those bytes), so ingest runs in parallel over
shards with no two writers on one file. The folder is built under a temporary name and renamed
into place when complete. ``ShardedStore`` is a ``Trajectory``: the fit and the report read it as
they read a single-file store. Knows nothing about CMD or Dask.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import h5py
import numpy as np

from ._files import replace_path, require_regular, temporary_sibling
from ._hdf5 import check_links, read_strings, read_text, write_text
from ._portable import open_fd, write_full
from .checkpoints.schema import CheckpointInfo
from .errors import CmdError
from .layout import Layout
from .trajectory import (
    STORED_TYPES,
    EncodedRows,
    TrajectoryStore,
    check_unreplaced,
    column_block,
    encode,
    read_columns,
    stored_dtype,
)

if TYPE_CHECKING:
    from .checkpoints.discover import Checkpoint

SHARDS_KIND = "cmdtool-trajectory-shards"
SHARDS_VERSION = 1
INDEX = "index.h5"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.h5"


def shard_bounds(N: int, shard_columns: int) -> np.ndarray:
    """``(S + 1,)`` column bounds of shards of ``shard_columns`` columns (the last one shorter)."""
    return np.array(sorted({*range(0, N, max(1, shard_columns)), N}), dtype=np.int64)


class ColumnReader:
    """Column ranges of one checkpoint's modelled parameters, flat float32, read as the single-process
    ingest reads (``CheckpointReader.read_float32``): from a safetensors file only those elements'
    bytes, with ``pread`` at the validated header's offsets and no memory map, so a file truncated or
    rewritten while it is read is a ``CmdError`` naming it (a mapped file would kill the worker with
    SIGBUS); a torch file is read tensor by tensor and cut. Values are bit for bit those of the
    single-process ingest."""

    def __init__(self, checkpoint: Checkpoint, layout: Layout, ema: bool = False):
        self.checkpoint, self.layout, self.ema = checkpoint, layout, ema
        self.bytes_read = 0
        self._reader = checkpoint.open(ema)
        try:
            check_unreplaced(checkpoint.path, self._reader.signature, layout)
        except CmdError:
            self.close()
            raise

    def read(self, start: int, stop: int) -> np.ndarray:
        """Columns ``start:stop`` of the trajectory row of this checkpoint, finite-checked; the file
        is checked unchanged (size, modification time) after the read."""
        specs = self.layout.modelled
        out, nbytes = read_columns(self._reader, self.checkpoint.path, specs, [s.offset for s in specs], start, stop)
        self.bytes_read += nbytes
        self._reader.check_unchanged()
        return out

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = None


@dataclass(frozen=True)
class ShardJob:
    """One ingest task: columns ``start:stop`` of every checkpoint into ``folder/shard_name(index)``."""
    folder: str
    index: int
    start: int
    stop: int
    checkpoints: tuple[Checkpoint, ...]
    layout: Layout
    ema: bool = False


def write_shard(job: ShardJob) -> int:
    """Write one shard file (to a temporary name, then renamed); returns the checkpoint bytes read."""
    T, n = len(job.checkpoints), job.stop - job.start
    path = Path(job.folder) / shard_name(job.index)
    tmp = temporary_sibling(path)
    read = 0
    try:
        with h5py.File(tmp, "w") as f:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            dtype = stored_dtype(job.layout)  # as the single-file store: a 16-bit run stays 16-bit
            h5type, element = STORED_TYPES[dtype]
            h5py.h5d.create(f.id, b"W", h5type, h5py.h5s.create_simple((T, max(n, 1))), dcpl=dcpl)
            encoded = np.empty(n, dtype=element)
            offset = f["W"].id.get_offset()
            varies, first = np.zeros(n, dtype=bool), None
            fd = open_fd(tmp, os.O_WRONLY)
            try:
                for t, checkpoint in enumerate(job.checkpoints):
                    reader = ColumnReader(checkpoint, job.layout, job.ema)
                    try:
                        row = reader.read(job.start, job.stop)
                    finally:
                        read += reader.bytes_read
                        reader.close()
                    if first is None:
                        first = row
                    else:
                        varies |= row != first
                    stored = encode(row, dtype, encoded)
                    write_full(fd, memoryview(stored).cast("B"), offset + element.itemsize * t * n)
            finally:
                os.close(fd)
            f.create_dataset("varies", data=varies)
            f.attrs.update(kind=SHARDS_KIND, start=job.start, stop=job.stop, complete=True, W_dtype=dtype)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return read


def build_sharded(checkpoints: Sequence[Checkpoint], layout: Layout, infos: Sequence[CheckpointInfo], path: Path,
                  fingerprint: str, ema: bool = False, shard_columns: int = 1 << 20,
                  map_shards: Callable[[Callable, list], Iterable] = map) -> ShardedStore:
    """Build the sharded store at ``path`` (a folder): one ``write_shard`` per shard through
    ``map_shards`` (the builtin ``map``, or Dask's through ``cmdtool.distributed``), then the index.
    Carried tensors and attachments are read here, one checkpoint at a time."""
    path = Path(path)
    N = layout.n_parameters
    bounds = shard_bounds(N, shard_columns)
    tmp = temporary_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        jobs = [ShardJob(str(tmp), i, int(lo), int(hi), tuple(checkpoints), layout, ema)
                for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]
        read = sum(map_shards(write_shard, jobs))
        with h5py.File(tmp / INDEX, "w") as f:
            carried, attachments = f.create_group("carried"), f.create_group("attachments")
            for spec in layout.carried:
                carried.create_dataset(spec.key, shape=(len(checkpoints), spec.nbytes), dtype="u1")
            for t, c in enumerate(checkpoints):
                with c.open(ema) as reader:
                    for digest, data in reader.attachments.items():
                        if digest not in attachments:
                            attachments.create_dataset(digest, data=np.frombuffer(data, dtype=np.uint8))
                    for spec in layout.carried:
                        carried[spec.key][t] = reader.raw_bytes(spec.name)
            f.create_dataset("bounds", data=bounds)
            f.create_dataset("time", data=np.array([c.time for c in checkpoints], dtype=np.int64))
            f.create_dataset("names", data=[c.name for c in checkpoints], dtype=h5py.string_dtype())
            f.create_dataset("infos", data=[i.to_json() for i in infos], dtype=h5py.string_dtype())
            write_text(f, "layout", layout.to_json())
            f.attrs.update(kind=SHARDS_KIND, version=SHARDS_VERSION, fingerprint=fingerprint, complete=True,
                           checkpoint_bytes_read=read)
        replace_path(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_sharded(path)


class ShardedRows:
    """``W`` of a sharded store as one read-only ``(T, N)`` array-like over the shards' memory maps:
    ``W[t]``, ``W[rows]``, ``W[rows, start:stop]`` and ``W[rows, sorted_index]`` read only the
    shards they touch."""

    def __init__(self, maps: list[np.memmap], bounds: np.ndarray):
        self.maps, self.bounds = maps, bounds
        self.shape = (maps[0].shape[0], int(bounds[-1]))
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __getitem__(self, key):
        rows, columns = key if isinstance(key, tuple) else (key, slice(None))
        if isinstance(columns, slice):
            start, stop, step = columns.indices(self.shape[1])
            if step != 1:
                raise IndexError("column slices of a sharded store take no step")
            pieces = [m[rows, max(start, lo) - lo:min(stop, hi) - lo]
                      for m, lo, hi in zip(self.maps, self.bounds[:-1], self.bounds[1:])
                      if max(start, lo) < min(stop, hi)]
        else:
            index = np.asarray(columns, dtype=np.int64)
            order = np.argsort(index, kind="stable")
            shard = np.searchsorted(self.bounds, index[order], side="right") - 1
            pieces = [self.maps[s][rows, index[order][shard == s] - self.bounds[s]] for s in np.unique(shard)]
            if not pieces:
                return np.asarray(self.maps[0][rows, :0])
            out = np.concatenate(pieces, axis=-1)
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            return out[..., inverse]
        if not pieces:
            return np.asarray(self.maps[0][rows, :0])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=-1)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:, :], dtype=dtype)

    def block(self, start: int, stop: int):
        """Columns ``start:stop`` for the fit (``trajectory.column_block``): within one shard, that
        shard's own block (an ``EncodedBlock`` of a 16-bit shard); across shards, widened now."""
        shard = int(np.searchsorted(self.bounds, start, side="right")) - 1
        lo, hi = int(self.bounds[shard]), int(self.bounds[shard + 1])
        if stop <= hi:
            return column_block(self.maps[shard], start - lo, stop - lo)
        return self[:, start:stop]


@dataclass
class ShardedStore(TrajectoryStore):
    """A sharded store (see the module docstring): ``path`` is its index file, ``folder`` the store."""
    folder: Path | None = None
    bounds: np.ndarray | None = None

    def shard_path(self, i: int) -> Path:
        return self.folder / shard_name(i)


def is_sharded(path: Path) -> bool:
    return (Path(path) / INDEX).is_file()


def sharded_fingerprint(path: Path) -> str | None:
    """The fingerprint of a complete sharded store at ``path``, or None if there is none."""
    try:
        with h5py.File(Path(path) / INDEX, "r") as f:
            if f.attrs.get("kind") == SHARDS_KIND and f.attrs.get("complete"):
                return str(f.attrs["fingerprint"])
    except OSError:
        pass
    return None


def open_sharded(path: Path) -> ShardedStore:
    """Open a complete sharded store read-only; raise CmdError if it is not one."""
    folder = Path(path)
    index = folder / INDEX
    try:
        require_regular(index, "a sharded store's index")
        with h5py.File(index, "r") as f:
            check_links(f)
            if f.attrs.get("kind") != SHARDS_KIND or not f.attrs.get("complete"):
                raise CmdError(f"{folder}: not a complete cmdtool sharded trajectory store")
            layout = Layout.from_json(read_text(f, "layout"))
            time, bounds = f["time"][()], f["bounds"][()].astype(np.int64)
            names = read_strings(f, "names")
            infos = [CheckpointInfo.from_json(s) for s in read_strings(f, "infos")]
            fingerprint = str(f.attrs.get("fingerprint", ""))
        maps, varies = [], []
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            require_regular(folder / shard_name(i), "a trajectory shard")
            with h5py.File(folder / shard_name(i), "r") as f:
                check_links(f)
                ds = f["W"]
                if not f.attrs.get("complete") or (f.attrs["start"], f.attrs["stop"]) != (lo, hi):
                    raise CmdError(f"{folder / shard_name(i)}: shard is incomplete or does not match the index")
                shape, offset = (len(names), int(hi - lo)), ds.id.get_offset()
                dtype = str(f.attrs.get("W_dtype", "float32"))
                if dtype not in STORED_TYPES or ds.dtype != STORED_TYPES[dtype][1]:
                    raise CmdError(f"{folder / shard_name(i)}: shard is inconsistent (W is {ds.dtype}, said {dtype})")
                varies.append(f["varies"][()].astype(bool))
            rows = np.memmap(folder / shard_name(i), dtype=STORED_TYPES[dtype][1], mode="r", offset=offset,
                             shape=shape)
            maps.append(rows if dtype == "float32" else EncodedRows(rows, dtype))
    except CmdError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise CmdError(f"{folder}: not a readable cmdtool sharded trajectory store ({e})") from None
    if bounds[-1] != layout.n_parameters:
        raise CmdError(f"{folder}: sharded trajectory store is inconsistent")
    return ShardedStore(layout, time, names, infos, np.concatenate(varies), ShardedRows(maps, bounds), path=index,
                        fingerprint=fingerprint, folder=folder, bounds=bounds)
