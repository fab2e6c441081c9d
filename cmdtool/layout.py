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
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from .errors import CmdError

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# Every dtype a layout may hold, with its size in bytes: the floats above are modelled, the rest
# carried as raw bytes (torch dtype names). Anything else (quantized, sub-byte, unknown) is refused
# when a checkpoint is read, and a mode file that names one is corrupt.
DTYPE_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
               "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
               "int64": 8, "uint64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1,
               "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "complex32": 4, "complex64": 8, "complex128": 16}


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
        return self.size * DTYPE_SIZES[self.dtype]

    @property
    def key(self) -> str:
        """The HDF5 dataset name under which a carried tensor is stored (see ``dataset_key``)."""
        return dataset_key(self.name)


def dataset_key(name: str) -> str:
    """A tensor name as one HDF5 link name: ``%`` and ``/`` percent-encoded, and ``""``, ``.``,
    ``..`` prefixed with ``%``, so that a name can never address another object (``/W``) or a
    group; lone surrogates (from odd pickles) become ``%uXXXX``. Ordinary names are unchanged."""
    key = name.replace("%", "%25").replace("/", "%2F")
    key = re.sub("[\ud800-\udfff]", lambda m: f"%u{ord(m.group()):04X}", key)
    return "%" + key if key in ("", ".", "..") else key


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
        """Parse and check a stored layout; anything malformed is a ValueError (the caller names the file)."""
        try:
            entries = json.loads(text)
        except RecursionError:
            raise ValueError("layout nested too deeply") from None
        if not isinstance(entries, list):
            raise ValueError("layout is not a list")
        specs = []
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 5):
                raise ValueError(f"layout entry {str(entry)[:80]!r} is not [name, shape, dtype, modelled, offset]")
            name, shape, dtype, modelled, offset = entry
            if (not isinstance(name, str) or not isinstance(shape, list)
                    or not all(is_integer(d) and d >= 0 for d in shape)
                    or not isinstance(modelled, bool) or not is_integer(offset)):
                raise ValueError(f"layout entry for tensor {str(name)[:80]!r} has fields of the wrong type")
            if dtype not in DTYPE_SIZES or (modelled and dtype not in FLOAT_DTYPES):
                raise ValueError(f"tensor {name!r} has dtype {str(dtype)[:40]!r}, not one of {', '.join(DTYPE_SIZES)}"
                                 + (" (modelled tensors are floating point)" if dtype in DTYPE_SIZES else ""))
            specs.append(TensorSpec(name, tuple(shape), dtype, modelled, offset))
        layout = cls(tuple(specs))
        layout.validate()
        return layout

    def validate(self) -> None:
        """Offsets must tile ``0 .. N`` exactly, names be unique and carried offsets -1; refuse a
        layout that does not (corrupt file)."""
        expected, names = 0, set()
        for spec in self.tensors:
            if spec.name in names:
                raise ValueError(f"tensor {spec.name!r} appears twice in the layout")
            names.add(spec.name)
            if any(d < 0 for d in spec.shape) or (not spec.modelled and spec.offset != -1):
                raise ValueError(f"inconsistent layout at tensor {spec.name!r}")
            if spec.modelled:
                if spec.offset != expected:
                    raise ValueError(f"inconsistent layout at tensor {spec.name!r}")
                expected += spec.size
            if spec.size >= 2**62:
                raise ValueError(f"tensor {spec.name!r} declares {spec.size} elements")


def is_integer(value: object) -> bool:
    """An integer, Python or numpy (a stored attribute, a JSON value, an argument); not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


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
