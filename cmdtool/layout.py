"""The flat parameter layout: which tensors are modelled, and where each sits in the trajectory.

Modelled tensors (floating point, selected by ``--include/--exclude``) are laid end to end as the
columns ``offset : offset + size`` of the trajectory matrix. Every other tensor (integer buffers
such as ``num_batches_tracked``, or floats the user excluded) is *carried*: stored verbatim per
checkpoint. No I/O here.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from .errors import CmdError

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the prefix: "float32", "bfloat16", "int64", ...
    modelled: bool
    offset: int  # first trajectory column of a modelled tensor; -1 for a carried one

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.size)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor in its own dtype."""
        return self.size * _itemsize(self.dtype)


def _itemsize(dtype: str) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # bfloat16, float8_*: numpy has no such dtype
        import torch
        return torch.empty((), dtype=getattr(torch, dtype)).element_size()


@dataclass(frozen=True)
class Layout:
    tensors: tuple[TensorSpec, ...]

    @property
    def modelled(self) -> list[TensorSpec]:
        return [spec for spec in self.tensors if spec.modelled]

    @property
    def carried(self) -> list[TensorSpec]:
        return [spec for spec in self.tensors if not spec.modelled]

    @property
    def n_parameters(self) -> int:
        """N: the number of modelled scalars, the trajectory's column count."""
        return sum(spec.size for spec in self.modelled)

    def locate(self, column: int) -> tuple[str, tuple[int, ...]]:
        """The tensor name and element index of trajectory column ``column``."""
        for spec in self.modelled:
            if spec.offset <= column < spec.offset + spec.size:
                index = tuple(int(i) for i in np.unravel_index(column - spec.offset, spec.shape)) if spec.shape else ()
                return spec.name, index
        raise IndexError(column)

    @property
    def signature(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """``name -> (shape, dtype)`` of every tensor, as a checkpoint reader's ``signature``."""
        return {spec.name: (tuple(spec.shape), spec.dtype) for spec in self.tensors}

    def to_json(self) -> str:
        return json.dumps([[s.name, list(s.shape), s.dtype, s.modelled, s.offset] for s in self.tensors])

    @classmethod
    def from_json(cls, text: str) -> "Layout":
        specs = tuple(TensorSpec(name, tuple(shape), dtype, bool(modelled), int(offset))
                      for name, shape, dtype, modelled, offset in json.loads(text))
        layout = cls(specs)
        layout.validate()
        return layout

    def validate(self) -> None:
        """Offsets must tile ``0 .. N`` exactly; refuse a layout that does not (corrupt file)."""
        expected = 0
        for spec in self.modelled:
            if spec.offset != expected or any(d < 0 for d in spec.shape):
                raise ValueError(f"inconsistent layout at tensor {spec.name!r}")
            expected += spec.size


def select(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether ``--include/--exclude`` glob patterns keep a tensor name (no include = all)."""
    kept = not include or any(fnmatch.fnmatchcase(name, p) for p in include)
    return kept and not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def build_layout(signature: Mapping[str, tuple[tuple[int, ...], str]],
                 include: Iterable[str] = (), exclude: Iterable[str] = ()) -> Layout:
    """Lay out one checkpoint's tensors (``name -> (shape, dtype)``, in checkpoint order)."""
    include, exclude = list(include), list(exclude)
    specs, offset = [], 0
    for name, (shape, dtype) in signature.items():
        modelled = dtype in FLOAT_DTYPES and select(name, include, exclude)
        specs.append(TensorSpec(name, tuple(shape), dtype, modelled, offset if modelled else -1))
        if modelled:
            offset += math.prod(shape)
    layout = Layout(tuple(specs))
    if layout.n_parameters == 0:
        chosen = " ".join([f"--include {p!r}" for p in include] + [f"--exclude {p!r}" for p in exclude])
        floats = sum(dtype in FLOAT_DTYPES for _, dtype in signature.values())
        raise CmdError(f"no floating-point tensors to model ({chosen} left none of {floats})" if chosen
                       else "no floating-point tensors to model")
    return layout


def check_same_tensors(path: object, signature: Mapping[str, tuple], expected: Mapping[str, tuple],
                       expected_name: str) -> None:
    """A checkpoint (``path``, its ``name -> (shape, dtype)``) must have exactly the tensor names,
    shapes and dtypes of ``expected`` (those of the checkpoint or mode file ``expected_name``)."""
    for name, (shape, dtype) in expected.items():
        if name not in signature:
            raise CmdError(f"{path}: tensor {name!r} is missing (present in {expected_name})")
        got_shape, got_dtype = tuple(signature[name][0]), signature[name][1]
        if (got_shape, got_dtype) != (tuple(shape), dtype):
            raise CmdError(f"{path}: tensor {name!r} is {got_dtype} {list(got_shape)}, "
                           f"but {dtype} {list(shape)} in {expected_name}")
    for name in signature:
        if name not in expected:
            raise CmdError(f"{path}: tensor {name!r} is not in {expected_name}")
