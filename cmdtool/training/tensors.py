"""Small operations on the state's tensors, written for speed on the CPU (numpy there)."""

from __future__ import annotations

import numpy as np
import torch


def count_true(mask: torch.Tensor) -> int:
    """The number of True in a bool tensor (numpy on the CPU: torch's sum of bools is 100× slower there)."""
    return int(np.count_nonzero(mask.numpy())) if mask.device.type == "cpu" else int(mask.sum())


def nonzero(mask: torch.Tensor) -> torch.Tensor:
    """The positions of True in a 1-D bool tensor, sorted, int64 (numpy on the CPU: 4× faster there)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask).reshape(-1)


def address(tensor: torch.Tensor, column: int) -> int:
    """The address of ``tensor[column]`` (a contiguous CPU tensor)."""
    return tensor.data_ptr() + column * tensor.element_size()
