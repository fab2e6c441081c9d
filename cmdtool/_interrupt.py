"""Ctrl-C while the command line is still importing (numpy, h5py, torch take a second or more):
one line and exit 130, not a traceback. Only the command line's entry (``cmdtool.__main__.main``)
calls ``quiet_while_importing``; library use (a notebook importing cmdtool) is untouched."""

from __future__ import annotations

import os
import signal


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
