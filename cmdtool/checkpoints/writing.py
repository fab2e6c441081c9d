"""Writing checkpoints back in their source format: a file (safetensors, torch, a wrapper dict) or a
Hugging Face folder (shards, index, copied files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from .._lazy import save_file, torch  # imported on first use
from .schema import CheckpointInfo


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], info: CheckpointInfo,
                     attachment: Callable[[str], bytes] = lambda digest: b"") -> None:
    """Write a state dict in the source's format, restoring its wrapper and metadata.

    A Hugging Face checkpoint becomes the folder ``path``: the same weight files (the index rewritten
    when there was one), safetensors metadata with ``format: pt`` (what ``from_pretrained`` checks),
    and the copied files, whose bytes ``attachment(sha256)`` returns.
    """
    if not info.is_folder:
        _write_file(path, state, info.format, info.metadata, info.wrapper, info.extras)
        return
    path.mkdir()
    metadata = {**(info.metadata or {}), "format": "pt"}
    weight_map, total_size = {}, 0
    for file_name, names in info.shards.items():
        _write_file(path / file_name, {n: state[n] for n in names}, info.format, metadata)
        weight_map.update(dict.fromkeys(names, file_name))
        total_size += sum(state[n].numel() * state[n].element_size() for n in names)
    if info.index is not None:
        index = {"metadata": {**info.index.get("metadata", {}), "total_size": total_size},
                 "weight_map": weight_map}
        (path / info.index["name"]).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for file_name, digest in info.files.items():
        (path / file_name).write_bytes(attachment(digest))


def _write_file(path: Path, state: dict[str, torch.Tensor], fmt: str, metadata: dict[str, str] | None,
                wrapper: str | None = None, extras: Mapping[str, Any] = {}) -> None:
    if fmt == "safetensors":
        save_file(state, str(path), metadata=metadata)
    else:
        torch.save({wrapper: state, **extras} if wrapper else state, path)
