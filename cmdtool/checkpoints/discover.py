"""Finding the checkpoints in a folder and putting them in training order."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CmdError
from .formats import sniff_format

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pth.tar")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    format: str  # "safetensors" | "torch"
    time: int    # the step or epoch number from the file name; the position when names have none

    @property
    def name(self) -> str:
        return self.path.name


def natural_key(name: str) -> list:
    """Sort key that orders ``epoch_2`` before ``epoch_10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", name) if part]


def _stem(name: str) -> str:
    for suffix in CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def discover(folder: Path) -> list[Checkpoint]:
    """All checkpoint files directly in ``folder``, in training order.

    Order: natural sort of the file names. Time: the last number in each name (``epoch_12`` -> 12)
    when every name has one and they differ, else the position.
    """
    folder = Path(folder)
    if not folder.exists():
        raise CmdError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CmdError(f"{folder}: is a file, expected a folder of checkpoints")
    paths = sorted((p for p in folder.iterdir()
                    if p.is_file() and p.name.endswith(CHECKPOINT_SUFFIXES) and not p.name.startswith(".")),
                   key=lambda p: natural_key(p.name))
    if not paths:
        raise CmdError(f"{folder}: no checkpoint files found "
                       f"(looked for {', '.join('*' + s for s in CHECKPOINT_SUFFIXES)})")
    checkpoints = []
    for path in paths:
        if path.stat().st_size == 0:
            raise CmdError(f"{path}: empty file: not a safetensors or torch checkpoint (truncated or corrupt)")
        fmt = sniff_format(path)
        if fmt is None:
            raise CmdError(f"{path}: not a safetensors or torch checkpoint (empty, truncated or corrupt)")
        checkpoints.append((path, fmt))
    numbers = [re.findall(r"\d+", _stem(p.name)) for p, _ in checkpoints]
    times = [int(n[-1]) if n else None for n in numbers]
    if None in times or len(set(times)) != len(times):
        times = list(range(len(checkpoints)))
    return [Checkpoint(path, fmt, time) for (path, fmt), time in zip(checkpoints, times)]
