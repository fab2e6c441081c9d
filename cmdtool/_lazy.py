"""Modules imported on first use, so that commands that need no torch start without it, and
packages whose names are imported on first use (``lazy_package``), so that a module imports only
what it uses.

``import torch`` takes over a second; ``cmd --help``, ``cmd info`` and fitting, updating or
reconstructing a run of safetensors checkpoints in numpy dtypes never touch torch. Modules write
``from ._lazy import torch``: a stand-in whose
first attribute access imports the real module (then ``sys.modules`` serves every later access).
"""

from __future__ import annotations

import importlib
import sys
import types


class lazy_module:  # noqa: N801 - used like the module it stands for
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str) -> object:
        return getattr(importlib.import_module(self._name), attribute)


torch = lazy_module("torch")


def save_file(tensors: dict, filename: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``: numpy arrays are written without importing torch (the same
    bytes as torch tensors of the same values), torch tensors through ``safetensors.torch``."""
    import numpy as np

    if all(isinstance(value, np.ndarray) for value in tensors.values()):
        from safetensors.numpy import save_file as save
    else:
        from safetensors.torch import save_file as save
    save(tensors, filename, metadata=metadata)


class LazyPackage(types.ModuleType):
    """A package whose exported names are imported from their modules on first use (``lazy_package``),
    so that importing one module of the package (``checkpoints.schema``) does not import them all."""

    def __getattr__(self, name: str) -> object:
        exports = self.__dict__.get("_lazy_exports", {})
        if name not in exports:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], self.__name__), name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value: object) -> None:
        # Loading a submodule sets it as an attribute of its package; where the package exports a
        # function of the same name (``online.update``, ``checkpoints.discover``), the function stays,
        # as it did when the package imported everything up front.
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_lazy_exports", {}):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(self.__dict__) | set(self.__dict__.get("_lazy_exports", {})))


def lazy_package(name: str, exports: dict[str, tuple[str, ...]]) -> None:
    """Make the package ``name`` (call it from its ``__init__`` with ``__name__``) a ``LazyPackage``:
    ``exports`` maps each of its modules (relative, ``".discover"``) to the names it defines there."""
    package = sys.modules[name]
    package.__dict__["_lazy_exports"] = {export: module for module, names in exports.items() for export in names}
    package.__class__ = LazyPackage
