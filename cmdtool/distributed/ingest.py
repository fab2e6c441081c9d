"""The sharded trajectory store of a checkpoint folder, built by one Dask task per column shard:
found by fingerprint and reused as ``stores.prepare_store`` does for a single-file store."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..checkpoints import discover
from ..errors import CmdError
from ..fitting import group_step, tile_width
from ..progress import Progress, no_progress
from ..shards import build_sharded, is_sharded, open_sharded, sharded_fingerprint
from ..stores import PreparedStore, default_store_path
from ..trajectory import fingerprint, read_signatures
from .engine import Engine, store_folder


def prepare_sharded_store(engine: Engine, checkpoint_dir: Path, *, start: int | None = None, stop: int | None = None,
                          every: int = 1, include: Sequence[str] = (), exclude: Sequence[str] = (), ema: bool = False,
                          trajectory: str | Path | None = None, force: bool = False, shard_columns: int | None = None,
                          progress: Progress = no_progress) -> PreparedStore:
    """The sharded store of the checkpoints ``[start:stop:every]`` of a folder, at ``trajectory``
    (a folder every worker sees; default: the cache path with ``.shards``). Shards default to the
    fit's groups of tiles, so that a fit task reads one shard file."""
    checkpoint_dir = Path(checkpoint_dir)
    discovery = discover(checkpoint_dir)
    checkpoints = discovery.checkpoints[start:stop:every]
    if len(checkpoints) < 2:
        raise CmdError(f"{checkpoint_dir}: CMD needs at least 2 checkpoints, selected {len(checkpoints)}")
    path = store_folder(Path(trajectory) if trajectory else default_store_path(checkpoint_dir))
    key = fingerprint(checkpoints, include, exclude, ema)
    if sharded_fingerprint(path) == key:
        return PreparedStore(open_sharded(path), path, True, discovery)
    if path.exists() and not is_sharded(path) and not force:
        raise CmdError(f"{path}: exists and is not a cmdtool sharded trajectory store (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with progress("checking checkpoints", len(checkpoints)) as advance:
        layout, infos = read_signatures(checkpoints, include, exclude, ema, advance)
    columns = shard_columns or group_step(tile_width(len(checkpoints)))
    with progress("building sharded trajectory store", 1) as advance:
        store = build_sharded(checkpoints, layout, infos, path, key, ema, columns, engine.map_shards)
        advance(1)
    return PreparedStore(store, path, False, discovery)
