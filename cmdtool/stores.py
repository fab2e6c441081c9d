"""Which trajectory store holds which checkpoints: the cache path, reuse by fingerprint, build."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple, Sequence

from ._files import cache_folder
from .checkpoints import Checkpoint, Discovery, discover
from .errors import CmdError
from .progress import Progress, no_progress
from .shards import is_sharded, open_sharded
from .trajectory import TrajectoryStore, build_store, fingerprint, open_store, read_signatures, store_fingerprint


def default_store_path(checkpoint_dir: Path) -> Path:
    """Where a folder's trajectory store lives unless ``--trajectory`` says otherwise:
    ``$CMDTOOL_CACHE`` (default ``$XDG_CACHE_HOME/cmdtool`` or ``~/.cache/cmdtool``), one file per folder,
    named after the folder and its parent (``trajectory-<parent>-<folder>-<hash>.h5``)."""
    cache = cache_folder()
    folder = Path(checkpoint_dir).resolve()
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    named = "-".join(part for part in (folder.parent.name, folder.name) if part)  # runs/seed0/ckpt: seed0-ckpt
    return Path(cache) / f"trajectory-{named}-{key}.h5"


def open_trajectory_store(path: Path) -> TrajectoryStore:
    """A single-file store, or a sharded one (a folder with an index, ``cmdtool.shards``)."""
    return open_sharded(path) if is_sharded(path) else open_store(path)


class PreparedStore(NamedTuple):
    store: TrajectoryStore
    path: Path
    reused: bool
    discovery: Discovery


def prepare_store(checkpoint_dir: Path, *, start: int | None = None, stop: int | None = None, every: int = 1,
                  include: Sequence[str] = (), exclude: Sequence[str] = (), ema: bool = False,
                  trajectory: str | Path | None = None, force: bool = False,
                  progress: Progress = no_progress, tensor_order: Sequence[str] | None = None) -> PreparedStore:
    """The trajectory store of the checkpoints ``[start:stop:every]`` of a folder: reused when its
    fingerprint matches, built otherwise; its tensors in ``tensor_order`` when given (a mode file's)."""
    checkpoint_dir = Path(checkpoint_dir)
    discovery = discover(checkpoint_dir)
    checkpoints = discovery.checkpoints[start:stop:every]
    if len(checkpoints) < 2:
        raise CmdError(f"{checkpoint_dir}: CMD needs at least 2 checkpoints, "
                       f"{'found' if start is None and stop is None and every == 1 else 'selected'} "
                       f"{len(checkpoints)}")
    store, store_path, reused = store_of(checkpoints, checkpoint_dir, include=include, exclude=exclude, ema=ema,
                                         trajectory=trajectory, force=force, progress=progress,
                                         tensor_order=tensor_order)
    return PreparedStore(store, store_path, reused, discovery)


def store_of(checkpoints: Sequence[Checkpoint], checkpoint_dir: Path, *, include: Sequence[str] = (),
             exclude: Sequence[str] = (), ema: bool = False, trajectory: str | Path | None = None,
             force: bool = False, progress: Progress = no_progress,
             tensor_order: Sequence[str] | None = None) -> tuple[TrajectoryStore, Path, bool]:
    """The trajectory store of these checkpoints of ``checkpoint_dir`` (e.g. the complete ones of a
    folder still being written): reused when its fingerprint matches. Returns ``(store, path, reused)``."""
    store_path = Path(trajectory) if trajectory else default_store_path(checkpoint_dir)
    if store_path.is_dir():
        raise CmdError(f"{store_path}: is a directory, expected a trajectory-store file path")
    key = fingerprint(checkpoints, include, exclude, ema, tensor_order)
    present = store_path.exists()  # before the fingerprint: a store another fit renames in meanwhile is no stranger
    existing = store_fingerprint(store_path)
    if existing == key:
        store = open_store(store_path)
        if store.fingerprint == key:  # still the same file (another fit may have replaced it meanwhile)
            return store, store_path, True
    if present and existing is None and not force:
        raise CmdError(f"{store_path}: exists and is not a cmdtool trajectory store (use --force to replace it)")
    store_path.parent.mkdir(parents=True, exist_ok=True)
    with progress("checking checkpoints", len(checkpoints)) as advance:
        layout, infos = read_signatures(checkpoints, include, exclude, ema, advance, tensor_order)
    with progress("building trajectory store", len(checkpoints)) as advance:
        store = build_store(checkpoints, layout, infos, store_path, key, ema, advance)
    return store, store_path, False
