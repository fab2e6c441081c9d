"""Mode file + checkpoint index -> state dict, and writing checkpoints back in the source format."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ._lazy import torch  # imported on first use

from ._files import remove_path, replace_path, temporary_sibling
from .checkpoints import CHECKPOINT_SUFFIXES, CheckpointInfo, write_checkpoint
from .checkpoints.formats import NUMPY_DTYPES  # written without importing torch, which takes longer than the work
from .errors import CmdError
from .layout import Layout, TensorSpec
from .modefile import ModeFile
from .modes import model_values


def parse_at(at: str, T: int) -> list[int]:
    """``last``, ``first``, ``all`` or comma-separated positions (0-based, negative from the end)."""
    words = {"last": [T - 1], "first": [0], "all": list(range(T))}
    if at.strip() in words:
        return words[at.strip()]
    try:
        positions = [int(part) for part in at.split(",")]
    except ValueError:
        raise CmdError(f"at {at!r}: expected last, first, all or positions like 0,5,-1", parameter="at") from None
    for p in positions:
        if not -T <= p < T:
            raise CmdError(f"at {at!r}: position {p} is out of range (the mode file has {T} checkpoints, 0..{T - 1})",
                           parameter="at")
    return sorted({p % T for p in positions})


def _carried_tensor(raw: np.ndarray, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    return torch.from_numpy(raw.copy()).view(getattr(torch, dtype)).reshape(shape)


def assemble_state_dict(layout: Layout, modelled: Callable[[TensorSpec], np.ndarray],
                        carried: Callable[[TensorSpec], np.ndarray]) -> dict[str, torch.Tensor]:
    """A state dict in the layout's order: ``modelled(spec)`` gives a modelled tensor's flat values
    (cast to its source dtype), ``carried(spec)`` a carried tensor's raw bytes."""
    state = {}
    for spec in layout.tensors:
        if spec.modelled:
            values = np.ascontiguousarray(modelled(spec)).reshape(spec.shape)
            state[spec.name] = torch.from_numpy(values).to(getattr(torch, spec.dtype))
        else:
            state[spec.name] = _carried_tensor(carried(spec), spec.shape, spec.dtype)
    return state


def _numpy_dtypes_only(modes: ModeFile) -> bool:
    return all(spec.dtype in NUMPY_DTYPES for spec in modes.layout.tensors)


Parameters = tuple[np.ndarray, np.ndarray, np.ndarray]


def _values_at(modes: ModeFile, index: int, parameters: Parameters | None = None
               ) -> Iterator[tuple[TensorSpec, np.ndarray]]:
    """Per tensor at checkpoint ``index``: a modelled tensor's ``a · r[label, t] + b`` in float64
    (shaped), a carried tensor's raw bytes. ``parameters``: every ``labels, a, b`` read once for
    many checkpoints; else each tensor's are read from the file (memory: one tensor at a time)."""
    modes.require_whole("reconstructing a checkpoint")
    reference_values = modes.references[:, index].astype(np.float64)
    for spec in modes.layout.tensors:
        if spec.modelled:
            labels, a, b = ((v[spec.columns] for v in parameters) if parameters is not None
                            else modes.parameters(spec.columns))
            yield spec, model_values(labels, a, b, reference_values).reshape(spec.shape)
        else:
            yield spec, modes.carried_row(spec.name, index)


def arrays_at(modes: ModeFile, index: int, parameters: Parameters | None = None) -> dict[str, np.ndarray]:
    """``state_dict_at`` as numpy arrays (every tensor's dtype must be in ``NUMPY_DTYPES``);
    the values are the same, rounded from float64 the same way."""
    return {spec.name: values.astype(spec.dtype) if spec.modelled else values.view(spec.dtype).reshape(spec.shape)
            for spec, values in _values_at(modes, index, parameters)}


def state_dict_at(modes: ModeFile, index: int, parameters: Parameters | None = None) -> dict[str, torch.Tensor]:
    """The CMD state dict at checkpoint ``index``: ``a · r[label, t] + b`` in float64, then cast to
    each tensor's source dtype; carried tensors as they were. Memory: one tensor at a time."""
    return {spec.name: torch.from_numpy(values).to(getattr(torch, spec.dtype)) if spec.modelled
            else _carried_tensor(values, spec.shape, spec.dtype) for spec, values in _values_at(modes, index, parameters)}


WRITE_FORMATS = ("source", "safetensors")


def output_plan(name: str, info: CheckpointInfo, fmt: str = "source") -> tuple[str, CheckpointInfo, list[str]]:
    """The name and write-back info of a reconstructed checkpoint, and what it does not restore.

    ``fmt="source"`` writes what the source was; ``"safetensors"`` a plain safetensors state dict
    (``epoch_3.pt`` -> ``epoch_3.safetensors``, ``checkpoint-500/`` -> ``checkpoint-500.safetensors``).
    """
    if fmt == "source":
        return name, info, list(info.dropped)
    if fmt != "safetensors":
        raise CmdError(f"format {fmt!r}: expected one of {', '.join(WRITE_FORMATS)}", parameter="format")
    stem = next((name[: -len(s)] for s in CHECKPOINT_SUFFIXES if name.endswith(s)), name)
    metadata = {**(info.metadata or {}), "format": "pt"} if info.format == "safetensors" else {"format": "pt"}
    lost = [*info.dropped, *info.extras, *info.files, *([info.index["name"]] if info.index else [])]
    return stem + ".safetensors", CheckpointInfo("safetensors", metadata=metadata), lost


def write_checkpoints(modes: ModeFile, out_dir: Path, indices: Sequence[int], force: bool = False,
                      advance: Callable[[int], None] = lambda n: None, fmt: str = "source") -> list[Path]:
    """Write the checkpoints ``indices`` into ``out_dir`` under their source names and format
    (``fmt="safetensors"``: as plain safetensors files, see ``output_plan``).

    All files (and Hugging Face folders) go to temporary names first and are renamed into place
    only when every one is written; nothing existing is overwritten without ``force``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CmdError(f"{out_dir}: is a file, expected an output folder")
    plans = [output_plan(modes.names[i], modes.infos[i], fmt) for i in indices]
    targets = [out_dir / name for name, _, _ in plans]
    for target, (_, info, _) in zip(targets, plans):
        if target.is_dir() and not info.is_folder:
            raise CmdError(f"{target}: is a directory")
        if target.exists() and not force:
            raise CmdError(f"{target}: already exists (use --force to overwrite)")
    out_dir.mkdir(parents=True, exist_ok=True)
    parameters = modes.parameters() if len(indices) > 1 else None  # read once for many checkpoints
    written: list[tuple[Path, Path]] = []
    try:
        for i, target, (_, info, _) in zip(indices, targets, plans):
            tmp = temporary_sibling(target)
            written.append((tmp, target))
            as_arrays = info.format == "safetensors" and not info.is_folder and _numpy_dtypes_only(modes)
            write_checkpoint(tmp, (arrays_at if as_arrays else state_dict_at)(modes, i, parameters), info,
                             modes.attachment)
            advance(1)
        for tmp, target in written:
            replace_path(tmp, target)
    finally:
        for tmp, _ in written:
            remove_path(tmp)
    return targets
