"""BatchNorm statistics of weights that were modelled or averaged rather than trained.

A running variance is a variance: it must not be negative, yet a CMD or PCA reconstruction of it
(``a·r(t) + b``) can dip below zero where the run moves fast, and a BatchNorm layer then outputs NaN.
Every writer of such weights (``cmd reconstruct``, ``cmd export``, the report's candidates, the
training callbacks' ``swap_at_end``) clamps those values to 0 and counts them (``Clamped``).

Averaged weights also carry statistics measured on other weights; users recompute them on data
(``torch.optim.swa_utils.update_bn``). ``--recalibrate module:function`` names the user's function
``state_dict -> state_dict`` (or ``None`` when it changed the state dict in place) that does so
(``report.evaluation.run_recalibrate`` calls it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np

if TYPE_CHECKING:
    import torch

NONNEGATIVE_SUFFIXES = ("running_var",)  # tensors that hold a variance

Recalibrate = Callable[[dict], "dict | None"]


def must_stay_nonnegative(name: str) -> bool:
    """Whether the tensor ``name`` holds values that are never negative (a BatchNorm ``running_var``)."""
    return name.rpartition(".")[2] in NONNEGATIVE_SUFFIXES


class Clamped:
    """Counts, per tensor, the values clamped to 0 because they would have been written negative."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def array(self, name: str, values: np.ndarray, times: int = 1) -> np.ndarray:
        """``values`` of tensor ``name`` with negatives set to 0 (a copy when any are; never in place);
        ``times``: how many checkpoints these values are written into."""
        if not must_stay_nonnegative(name):
            return values
        negative = values < 0
        n = int(np.count_nonzero(negative))
        if not n:
            return values
        self.counts[name] = self.counts.get(name, 0) + n * times
        return np.where(negative, np.zeros((), dtype=values.dtype), values)

    def tensor(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """The same for a torch tensor."""
        if not must_stay_nonnegative(name) or not values.is_floating_point():
            return values
        negative = values < 0
        n = int(negative.sum())
        if not n:
            return values
        self.counts[name] = self.counts.get(name, 0) + n
        return values.masked_fill(negative, 0)

    def state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name, value) for name, value in state.items()}

    def to_json(self) -> dict:
        return {"total": self.total, "tensors": dict(self.counts)}

    def sentence(self, where: str) -> str | None:
        """One line for stderr, or None when nothing was clamped."""
        if not self.total:
            return None
        tensors = sorted(self.counts)
        shown = ", ".join(tensors[:3]) + (f" and {len(tensors) - 3} more" if len(tensors) > 3 else "")
        return (f"{self.total} negative running-variance value{'s' * (self.total > 1)} clamped to 0 in {where} "
                f"({shown}); a reconstruction can dip below zero where the run moves fast")
