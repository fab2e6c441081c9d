"""Small HDF5 helpers shared by the trajectory store and the mode file."""

from __future__ import annotations

import h5py


def write_text(group: h5py.Group, name: str, text: str) -> None:
    """A scalar string dataset: unlike an attribute, no 64 KiB limit (large layouts)."""
    group.create_dataset(name, data=text, dtype=h5py.string_dtype())


def read_text(group: h5py.Group, name: str) -> str:
    value = group[name][()]
    return value.decode() if isinstance(value, bytes) else str(value)


def read_strings(group: h5py.Group, name: str) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in group[name][()]]
