"""A Linux Python made to look like one without the Linux-only calls (macOS, Windows), for
tests/test_portable.py: put this folder first on PYTHONPATH and Python imports it at start.

- deletes from ``os`` the calls and flags macOS or Windows lack: ``posix_fallocate`` (macOS has
  none), ``pread``/``pwrite``/``preadv``/... (Windows has none), ``O_NOFOLLOW``, ``O_NONBLOCK``, ...;
- makes ``import fcntl`` (and the other POSIX-only modules) fail as on Windows;
- provides ``msvcrt.locking`` as Windows has it: a lock on ``nbytes`` bytes from the descriptor's
  position, ``LK_NBLCK`` failing with ``EACCES`` when another process holds them. It is built on
  the real ``fcntl.lockf`` taken before the import is blocked (record locks: between processes).
  Only cmdtool's modules can import it: the standard library takes an importable ``msvcrt`` for
  Windows (``subprocess`` would then import ``_winapi``), so those that probe for it are imported
  first, while it is absent.

With ``CMDTOOL_SIMULATED_WINDOWS`` set, also as on Windows: a file open or memory-mapped (here: by
this process) cannot be renamed, replaced or removed. With ``CMDTOOL_SIMULATED_LOG`` set, every
``msvcrt.locking`` call and every refused rename appends a line to that file.
"""

from __future__ import annotations

import errno
import fcntl as _fcntl
import getpass  # noqa: F401 - probe for msvcrt at import: imported while it is absent
import importlib.machinery
import os
import subprocess  # noqa: F401
import sys
import types

REMOVED = ("posix_fallocate", "posix_fadvise", "pread", "pwrite", "preadv", "pwritev", "readv", "writev",
           "sched_getaffinity", "O_NOFOLLOW", "O_NONBLOCK", "O_DIRECTORY", "O_NOATIME", "O_DIRECT", "O_PATH",
           "O_TMPFILE", "O_CLOEXEC")
BLOCKED = ("fcntl", "termios", "resource")

for _name in REMOVED:
    if hasattr(os, _name):
        delattr(os, _name)
for _name in BLOCKED:
    sys.modules.pop(_name, None)


def _importer() -> str:
    """The name of the module whose ``import`` statement is being run."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("importlib"):
        frame = frame.f_back
    return "" if frame is None else frame.f_globals.get("__name__", "")


class _Platform:
    """A meta-path finder: the POSIX-only modules are missing; ``msvcrt`` is this file's, for cmdtool."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in BLOCKED or name == "msvcrt" and not _importer().startswith("cmdtool"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        if name == "msvcrt":
            return importlib.machinery.ModuleSpec("msvcrt", _Platform)
        return None

    @staticmethod
    def create_module(spec):
        return msvcrt

    @staticmethod
    def exec_module(module):
        pass


def _log(line: str) -> None:
    if os.environ.get("CMDTOOL_SIMULATED_LOG"):
        with open(os.environ["CMDTOOL_SIMULATED_LOG"], "a") as f:
            f.write(line + "\n")


msvcrt = types.ModuleType("msvcrt")
msvcrt.LK_UNLCK, msvcrt.LK_LOCK, msvcrt.LK_NBLCK, msvcrt.LK_RLCK, msvcrt.LK_NBRLCK = 0, 1, 2, 3, 4


def _locking(fd: int, mode: int, nbytes: int) -> None:
    position = os.lseek(fd, 0, os.SEEK_CUR)
    _log(f"locking {mode} {nbytes} at {position}")
    if mode == msvcrt.LK_UNLCK:
        _fcntl.lockf(fd, _fcntl.LOCK_UN, nbytes, position)
        return
    blocking = mode in (msvcrt.LK_LOCK, msvcrt.LK_RLCK)
    try:
        _fcntl.lockf(fd, _fcntl.LOCK_EX | (0 if blocking else _fcntl.LOCK_NB), nbytes, position)
    except OSError:
        raise OSError(errno.EACCES, "Permission denied") from None


msvcrt.locking = _locking
sys.meta_path.insert(0, _Platform())


# Windows: a file open or memory-mapped (by this process) cannot be renamed, replaced or removed
# (Python, HDF5 and numpy open files without FILE_SHARE_DELETE).
def _in_use() -> set[str]:
    used = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            used.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    with open("/proc/self/maps") as maps:
        used.update(line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6)
    return used


def _refuse_in_use(call):
    def checked(*paths, **kwargs):
        used = _in_use()
        for path in paths[:2]:
            if isinstance(path, (str, os.PathLike)) and os.path.realpath(path) in used:
                _log(f"refused {call.__name__} of open {os.path.basename(path)}")
                raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                          "process (simulated Windows)", os.fspath(path))
        return call(*paths, **kwargs)
    return checked


if os.environ.get("CMDTOOL_SIMULATED_WINDOWS"):
    os.replace, os.rename, os.unlink, os.remove = (_refuse_in_use(c) for c in (os.replace, os.rename, os.unlink,
                                                                               os.remove))
