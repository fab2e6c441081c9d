"""Writing checkpoints back in their source format: a file (safetensors, torch, a wrapper dict) or a
Hugging Face folder (shards, index, copied files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from .._files import plain_name
from .._lazy import save_file, torch  # imported on first use
from ..errors import CmdError
from .adapters import ADAPTER_CONFIG, check_adapter_config
from .dcp import write_dcp
from .safetensors_writer import DeferredFiles
from .schema import CheckpointInfo


def write_checkpoint(path: Path, state: dict[str, torch.Tensor] | DeferredFiles, info: CheckpointInfo,
                     attachment: Callable[[str], bytes] = lambda digest: b"", shown: Path | None = None) -> None:
    """Write a state dict in the source's format, restoring its wrapper and metadata.

    ``state`` may instead be a ``DeferredFiles`` (a safetensors file, or a Hugging Face folder of
    them): the file (each weight file) is then created with its header only, and the caller writes
    its tensors through ``state.writers``.

    A ``torch.distributed.checkpoint`` source becomes a DCP folder at ``path`` (``dcp.write_dcp``).
    A Hugging Face checkpoint becomes the folder ``path``: the same weight files (the index rewritten
    when there was one), safetensors metadata with ``format: pt`` (what ``from_pretrained`` checks),
    and the copied files, whose bytes ``attachment(sha256)`` returns. A failed write (full disk, a
    dtype the format cannot hold) is a CmdError naming ``shown`` (default ``path``).
    """
    if isinstance(state, DeferredFiles) and info.format != "safetensors":
        raise ValueError(f"{path}: deferred writing is for safetensors files, not {info.format} folders or files")
    try:
        if isinstance(state, DeferredFiles) and not info.is_folder:
            state.open(path, info.metadata, shown)
        else:
            _write_checkpoint(path, state, info, attachment, shown or path)
    except CmdError:
        raise
    except OSError as e:
        raise CmdError(f"{shown or path}: cannot write: {e.strerror or e}") from None
    except Exception as e:  # safetensors' SafetensorError, torch's RuntimeError from its zip writer
        text = " ".join(str(e).split())[:200]
        raise CmdError(f"{shown or path}: cannot write ({type(e).__name__}: {text})") from None


def _write_checkpoint(path: Path, state: dict[str, torch.Tensor] | DeferredFiles, info: CheckpointInfo,
                      attachment: Callable[[str], bytes], shown: Path) -> None:
    if info.format == "dcp":
        write_dcp(path, state, info.wrapper, info.extras)
        return
    if not info.is_folder:
        _write_file(path, state, info.format, info.metadata, info.wrapper,
                    {**info.extras, **dict.fromkeys(info.aliases, state)})
        return
    files = [*info.shards, *info.files, *([info.index["name"]] if info.index is not None else [])]
    for name in files:  # each becomes a file in the folder, never a path elsewhere (the mode file says them)
        try:
            plain_name(name, "file name")
        except ValueError as e:
            raise CmdError(f"{path}: {e}") from None
    if len(set(files)) != len(files):
        raise CmdError(f"{path}: a file name is used twice in the folder")
    path.mkdir()
    metadata = {**(info.metadata or {}), "format": "pt"}
    weight_map, total_size = {}, 0
    if isinstance(state, DeferredFiles):
        state.open_folder(path, info.shards, metadata, shown)
    for file_name, names in info.shards.items():
        if isinstance(state, DeferredFiles):
            total_size += sum(state.nbytes(n) for n in names)
        else:
            _write_file(path / file_name, {n: state[n] for n in names}, info.format, metadata)
            total_size += sum(state[n].numel() * state[n].element_size() for n in names)
        weight_map.update(dict.fromkeys(names, file_name))
    if info.index is not None:
        index = {"metadata": {**info.index.get("metadata", {}), "total_size": total_size},
                 "weight_map": weight_map}
        (path / info.index["name"]).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for file_name, digest in info.files.items():
        data = attachment(digest)
        if file_name == ADAPTER_CONFIG:  # a PEFT adapter loads only with a valid one
            check_adapter_config(data, shown / file_name)
        (path / file_name).write_bytes(data)


def _write_file(path: Path, state: dict[str, torch.Tensor], fmt: str, metadata: dict[str, str] | None,
                wrapper: str | None = None, extras: Mapping[str, Any] = {}) -> None:
    if fmt == "safetensors":
        save_file(state, str(path), metadata=metadata)
    else:
        torch.save({**extras, wrapper: state} if wrapper else state, path)
