"""Online CMD (paper §3.3): keep a mode file up to date while training runs.

Jobs, one module each: ``state`` (the online state, its warm-up ``fit_warmup`` for
``cmd fit --warmup``, and reading one observation), ``update`` (``cmd update``) and ``watch``
(``cmd watch``); ``OnlineCMD`` for training loops is ``cmdtool.training.loop``, its state on the
tensors' device. Nothing here grows with the number
of checkpoints already absorbed, except the ``M × T`` references and the ``T`` names, times and
carried rows, which the mode file holds anyway.
"""

from .state import ONLINECMD_SOURCE, TRAINING_SOURCE, OnlineState, fit_warmup, flatten, read_checkpoint
from .update import UpdateResult, plan_update, update
from .watch import watch

__all__ = ["ONLINECMD_SOURCE", "TRAINING_SOURCE", "OnlineState", "UpdateResult", "fit_warmup", "flatten",
           "plan_update", "read_checkpoint", "update", "watch"]
