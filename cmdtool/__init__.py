"""cmdtool: Correlation Mode Decomposition (CMD, ICLR 2024) of neural-network training checkpoints."""

from .errors import CmdError
from .fitting import fit_trajectory
from .modefile import open_mode_file, summarize, write_mode_file
from .modes import FitMetrics, FitSettings, Modes
from .online import OnlineCMD, UpdateResult, update, watch
from .pipeline import FitResult, fit, reconstruct, reconstruct_checkpoints
from .version import __version__

__all__ = ["CmdError", "FitMetrics", "FitResult", "FitSettings", "Modes", "OnlineCMD", "UpdateResult", "__version__",
           "fit", "fit_trajectory", "open_mode_file", "reconstruct", "reconstruct_checkpoints", "summarize", "update",
           "watch", "write_mode_file"]
