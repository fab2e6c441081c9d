"""CMD alongside a live model (paper §3.3 online CMD, §3.4 embedded CMD): ``EmbeddedCMD``, and
``OnlineCMD`` fed state dicts.

The state lives on the model's device as torch tensors; no training framework is imported here
(``cmdtool.integrations`` holds the thin Lightning and Hugging Face callbacks). Names are imported
from their modules on first use.
"""

from .._lazy import lazy_package

__all__ = ["EmbeddedCMD", "OnlineCMD", "TrainingSettings"]

lazy_package(__name__, {".embedded": ("EmbeddedCMD",), ".loop": ("OnlineCMD",), ".settings": ("TrainingSettings",)})
