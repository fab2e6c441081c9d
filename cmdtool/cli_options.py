"""Options shared by several ``cmd`` commands: the check that a float option is finite, and the
Dask engine of ``--workers/--scheduler`` with its help texts."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import typer


def finite(value: float | None) -> float | None:
    """A float option must be a number: ``inf`` and ``nan`` are refused."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


WORKERS_HELP = "Run on a Dask cluster of N worker processes on this machine (needs pip install 'cmd-modes[dask]')."
SCHEDULER_HELP = ("Run on an existing Dask cluster (e.g. tcp://host:8786); its workers must see the checkpoint "
                  "folder and the trajectory store path.")


def engine_for_options(workers: Optional[int], scheduler: Optional[str]):
    """A Dask engine for --workers / --scheduler, else nothing (Dask is imported only then)."""
    if workers is None and scheduler is None:
        return nullcontext(None)
    from .distributed import engine_for
    return engine_for(workers, scheduler)
