"""``cmd watch``: follow a training folder and keep a mode file up to date (online CMD, paper §3.3)."""

from __future__ import annotations

import re
import stat
import time as clock
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from .._files import exclusive
from ..checkpoints import (
    Checkpoint,
    CheckpointReader,
    candidate_entries,
    checkpoint_at,
    natural_key,
    skip_reason,
    sniff_format,
    times_from_names,
)
from ..checkpoints.adapters import ADAPTER_WEIGHTS
from ..checkpoints.discover import HF_WEIGHTS
from ..errors import CmdError
from ..modefile import check_output_path, open_mode_file, write_mode_file
from ..modes import REFINE, FitSettings
from ..progress import Progress, no_progress
from ..stores import store_of
from .state import fit_warmup
from .update import update

# A Trainer's checkpoint folder: waited for even while it holds no weights yet.
HF_CHECKPOINT_FOLDER = re.compile(r"checkpoint-[0-9]+")
# File names that make any folder a candidate checkpoint (full model weights or a PEFT adapter).
WEIGHT_NAMES = frozenset((*(name for pair in HF_WEIGHTS for name in pair), *ADAPTER_WEIGHTS))


def _folder_state(folder: Path) -> tuple | None:
    """The names, sizes and modification times of a folder's files: what must hold still between
    two looks. None if the folder went away meanwhile."""
    try:
        state = []
        for p in folder.iterdir():
            st = p.stat()
            if stat.S_ISREG(st.st_mode) and not p.name.startswith("."):
                state.append((p.name, st.st_size, st.st_mtime_ns))
        return tuple(sorted(state))
    except (FileNotFoundError, NotADirectoryError):
        return None


class _Folder:
    """Complete checkpoints of a folder that is being written to: a file counts once its size and
    modification time are the same at two polls in a row and it opens as a checkpoint; a
    ``checkpoint-<step>/`` folder (full weights or a PEFT adapter) once all its files are."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.seen: dict[Path, tuple] = {}
        self.parsed: dict[Path, tuple[int, int]] = {}
        self.folders: dict[Path, tuple[tuple, Checkpoint]] = {}  # folders that opened, and their state then
        self.waiting: set = set()

    def _poll_folder(self, p: Path, current: dict, say: Callable[[str], None]) -> tuple[Checkpoint, bool] | None:
        """A folder as a checkpoint, with whether it is complete; None for a folder that holds no
        weights and is not named ``checkpoint-<step>``."""
        state = _folder_state(p)
        if state is None or not (HF_CHECKPOINT_FOLDER.fullmatch(p.name)
                                 or any(name in WEIGHT_NAMES for name, _, _ in state)):
            return None
        current[p] = state
        if not state or self.seen.get(p) != state:
            return Checkpoint(p, "", 0), False
        if p in self.folders and self.folders[p][0] == state:
            return self.folders[p][1], True
        try:
            checkpoint = checkpoint_at(p)
            if checkpoint is None:
                raise CmdError(f"{p}: no model weights yet (model.safetensors, pytorch_model.bin or "
                               f"adapter_model.safetensors)")
            with checkpoint.open():
                pass
        except CmdError as e:
            if (p, state) not in self.waiting:
                self.waiting.add((p, state))
                say(f"waiting: {e}")
            return Checkpoint(p, "", 0), False
        self.folders[p] = (state, checkpoint)
        return checkpoint, True

    def poll(self, say: Callable[[str], None]) -> list[tuple[Checkpoint, bool]]:
        """Every checkpoint (file or folder) in training order, with whether it is complete."""
        current, out = {}, []
        for p in candidate_entries(self.folder):
            if skip_reason(p.name):  # last.ckpt, optimizer.pt, tmp-checkpoint-*, …: never checkpoints
                continue
            if p.is_dir():
                entry = self._poll_folder(p, current, say)
                if entry is not None:
                    out.append(entry)
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if not p.is_file() or p.name in ADAPTER_WEIGHTS:  # the adapter Trainer.save_model puts in the run
                continue                                           # folder itself is not one of its checkpoints
            current[p] = (st.st_size, st.st_mtime_ns)
            ready = st.st_size > 0 and self.seen.get(p) == current[p]
            fmt = sniff_format(p) if ready else None
            if ready and self.parsed.get(p) != current[p]:
                try:
                    if fmt is None:
                        raise CmdError(f"{p}: not a checkpoint yet")
                    with CheckpointReader(p, fmt):
                        pass
                    self.parsed[p] = current[p]
                except CmdError as e:
                    ready = False
                    if (p, current[p]) not in self.waiting:
                        self.waiting.add((p, current[p]))
                        say(f"waiting: {e}")
            out.append((Checkpoint(p, fmt or "", 0), ready))
        self.seen = current
        return out


def watch(folder: str | Path, output: str | Path, *, warmup: int, until: int | None = None, interval: float = 10.0,
          modes: int = 10, samples: int = 1000, seed: int = 0, refine: int = REFINE, include: Sequence[str] = (),
          exclude: Sequence[str] = (), trajectory: str | Path | None = None, force: bool = False,
          progress: Progress = no_progress, say: Callable[[str], None] = lambda s: None,
          sleep: Callable[[float], None] = clock.sleep) -> Path:
    """``cmd watch``: follow a training folder. Once ``warmup`` complete checkpoints exist, fit on
    them (``fit_warmup``, as ``cmd fit --warmup``), then ``update`` with each new complete
    checkpoint, in training order.
    An existing ``output`` is resumed (``force`` refits it). Returns when the mode file holds
    ``until`` checkpoints; Ctrl-C raises KeyboardInterrupt. The mode file is replaced atomically at
    every change, so it is valid at every moment.

    Args:
        folder: The training run's checkpoint folder.
        output: The mode file to keep up to date (resumed when it exists).
        warmup: Checkpoints (F) the modes are found on.
        until: Return once the mode file holds this many checkpoints (None: run until interrupted).
        interval: Seconds between looks at the folder.
        modes: Most modes (M) of the warm-up fit.
        samples: Parameters sampled (K) for the warm-up fit.
        seed: Seed of that sample.
        refine: Lloyd-style passes over the references in the warm-up fit.
        include: Model only tensors whose name matches one of these globs.
        exclude: Do not model tensors matching these globs.
        trajectory: Where to keep the warm-up's trajectory store.
        force: Refit an existing mode file instead of resuming it.
        progress: Progress callback.
        say: Called with one line per event (a checkpoint absorbed, skipped, ...).
        sleep: Called to wait between looks.

    Returns:
        The mode file's path.
    """
    folder, output = Path(folder), Path(output)
    if not folder.is_dir():
        raise CmdError(f"{folder}: no such folder" if not folder.exists() else f"{folder}: is a file, expected a "
                                                                               "folder of checkpoints")
    settings = FitSettings(modes=modes, samples=samples, seed=seed, refine=refine, include=include,
                           exclude=exclude,
                           source=str(folder.resolve()), warmup=warmup)
    fitted = output.exists() and not force
    if fitted:
        with open_mode_file(output) as m:
            say(f"resuming {output}: it holds {m.T} checkpoints ({m.names[0]} … {m.names[-1]})")
    else:
        check_output_path(output, force)
    files = _Folder(folder)
    said = ""  # the last "waiting" line, said again only when it changes
    while True:
        listing = files.poll(say)
        absorbed, pending = False, None  # pending: the first checkpoint not complete yet
        if not fitted:
            ready = []
            for c, complete in listing:
                if not complete:
                    pending = c
                    break
                ready.append(c)
            waiting = (f"waiting for the warm-up: {len(ready)} of {warmup} complete checkpoints in {folder} "
                       f"(checkpoint files or checkpoint-<step>/ folders)")
            if len(ready) >= warmup:
                absorbed = True
                times = times_from_names([c.name for c in ready])
                if times is None or len(set(times)) != len(times):  # as discover: else positions
                    times = list(range(len(ready)))
                checkpoints = [replace(c, time=t) for c, t in zip(ready, times)]
                store, store_path, _ = store_of(checkpoints, folder, include=include, exclude=exclude,
                                                trajectory=trajectory, force=force, progress=progress)
                fitted_on = settings.replace(trajectory=str(store_path.resolve()),
                                             trajectory_fingerprint=store.fingerprint)
                modes_fitted = fit_warmup(store, fitted_on, progress=progress)
                with exclusive(output):  # not while a cmd update (or another watch) rewrites it
                    write_mode_file(output, modes_fitted)
                fitted = True
                say(f"fitted {output} on the warm-up {ready[0].name} … {ready[warmup - 1].name}"
                    + (f" and updated it with {len(ready) - warmup} more" if len(ready) > warmup else ""))
        else:
            with open_mode_file(output) as m:
                names, last = set(m.names), m.names[-1]
            new = []
            for c, complete in listing:
                if c.name in names:
                    continue
                if natural_key(c.name) <= natural_key(last):
                    if (c.path, "early") not in files.waiting:
                        files.waiting.add((c.path, "early"))
                        say(f"note: {c.path} comes before {last}, the last checkpoint absorbed; ignored")
                    continue
                if not complete:
                    pending = c
                    break
                new.append(c.path)
            waiting = (f"waiting for checkpoints after {last} in {folder} "
                       f"(checkpoint files or checkpoint-<step>/ folders)")
            if new:
                absorbed = True
                result = update(output, new, progress)
                say(f"absorbed {', '.join(result.absorbed)}: {output} holds {result.summary['checkpoints']} "
                    "checkpoints")
        if fitted and until is not None:
            with open_mode_file(output) as m:
                if m.T >= until:
                    return output
        if not absorbed:
            if pending is not None:
                waiting += f"; {pending.name} is not complete yet"
            if waiting != said:
                say(waiting)
                said = waiting
        sleep(interval)
