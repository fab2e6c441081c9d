"""``cmd update``: absorb checkpoints that come after a mode file's last one (online CMD, paper §3.3)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .._files import exclusive
from ..checkpoints import Checkpoint, checkpoint_at, discover, name_number, natural_key, times_from_names
from ..errors import CmdError
from ..layout import check_same_tensors
from ..modefile import ModeFile, open_mode_file, summarize, write_mode_file
from ..progress import Progress, no_progress
from ..trajectory import open_store
from .state import OnlineState, read_checkpoint


def _gather(paths: Sequence[str | Path]) -> list[Checkpoint]:
    """Files, and the checkpoints directly in folders, in training order (time filled in later)."""
    found: dict[Path, Checkpoint] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise CmdError(f"{p}: no such file or folder")
        single = checkpoint_at(p)  # a file, or one Hugging Face checkpoint-<step>/ folder
        for c in [single] if single is not None else discover(p).checkpoints:
            found.setdefault(c.path.resolve(), c)
    checkpoints = sorted(found.values(), key=lambda c: natural_key(c.name))
    for before, after in zip(checkpoints, checkpoints[1:]):
        if before.name == after.name:
            raise CmdError(f"{after.path}: a second checkpoint named {after.name} (also {before.path})")
    return checkpoints


def plan_update(modes: ModeFile, checkpoints: Sequence[Checkpoint]) -> tuple[list[Checkpoint], list[Checkpoint]]:
    """Split into ``(skipped, new)``: checkpoints already in the mode file, and later ones with
    their times. A checkpoint that sorts before the mode file's last one is an error."""
    names, last = set(modes.names), modes.names[-1]
    from_names = times_from_names(modes.names) == [int(t) for t in modes.time]
    skipped = [c for c in checkpoints if c.name in names]
    new, previous = [], int(modes.time[-1])
    for c in (c for c in checkpoints if c.name not in names):
        if natural_key(c.name) <= natural_key(last):
            raise CmdError(f"{c.path}: comes before {last}, the last checkpoint in {modes.path}; "
                           f"online CMD only appends later checkpoints")
        if from_names:
            t = name_number(c.name)
            if t is None or t <= previous:
                raise CmdError(f"{c.path}: its step number ({t}) does not come after {previous}, the time of "
                               f"the last checkpoint in the mode file ({last})" if t is not None else
                               f"{c.path}: no step number in the name, but the mode file's times come from "
                               f"checkpoint names")
        else:
            t = previous + 1
        new.append(replace(c, time=t))
        previous = t
    return skipped, new


def _first_checkpoint(modes: ModeFile, candidates: Sequence[Checkpoint]) -> np.ndarray:
    """The first checkpoint's values, for a mode file without online state (a plain ``cmd fit``):
    from a given checkpoint of that name, the fit's trajectory store, or the fit's folder."""
    name, ema, settings = modes.names[0], modes.settings.ema, modes.settings
    for c in candidates:
        if c.name == name:
            return read_checkpoint(c, modes.layout, name, ema)[0]
    store_path = Path(settings.trajectory)
    if settings.trajectory and store_path.is_file():
        try:
            store = open_store(store_path)
            fresh = not settings.trajectory_fingerprint or store.fingerprint == settings.trajectory_fingerprint
            if fresh and store.names[0] == name and store.layout.to_json() == modes.layout.to_json():
                return np.array(store.W[0])
        except CmdError:
            pass
    source = Path(settings.source) / name
    if settings.source and source.exists():
        checkpoint = checkpoint_at(source)
        if checkpoint is not None:
            return read_checkpoint(checkpoint, modes.layout, name, ema)[0]
    raise CmdError(f"{modes.path}: the first update of a mode file needs its first checkpoint ({name}) "
                   f"for the displacement error, and neither the fit's trajectory store nor "
                   f"{source} is there; pass {name} along with the new checkpoints")


@dataclass
class UpdateResult:
    """What ``update`` returns.

    Attributes:
        mode_file: The updated mode file.
        absorbed: Names of the checkpoints absorbed, in order.
        skipped: Names of those already in the mode file.
        summary: What ``cmd info --json`` prints about the updated file.
        notes: What the update changed besides ``a, b``.
    """

    mode_file: Path
    absorbed: list[str]
    skipped: list[str]
    summary: dict
    notes: list[str] = field(default_factory=list)  # what the update changed besides a, b (for the CLI to say)


def update(mode_file: str | Path, checkpoints: Sequence[str | Path], progress: Progress = no_progress) -> UpdateResult:
    """``cmd update``: absorb the checkpoints (files or folders) that come after the mode file's
    last one. Ones already in the file are skipped; an earlier, incompatible or unreadable one is a
    CmdError and the mode file is left untouched (all are checked before anything is written, and
    the new file replaces the old one only when complete).

    Args:
        mode_file: The mode file to extend (replaced atomically, under a lock against a concurrent update).
        checkpoints: Checkpoint files, Hugging Face ``checkpoint-<step>/`` folders or run folders.
        progress: Progress callback.

    Returns:
        The names absorbed and skipped, and the updated summary.

    Raises:
        CmdError: A checkpoint earlier than the file's last one, other tensors, NaN or Inf values, an
            unreadable file; the mode file is then unchanged.
    """
    mode_file = Path(mode_file)
    candidates = _gather(checkpoints)
    if not mode_file.is_file():
        open_mode_file(mode_file).close()  # the message for a missing file or a folder; no lock file left
    with exclusive(mode_file), open_mode_file(mode_file) as modes:
        modes.require_whole("cmd update")  # it appends every carried tensor's rows
        skipped, new = plan_update(modes, candidates)
        notes = []
        if new and modes.embedding is not None:
            notes.append("the embedding record of embedded CMD is dropped: an update continues the file as a "
                         "plain online fit (every parameter's a, b updated)")
        if new:
            first_name, ema = modes.names[0], modes.settings.ema
            for c in new:
                with c.open(ema) as reader:
                    check_same_tensors(c.path, reader.signature, modes.layout.signature, first_name)
            first = None if modes.warmup is not None else _first_checkpoint(modes, candidates)
            state = OnlineState.from_modes(modes.load(), first)
            with progress("updating modes", len(new)) as advance:
                for c in new:
                    w, carried, info, attachments = read_checkpoint(c, modes.layout, first_name, ema)
                    state.observe(w, c.name, c.time, info, carried, attachments)
                    advance(1)
            write_mode_file(mode_file, state.to_modes(), replaces=modes)
    return UpdateResult(mode_file, [c.name for c in new], [c.name for c in skipped], summarize(mode_file), notes)
