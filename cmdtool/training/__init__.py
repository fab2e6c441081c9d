"""CMD alongside a live model (paper §3.3 online CMD, §3.4 embedded CMD): ``EmbeddedCMD``, and
``OnlineCMD`` fed state dicts.

The state lives on the model's device as torch tensors; no training framework is imported here
(``cmdtool.integrations`` holds the thin Lightning and Hugging Face callbacks).
"""

from .embedded import EmbeddedCMD, TrainingSettings
from .loop import OnlineCMD

__all__ = ["EmbeddedCMD", "OnlineCMD", "TrainingSettings"]
