"""cmdtool: Correlation Mode Decomposition (CMD, ICLR 2024) of neural-network training checkpoints.

``cmdtool.CMD`` is the estimator on arrays and state dicts; ``fit``, ``update``, ``watch`` and
``reconstruct`` are the commands as library calls. Names are imported from their modules on first
use, so ``import cmdtool`` is quick and loads neither numpy's users nor torch.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_package
from .errors import CmdError
from .version import __version__

if TYPE_CHECKING:  # the same names, for editors and the API pages, which read the code without running it
    from .estimator import CMD
    from .fitting import fit_trajectory
    from .modefile import open_mode_file, summarize, write_mode_file
    from .modes import FitMetrics, FitSettings, Modes
    from .online import UpdateResult, update, watch
    from .pipeline import FitResult, fit, reconstruct, reconstruct_checkpoints
    from .training.loop import OnlineCMD

__all__ = ["CMD", "CmdError", "FitMetrics", "FitResult", "FitSettings", "Modes", "OnlineCMD", "UpdateResult",
           "__version__", "fit", "fit_trajectory", "open_mode_file", "reconstruct", "reconstruct_checkpoints",
           "summarize", "update", "watch", "write_mode_file"]

lazy_package(__name__, {
    ".estimator": ("CMD",),
    ".fitting": ("fit_trajectory",),
    ".modefile": ("open_mode_file", "summarize", "write_mode_file"),
    ".modes": ("FitMetrics", "FitSettings", "Modes"),
    ".online": ("UpdateResult", "update", "watch"),
    ".pipeline": ("FitResult", "fit", "reconstruct", "reconstruct_checkpoints"),
    ".training.loop": ("OnlineCMD",),
})
