"""Small HDF5 helpers shared by the trajectory store and the mode file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import h5py
import numpy as np

from ._portable import open_fd, positioned_reads, read_at, reserve
from .errors import CmdError
from .units import human_bytes


def write_text(group: h5py.Group, name: str, text: str) -> None:
    """A scalar string dataset: unlike an attribute, no 64 KiB limit (large layouts)."""
    group.create_dataset(name, data=text, dtype=h5py.string_dtype())


def read_text(group: h5py.Group, name: str) -> str:
    value = group[name][()]
    return value.decode() if isinstance(value, bytes) else str(value)


def read_strings(group: h5py.Group, name: str) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in group[name][()]]


def check_space(path: Path, nbytes: int, shown: Path) -> None:
    """Make sure the file being written at ``path`` (still small: call it before HDF5 allocates
    anything) can grow to ``nbytes``: reserve that much (``_portable.reserve``: ``posix_fallocate``,
    else a free-space check and ``ftruncate``), then give it back. A full disk (or quota, or
    file-size limit) fails here with one message naming ``shown``, not inside HDF5, where a failed
    write leaves a file that cannot even be closed (h5py retries the flush at every close, and the
    first error is lost)."""
    fd = open_fd(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        reserve(fd, max(int(nbytes), 1), Path(path).parent)
        os.ftruncate(fd, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: write and see
            return
        raise CmdError(f"{shown}: cannot write: {e.strerror} (needs about {human_bytes(nbytes)})") from None
    finally:
        os.close(fd)


class SliceReader:
    """``reader(start, stop)``: the values ``start:stop`` of some 1-D datasets of ``handle``, each
    read into a buffer of ``width`` reused from call to call (a result is valid until the next
    call), in native byte order. With ``pread`` at the datasets' offsets when they are stored
    contiguously (so uncompressed) and natively, through the descriptor h5py reads (the file
    opened, even if its path was replaced since; a third of the time of h5py's slice reads on the
    benchmark's mode file); else, and where the platform has no ``pread`` (Windows: a seek would
    move the position HDF5 keeps for that descriptor), through h5py's ``read_direct``. ``below``: every value of the
    first dataset must be smaller (a mode file's labels), else the file is corrupt."""

    def __init__(self, handle: h5py.File, names: tuple[str, ...], width: int, below: int | None = None):
        self.datasets = [handle[name] for name in names]
        self.buffers = [np.empty(min(width, d.shape[0]), dtype=d.dtype.newbyteorder("=")) for d in self.datasets]
        self.offsets = [d.id.get_offset() if d.dtype.isnative and d.chunks is None and not d.external else None
                        for d in self.datasets]
        direct = handle.driver == "sec2" and None not in self.offsets and positioned_reads()
        self.fd = handle.id.get_vfd_handle() if direct else None
        self.path, self.below = handle.filename, below

    def __call__(self, start: int, stop: int) -> list[np.ndarray]:
        n = max(0, stop - start)
        out = [buffer[:n] for buffer in self.buffers]
        for dataset, offset, values in zip(self.datasets, self.offsets, out):
            if self.fd is None:
                dataset.read_direct(values, source_sel=np.s_[start:stop], dest_sel=np.s_[:n])
                continue
            view, position = memoryview(values).cast("B"), offset + start * values.itemsize
            while view:
                got = read_at(self.fd, view, position)
                if got == 0:
                    raise CmdError(f"{self.path}: the file changed while it was read (truncated)")
                view, position = view[got:], position + got
        if self.below is not None and n and int(out[0].max()) >= self.below:
            raise CmdError(f"{self.path}: corrupt mode file (label out of range)")
        return out


def check_links(handle: h5py.File) -> None:
    """Every object of ``handle`` lies in the file itself: no soft or external link (a link's target
    is not covered by the size checks, and an external one opens any file, a FIFO included), no
    virtual dataset and no dataset with external raw storage (both read other files). Links are
    inspected without being followed. Raises ``ValueError`` naming the first offender."""
    groups = [("", handle)]
    handle.visititems(lambda name, obj: groups.append((name + "/", obj)) if isinstance(obj, h5py.Group) else None)
    for prefix, group in groups:  # visititems reaches every object by hard links only, each once
        for name in group:
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.SoftLink):
                raise ValueError(f"{prefix + name!r} is a soft link (to {link.path[:80]!r})")
            if isinstance(link, h5py.ExternalLink):
                raise ValueError(f"{prefix + name!r} is an external link (to {link.filename[:80]!r})")
            if not isinstance(link, h5py.HardLink):
                raise ValueError(f"{prefix + name!r} is a link of an unknown kind")
            obj = group[name]
            if isinstance(obj, h5py.Dataset) and (obj.is_virtual or obj.external):
                raise ValueError(f"dataset {prefix + name!r} reads other files "
                                 f"({'a virtual dataset' if obj.is_virtual else 'external storage'})")
