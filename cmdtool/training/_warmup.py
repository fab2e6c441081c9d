"""The warm-up of a training run: post-hoc CMD of the first ``F`` observations by the very fit of
``cmd fit`` (``fitting.fit_trajectory``, one code path), as the online state ``cmd update`` uses."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..checkpoints import CheckpointInfo
from ..fitting import fit_trajectory
from ..layout import Layout
from ..modes import FitSettings
from ..online.state import OnlineState, warmup_trajectory


def warmup_state(rows: np.ndarray, layout: Layout, time: Sequence[int], names: Sequence[str],
                 infos: Sequence[CheckpointInfo], carried: Mapping[str, np.ndarray], settings: FitSettings,
                 attachments: Mapping[str, bytes] | None = None) -> OnlineState:
    """Modes, references and the fit of the ``(F, N)`` float32 ``rows``, as an online state
    (numpy, float64 ``a, b``): what ``cmd fit --warmup F`` holds after its warm-up."""
    trajectory = warmup_trajectory(rows, layout, list(time), list(names), list(infos), carried, attachments or {})
    return OnlineState.from_modes(fit_trajectory(trajectory, settings), rows[0])


def carried_rows(state: OnlineState) -> dict[str, list[np.ndarray]]:
    """Every carried tensor's rows of an online state held in memory (a warm-up's), per checkpoint."""
    out = {}
    for name, before in state.carried_before.items():
        blocks = before.blocks() if hasattr(before, "blocks") else [before]
        out[name] = [row for block in blocks for row in np.asarray(block)] + list(state.carried_new[name])
    return out
