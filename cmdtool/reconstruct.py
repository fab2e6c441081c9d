"""Mode file + checkpoint index -> state dict, and writing checkpoints back in the source format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ._lazy import torch  # imported on first use

from .checkpoints import write_checkpoint
from .errors import CmdError
from .layout import TensorSpec
from .modefile import ModeFile


def parse_at(at: str, T: int) -> list[int]:
    """``last``, ``first``, ``all`` or comma-separated positions (0-based, negative from the end)."""
    words = {"last": [T - 1], "first": [0], "all": list(range(T))}
    if at.strip() in words:
        return words[at.strip()]
    try:
        positions = [int(part) for part in at.split(",")]
    except ValueError:
        raise CmdError(f"--at {at!r}: expected last, first, all or positions like 0,5,-1") from None
    for p in positions:
        if not -T <= p < T:
            raise CmdError(f"--at {at!r}: position {p} is out of range (the mode file has {T} checkpoints, 0..{T - 1})")
    return sorted({p % T for p in positions})


def _carried_tensor(raw: np.ndarray, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    return torch.from_numpy(raw.copy()).view(getattr(torch, dtype)).reshape(shape)


# dtypes that numpy and safetensors' numpy writer share (not bfloat16): such checkpoints are
# written without importing torch, which takes longer than the whole reconstruction.
NUMPY_DTYPES = frozenset(("bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                          "float16", "float32", "float64"))


def _numpy_dtypes_only(modes: ModeFile) -> bool:
    return all(spec.dtype in NUMPY_DTYPES for spec in modes.layout.tensors)


def _values_at(modes: ModeFile, index: int) -> Iterator[tuple[TensorSpec, np.ndarray]]:
    """Per tensor at checkpoint ``index``: a modelled tensor's ``a · r[label, t] + b`` in float64
    (shaped), a carried tensor's raw bytes. Memory: one tensor at a time."""
    reference_values = modes.references[:, index].astype(np.float64)
    for spec in modes.layout.tensors:
        if spec.modelled:
            labels, a, b = modes.parameters(spec.columns)
            yield spec, (a.astype(np.float64) * reference_values[labels] + b).reshape(spec.shape)
        else:
            yield spec, modes.handle["carried"][spec.name][index]


def arrays_at(modes: ModeFile, index: int) -> dict[str, np.ndarray]:
    """``state_dict_at`` as numpy arrays (every tensor's dtype must be in ``NUMPY_DTYPES``);
    the values are the same, rounded from float64 the same way."""
    return {spec.name: values.astype(spec.dtype) if spec.modelled else values.view(spec.dtype).reshape(spec.shape)
            for spec, values in _values_at(modes, index)}


def state_dict_at(modes: ModeFile, index: int) -> dict[str, torch.Tensor]:
    """The CMD state dict at checkpoint ``index``: ``a · r[label, t] + b`` in float64, then cast to
    each tensor's source dtype; carried tensors as they were. Memory: one tensor at a time."""
    return {spec.name: torch.from_numpy(values).to(getattr(torch, spec.dtype)) if spec.modelled
            else _carried_tensor(values, spec.shape, spec.dtype) for spec, values in _values_at(modes, index)}


def write_checkpoints(modes: ModeFile, out_dir: Path, indices: Sequence[int], force: bool = False,
                      advance: Callable[[int], None] = lambda n: None) -> list[Path]:
    """Write the checkpoints ``indices`` into ``out_dir`` under their source names and format.

    All files go to temporary names first and are renamed into place only when every one is
    written; nothing existing is overwritten without ``force``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CmdError(f"{out_dir}: is a file, expected an output folder")
    targets = [out_dir / modes.names[i] for i in indices]
    for target in targets:
        if target.is_dir():
            raise CmdError(f"{target}: is a directory")
        if target.exists() and not force:
            raise CmdError(f"{target}: already exists (use --force to overwrite)")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, Path]] = []
    try:
        for i, target in zip(indices, targets):
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            written.append((tmp, target))
            as_arrays = modes.infos[i].format == "safetensors" and _numpy_dtypes_only(modes)
            write_checkpoint(tmp, (arrays_at if as_arrays else state_dict_at)(modes, i), modes.infos[i])
            advance(1)
        for tmp, target in written:
            os.replace(tmp, target)
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
    return targets
