"""Small HDF5 helpers shared by the trajectory store and the mode file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import h5py

from .errors import CmdError


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
    anything) can grow to ``nbytes``: ``posix_fallocate`` that much, then give it back. A full disk
    (or quota, or file-size limit) fails here with one message naming ``shown``, not inside HDF5,
    where a failed write leaves a file that cannot even be closed (h5py retries the flush at every
    close, and the first error is lost)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        os.posix_fallocate(fd, 0, max(int(nbytes), 1))
        os.ftruncate(fd, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: write and see
            return
        raise CmdError(f"{shown}: cannot write: {e.strerror} (needs about {_size(nbytes)})") from None
    finally:
        os.close(fd)


def _size(nbytes: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return ""
