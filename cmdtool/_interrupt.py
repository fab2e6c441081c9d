"""Ctrl-C while the command line is still importing (numpy, h5py, torch take a second or more):
one line and exit 130, not a traceback. Only the command line's entry (``cmdtool.__main__.main``)
calls ``quiet_while_importing``; library use (a notebook importing cmdtool) is untouched. A command
that runs until Ctrl-C (``cmd watch``) holds it with ``remembered``, so that none is lost."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator


def _interrupted(signum, frame) -> None:
    os.write(2, b"interrupted: no output was written\n")
    os._exit(130)  # nothing has been written yet: there is nothing to clean up


def quiet_while_importing() -> None:
    """Until ``restore`` (called when the command starts), Ctrl-C ends the process quietly."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)


def restore() -> None:
    """Ctrl-C raises KeyboardInterrupt again: commands remove their temporary files and exit 130."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class Remembered:
    """Ctrl-C that a long-running command cannot lose (``remembered``): ``check()`` raises
    KeyboardInterrupt when one came since, ``sleep(seconds)`` waits between two checks."""

    def __init__(self) -> None:
        self.seen = False

    def handler(self, signum, frame) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt

    def sleep(self, seconds: float) -> None:
        self.check()
        time.sleep(seconds)
        self.check()


@contextmanager
def remembered() -> Iterator[Remembered]:
    """Within the block Ctrl-C raises KeyboardInterrupt as usual and is also remembered: Python ignores
    a KeyboardInterrupt raised inside a weakref callback or a ``__del__`` ("Exception ignored in ...",
    e.g. while h5py closes a file), so a loop that runs until Ctrl-C calls ``check()`` between its
    steps to raise it again. Outside the main thread (no signals arrive there) nothing is installed."""
    interrupts = Remembered()
    if threading.current_thread() is not threading.main_thread():
        yield interrupts
        return
    previous = signal.signal(signal.SIGINT, interrupts.handler)
    try:
        yield interrupts
    finally:
        signal.signal(signal.SIGINT, previous)
