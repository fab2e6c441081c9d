"""cmdtool: Correlation Mode Decomposition (CMD, ICLR 2024) of neural-network training checkpoints."""

__version__ = "0.1.0"

from .errors import CmdError  # noqa: E402
from .fitting import fit_trajectory  # noqa: E402
from .modefile import open_mode_file, summarize, write_mode_file  # noqa: E402
from .modes import FitMetrics, FitSettings, Modes  # noqa: E402
from .online import OnlineCMD, UpdateResult, update, watch  # noqa: E402
from .pipeline import FitResult, fit, reconstruct, reconstruct_checkpoints  # noqa: E402

__all__ = ["CmdError", "FitMetrics", "FitResult", "FitSettings", "Modes", "OnlineCMD", "UpdateResult", "__version__",
           "fit", "fit_trajectory", "open_mode_file", "reconstruct", "reconstruct_checkpoints", "summarize", "update",
           "watch", "write_mode_file"]
