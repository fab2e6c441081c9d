"""Modules imported on first use, so that commands that need no torch start without it.

``import torch`` takes over a second; ``cmd --help``, ``cmd info`` and fitting, updating or
reconstructing a run of safetensors checkpoints in numpy dtypes never touch torch. Modules write
``from ._lazy import torch``: a stand-in whose
first attribute access imports the real module (then ``sys.modules`` serves every later access).
"""

from __future__ import annotations

import importlib
from typing import Any


class lazy_module:  # noqa: N801 - used like the module it stands for
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
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
