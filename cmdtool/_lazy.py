"""Modules imported on first use, so that commands that need no torch start without it.

``import torch`` takes over a second; ``cmd --help``, ``cmd info`` and a fit that reuses its
trajectory store never touch torch. Modules write ``from ._lazy import torch``: a stand-in whose
first attribute access imports the real module (then ``sys.modules`` serves every later access).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


class lazy_module:  # noqa: N801 - used like the module it stands for
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)


def lazy_function(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported when first called."""
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    call.__name__ = call.__qualname__ = name
    return call


torch = lazy_module("torch")
save_file = lazy_function("safetensors.torch", "save_file")
