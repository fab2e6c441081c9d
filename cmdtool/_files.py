"""Writing outputs safely: every output goes to a temporary name beside its target and is renamed
into place only when complete, so that a reader, a kill or a failure never leaves a partial file."""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import shutil
import socket
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ._portable import open_fd
from .errors import CmdError

LOCK_WAIT_S = 60.0  # how long a second writer of the same mode file waits for the first


def cache_folder() -> Path:
    """cmdtool's cache: ``$CMDTOOL_CACHE``, else ``$XDG_CACHE_HOME/cmdtool``, else ``~/.cache/cmdtool``
    (trajectory stores)."""
    if os.environ.get("CMDTOOL_CACHE"):
        return Path(os.environ["CMDTOOL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cmdtool"


STALE_AFTER_S = 24 * 3600  # a temporary of another machine (shared filesystem) is stale when untouched this long
_NAME_BUDGET = 200  # bytes of NAME in a temporary name: the rest of NAME_MAX (255) is for the suffix


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """``.NAME.HOST.PID.TAG`` beside ``path``: hidden, unique to this process of this machine, same
    filesystem; NAME shortened (``_stem``) so that the whole stays within 255 bytes. Those of
    ``path`` that a killed run left (``remove_stale``) are removed first."""
    path = Path(path)
    remove_stale(path)
    return path.with_name(f".{_stem(path.name)}.{_host()}.{os.getpid()}.{tag}")


def _stem(name: str) -> str:
    """``name``, or when longer than ``_NAME_BUDGET`` bytes its start and ``~`` and 12 hex digits of
    its SHA-256 (one name, one stem: ``remove_stale`` finds them again)."""
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) <= _NAME_BUDGET:
        return name
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    start = encoded[:_NAME_BUDGET - 13].decode("utf-8", "ignore")  # cut on a character boundary
    return f"{start}~{digest}"


def _host() -> str:
    """This machine's name as letters, digits and dashes (at most 32): temporaries on a shared
    filesystem say whose they are."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def remove_stale(path: Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` (``.NAME.HOST.PID.tmp`` / ``.old``, files or folders)
    left by a run that was killed (SIGKILL, a power cut): of this machine when their process is
    gone; of another machine (a filesystem shared by Dask workers, where its process cannot be
    asked about) only when untouched for ``STALE_AFTER_S``. Only these names, never one of a live
    process of this machine (or of this one). Names without HOST (older cmdtool) count as another
    machine's."""
    removed = []
    stem = _stem(path.name)
    try:
        candidates = list(path.parent.glob(f".{glob.escape(stem)}.*"))
    except OSError:
        return removed
    host, now = _host(), time.time()
    for candidate in candidates:
        match = re.fullmatch(rf"\.{re.escape(stem)}\.(?:([A-Za-z0-9-]{{1,32}})\.)?([0-9]{{1,10}})\.(tmp|old)",
                             candidate.name)
        if match is None:
            continue
        if match.group(1) == host:
            pid = int(match.group(2))
            if pid == os.getpid() or _alive(pid):
                continue
        else:
            try:
                if now - candidate.lstat().st_mtime < STALE_AFTER_S:
                    continue
            except OSError:
                continue
        try:
            remove_path(candidate)
            removed.append(candidate)
        except OSError:
            pass  # another run removed it first, or it is not ours to remove
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` may still run (its files are then left alone). POSIX: signal 0
    asks without sending anything. Windows has no such signal (``os.kill`` there ends the process,
    or sends Ctrl-C for 0): psutil asks when it is installed, else every process counts as alive."""
    if os.name == "nt":
        try:
            import psutil
        except ImportError:
            return True
        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid we can ask about: leave its files
    return True


def replace_path(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` (a file or folder) to ``target``, moving an existing folder out of the way."""
    if target.is_dir():
        old = temporary_sibling(target, "old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        if tmp.is_dir() and target.exists():  # a folder replaces a file: rename cannot do that
            target.unlink()
        os.replace(tmp, target)


def remove_path(path: Path) -> None:
    """Remove a file or folder if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", *(f"{port}{i}" for port in ("COM", "LPT")
                                                                      for i in range(10))}


def plain_name(name: Any, what: str) -> str:
    """A name that becomes one path component under the output folder: a non-empty string without
    separators or NUL, not ``.`` or ``..``, at most 255 bytes. On Windows also without ``\\`` or
    ``:`` (a drive, a stream), not a device name (``CON``, ``NUL.txt``, ...) and not ending in a dot
    or a space (Windows drops them, so the name would lead elsewhere)."""
    separators = {"/", "\0", os.sep, os.altsep or "/"}
    windows = os.name == "nt"
    if (not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in separators)
            or len(name.encode("utf-8", "surrogatepass")) > 255
            or windows and (":" in name or name[-1] in ". "
                            or name.split(".")[0].rstrip(" ").upper() in WINDOWS_DEVICES)):
        raise ValueError(f"{what} {str(name)[:80]!r} is not a plain file name")
    return name


class _Locks:
    """The platform's advisory lock on a whole file, chosen at run time: ``fcntl.flock`` (POSIX),
    else ``msvcrt.locking`` of its first byte (Windows, where an open file cannot be removed:
    the lock file is removed after the lock is let go, when no other process has it open)."""

    def __init__(self):
        fcntl = msvcrt = None
        try:
            import fcntl
        except ImportError:
            try:
                import msvcrt
            except ImportError:
                pass
        if fcntl is None and msvcrt is None:
            raise CmdError("this platform has no file locks (neither fcntl nor msvcrt): cmd update and cmd watch "
                           "cannot keep a second writer of the mode file out")
        self.fcntl, self.msvcrt = fcntl, msvcrt
        self.remove_while_held = fcntl is not None

    def try_lock(self, fd: int) -> bool:
        """Lock ``fd`` without waiting; False when another holds it."""
        try:
            if self.fcntl is not None:
                self.fcntl.flock(fd, self.fcntl.LOCK_EX | self.fcntl.LOCK_NB)
            else:
                self.msvcrt.locking(fd, self.msvcrt.LK_NBLCK, 1)  # the byte at the position, 0: just opened
        except (BlockingIOError, PermissionError):
            return False
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN, getattr(errno, "EDEADLOCK", errno.EDEADLK)):
                return False
            raise
        return True

    def release(self, fd: int) -> None:
        """Let the lock go and close ``fd`` (closing alone lets a ``flock`` go)."""
        try:
            if self.fcntl is None:
                os.lseek(fd, 0, os.SEEK_SET)
                self.msvcrt.locking(fd, self.msvcrt.LK_UNLCK, 1)
        finally:
            os.close(fd)


@contextmanager
def exclusive(path: Path, wait: float | None = None) -> Iterator[None]:
    """Hold an advisory lock (``fcntl.flock``, or ``msvcrt.locking`` on Windows) on ``.NAME.lock``
    beside ``path`` for a read-modify-write of ``path`` (``cmd update``, ``cmd watch``): a second
    writer waits for the first, then reads what the first wrote, instead of both writing and one
    change being lost.

    The lock file is removed on release; a waiter that then holds the lock of a removed file sees
    that the name no longer leads to it and locks afresh (the usual lock-file protocol)."""
    path = Path(path)
    lock = path.with_name(f".{_stem(path.name)}.lock")
    wait = LOCK_WAIT_S if wait is None else wait
    deadline = time.monotonic() + wait
    locks = _Locks()
    while True:
        fd = open_fd(lock, os.O_RDWR | os.O_CREAT, 0o644)
        if not locks.try_lock(fd):
            os.close(fd)
            if time.monotonic() >= deadline:
                raise CmdError(f"{path}: another cmd update or cmd watch is writing it (waited {wait:g} s); "
                               f"try again when it has finished") from None
            time.sleep(0.05)
            continue
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        locks.release(fd)  # the holder before us removed this file: lock the new one
    try:
        yield
    finally:
        if locks.remove_while_held:
            lock.unlink(missing_ok=True)
            locks.release(fd)
        else:
            locks.release(fd)
            try:
                lock.unlink(missing_ok=True)
            except PermissionError:
                pass  # a waiter has it open (Windows): it locks it next


_SPECIAL = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_kind(path: Path) -> str | None:
    """What ``path`` (a link followed) is when it is not a regular file: ``"a FIFO (named pipe)"``,
    ``"a character device"`` (``/dev/zero``), ...; None for a regular file. Asked with ``stat``,
    which never blocks, before anything opens it: opening a FIFO waits for a writer forever, and a
    device reads without end."""
    mode = os.stat(path).st_mode
    return None if stat.S_ISREG(mode) else next((kind for test, kind in _SPECIAL if test(mode)), "not a regular file")


def require_regular(path: Path, expected: str) -> None:
    """Refuse ``path`` unless it is an existing regular file (a link to one is fine): one line
    naming it, such as ``x: is a FIFO (named pipe), expected a mode file``."""
    try:
        kind = special_kind(path)
    except FileNotFoundError:
        raise CmdError(f"{path}: no such file") from None
    if kind is not None:
        raise CmdError(f"{path}: is {kind}, expected {expected}")
