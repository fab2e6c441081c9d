"""Which trajectory a report measures: the store the fit kept, another store, or one built from
the checkpoint folder; and the check that it holds the checkpoints the mode file was fitted on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoints import discover
from ..errors import CmdError
from ..modefile import ModeFile
from ..modes import NO_TRAJECTORY_WRITERS
from ..progress import Progress
from ..stores import open_trajectory_store, prepare_store
from ..trajectory import TrajectoryStore


def open_trajectory(modes: ModeFile, checkpoints, trajectory, progress: Progress) -> tuple[TrajectoryStore, dict]:
    settings = modes.settings
    if checkpoints is not None:
        start, stop, every = settings.start, settings.stop, settings.every
        if modes.warmup is not None:  # updates append checkpoints beyond the fit's selection
            start, stop, every = _online_selection(modes, Path(checkpoints))
        prepared = prepare_store(
            Path(checkpoints), start=start, stop=stop, every=every, include=settings.include,
            exclude=settings.exclude, ema=settings.ema, trajectory=trajectory, progress=progress,
            tensor_order=[spec.name for spec in modes.layout.tensors])
        store = prepared.store
        source = {"kind": "checkpoints", "checkpoints": str(Path(checkpoints).resolve()),
                  "trajectory": str(prepared.path), "trajectory_reused": prepared.reused}
    else:
        if trajectory is None and settings.source in NO_TRAJECTORY_WRITERS:
            writer = NO_TRAJECTORY_WRITERS[settings.source]
            raise CmdError(f"{modes.path}: written by {writer}, which keeps no trajectory; pass --checkpoints DIR "
                           f"with the checkpoints it observed, saved under the names it was given")
        path = Path(trajectory or settings.trajectory)
        if not path.exists():
            raise CmdError(f"{path}: the trajectory store this mode file was fitted from is gone "
                           f"(it is a cache); pass --checkpoints DIR to read the checkpoints again")
        store = open_trajectory_store(path)
        source = {"kind": "trajectory store", "checkpoints": settings.source, "trajectory": str(path),
                  "trajectory_reused": True}
    if (store.names != modes.names or not np.array_equal(store.time, modes.time)
            or store.layout.to_json() != modes.layout.to_json()):
        hint = ("" if checkpoints is not None else
                "; pass --checkpoints with the folder of the checkpoints it was fitted on")
        raise CmdError(f"{source['trajectory']}: does not hold the checkpoints this mode file was fitted on "
                       f"(checkpoint names, times or tensors differ){hint}")
    fitted_on = modes.settings.trajectory_fingerprint
    if checkpoints is None and fitted_on and store.fingerprint != fitted_on:
        raise CmdError(f"{source['trajectory']}: this trajectory store was rebuilt after {modes.path} was fitted "
                       f"(its checkpoints changed, or another selection was fitted); pass --checkpoints DIR "
                       f"with the checkpoints the mode file was fitted on")
    return store, source


def _online_selection(modes: ModeFile, folder: Path) -> tuple[int, int, int]:
    """``start, stop, every`` of the folder's checkpoints that an online mode file holds."""
    names = [c.name for c in discover(folder).checkpoints]
    positions = [names.index(n) if n in names else -1 for n in modes.names]
    steps = set(np.diff(positions).tolist())
    if -1 in positions or len(steps) != 1 or steps.pop() < 1:
        missing = [n for n, p in zip(modes.names, positions) if p < 0]
        raise CmdError(f"{folder}: does not hold the checkpoints of {modes.path} as one evenly spaced slice"
                       + (f" (missing {missing[0]})" if missing else ""))
    return positions[0], positions[-1] + 1, positions[1] - positions[0]
