"""cmdtool: Correlation Mode Decomposition (CMD, ICLR 2024) of neural-network training checkpoints."""

from ._interrupt import quiet_while_importing  # noqa: F401 - first: as the command line, Ctrl-C here is one line
from .errors import CmdError
from .fitting import fit_trajectory
from .modefile import open_mode_file, summarize, write_mode_file
from .modes import FitMetrics, FitSettings, Modes
from .online import UpdateResult, update, watch
from .pipeline import FitResult, fit, reconstruct, reconstruct_checkpoints
from .version import __version__

__all__ = ["CmdError", "FitMetrics", "FitResult", "FitSettings", "Modes", "OnlineCMD", "UpdateResult", "__version__",
           "fit", "fit_trajectory", "open_mode_file", "reconstruct", "reconstruct_checkpoints", "summarize", "update",
           "watch", "write_mode_file"]


def __getattr__(name: str):
    """``cmdtool.OnlineCMD`` is imported on first use: it lives with ``cmdtool.training`` (torch), and
    ``import cmdtool`` imports no torch."""
    if name == "OnlineCMD":
        from .training.loop import OnlineCMD
        return OnlineCMD
    raise AttributeError(f"module 'cmdtool' has no attribute {name!r}")
