"""Online CMD (paper §3.3): keep a mode file up to date while training runs.

Jobs, one module each: ``least_squares`` (the update itself, on numpy arrays or torch tensors),
``state`` (the online state, its warm-up ``fit_warmup`` for ``cmd fit --warmup``, and reading one
observation), ``update`` (``cmd update``) and ``watch`` (``cmd watch``); ``OnlineCMD`` for training
loops lives in ``cmdtool.training.loop``, its state on the observed tensors' device. Nothing here
grows with the number of checkpoints already absorbed, except the ``M × T`` references and the
``T`` names, times and carried rows, which the mode file holds anyway. Names are imported from their
modules on first use.
"""

from .._lazy import lazy_package

__all__ = ["OnlineCMD", "OnlineState", "UpdateResult", "fit_warmup", "update", "watch"]

lazy_package(__name__, {
    ".state": ("OnlineState", "fit_warmup", "flatten", "read_checkpoint"),
    ".update": ("UpdateResult", "plan_update", "update"),
    ".watch": ("watch",),
    "..modes": ("ONLINECMD_SOURCE", "TRAINING_SOURCE"),
    "..training.loop": ("OnlineCMD",),
})
