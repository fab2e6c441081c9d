"""File and process calls that not every platform has, each with a fallback chosen at run time.

``os.pread``, ``os.preadv`` and ``os.pwrite`` exist on POSIX systems only; ``os.posix_fallocate``
and ``os.sched_getaffinity`` on Linux and some BSDs, not on macOS or Windows; ``os.open`` opens in
text mode on Windows unless given ``O_BINARY``. Where a call is missing, the fallback does the same
job another way: a seek and a read or write under a lock (so threads of this process sharing a
descriptor do not move each other's position), a free-space check and ``ftruncate`` instead of
reserving blocks, every CPU of the machine instead of the process's affinity mask.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import threading
from pathlib import Path

_SEEK = threading.Lock()  # the fallbacks' seek + read/write pairs, one at a time


def open_fd(path: str | Path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` in binary mode on every platform (Windows needs ``O_BINARY``)."""
    return os.open(path, flags | getattr(os, "O_BINARY", 0), mode)


def positioned_reads() -> bool:
    """Whether this platform reads at an offset without moving the descriptor's position."""
    return hasattr(os, "preadv") or hasattr(os, "pread")


def read_at(fd: int, view: memoryview, position: int) -> int:
    """Read up to ``len(view)`` bytes at byte ``position`` of ``fd`` into ``view`` (bytes); the
    count read, 0 at the end of the file. ``preadv`` straight into ``view``, else ``pread`` and a
    copy, else a seek and ``readinto`` under a lock."""
    preadv = getattr(os, "preadv", None)
    if preadv is not None:
        return preadv(fd, [view], position)
    pread = getattr(os, "pread", None)
    if pread is not None:
        data = pread(fd, len(view), position)
        view[:len(data)] = data
        return len(data)
    with _SEEK, io.FileIO(fd, "r", closefd=False) as f:
        f.seek(position)
        return f.readinto(view) or 0


def read_full(fd: int, view: memoryview, position: int) -> int:
    """Fill ``view`` from byte ``position`` on (a single read may return less); the count read,
    short only at the end of the file."""
    total = 0
    while total < len(view):
        n = read_at(fd, view[total:], position + total)
        if n == 0:
            break
        total += n
    return total


def write_full(fd: int, view: memoryview, position: int) -> None:
    """Write all of ``view`` (bytes) at byte ``position`` of ``fd``: ``pwrite``, else a seek and
    writes under a lock (a single write may be partial)."""
    pwrite = getattr(os, "pwrite", None)
    if pwrite is not None:
        while view:
            n = pwrite(fd, view, position)
            view, position = view[n:], position + n
        return
    with _SEEK, io.FileIO(fd, "w", closefd=False) as f:
        f.seek(position)
        while view:
            view = view[f.write(view):]


def allocate(fd: int, offset: int, nbytes: int) -> bool:
    """Reserve the blocks of bytes ``offset .. offset + nbytes`` of ``fd`` (``posix_fallocate``);
    False where the platform has no such call. ``OSError`` as ``posix_fallocate`` raises it."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return False
    fallocate(fd, offset, nbytes)
    return True


def reserve(fd: int, nbytes: int, folder: str | Path) -> None:
    """Make sure the file of ``fd`` (in ``folder``) can grow to ``nbytes``: its blocks allocated
    (``allocate``), or where the platform cannot, the free space of ``folder`` checked and the file
    extended to ``nbytes`` (``ftruncate``: a file-size limit fails here; a quota only when written).
    ``OSError`` (``ENOSPC``, ``EFBIG``, ...) when it cannot."""
    if allocate(fd, 0, nbytes):
        return
    size = os.fstat(fd).st_size
    if nbytes > size:
        if nbytes - size > shutil.disk_usage(folder).free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.ftruncate(fd, nbytes)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the platform has one (``taskset``,
    a container's cpuset), else every CPU of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
