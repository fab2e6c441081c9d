"""Online CMD (paper §3.3): keep a mode file up to date while training runs.

Jobs, one module each: ``state`` (the online state, its warm-up ``fit_warmup`` for
``cmd fit --warmup``, and reading one observation), ``update`` (``cmd update``), ``watch``
(``cmd watch``) and ``loop`` (``OnlineCMD`` for training loops). Nothing here grows with the number
of checkpoints already absorbed, except the ``M × T`` references and the ``T`` names, times and
carried rows, which the mode file holds anyway.
"""

from .loop import ONLINECMD_SOURCE, TRAINING_SOURCE, OnlineCMD
from .state import OnlineState, fit_warmup, flatten, read_checkpoint
from .update import UpdateResult, plan_update, update
from .watch import watch

__all__ = ["ONLINECMD_SOURCE", "TRAINING_SOURCE", "OnlineCMD", "OnlineState", "UpdateResult", "fit_warmup", "flatten", "plan_update",
           "read_checkpoint", "update", "watch"]
