"""cmdtool: Correlation Mode Decomposition (CMD, ICLR 2024) of neural-network training checkpoints."""

__version__ = "0.1.0"

from ._interrupt import quiet_while_importing  # noqa: E402

quiet_while_importing()  # the command line only: Ctrl-C during the imports below is one line, not a traceback

from .errors import CmdError  # noqa: E402
from .pipeline import FitResult, fit, reconstruct, reconstruct_checkpoints, summarize  # noqa: E402
from .online import OnlineCMD, UpdateResult, update, watch  # noqa: E402

__all__ = ["CmdError", "FitResult", "OnlineCMD", "UpdateResult", "__version__", "fit", "reconstruct",
           "reconstruct_checkpoints", "summarize", "update", "watch"]
