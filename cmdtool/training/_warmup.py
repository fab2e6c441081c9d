"""The warm-up fit of a training run: post-hoc CMD of the first ``F`` observations, by the very
code of ``cmd fit`` (one code path). A thin adapter over today's pipeline, to be replaced by the
public in-memory fit (``cmdtool.fitting.decompose``) when it lands."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..checkpoints import CheckpointInfo
from ..layout import Layout
from ..online import OnlineState, _TrajectoryView, _warmup_state, moving_parameters
from ..pipeline import no_progress


@dataclass
class _InMemory(_TrajectoryView):
    """The warm-up rows, with the files a Hugging Face folder copies back (config.json, ...)."""
    files: dict | None = None

    def attachments(self) -> dict[str, bytes]:
        return dict(self.files or {})


def warmup_state(rows: np.ndarray, layout: Layout, time: Sequence[int], names: Sequence[str],
                 infos: Sequence[CheckpointInfo], carried: Mapping[str, np.ndarray], settings: dict,
                 attachments: Mapping[str, bytes] | None = None) -> OnlineState:
    """Modes, references and the fit of the ``(F, N)`` float32 ``rows``, as an online state
    (numpy, float64 ``a, b``): what ``cmd fit --warmup F`` holds after its warm-up."""
    view = _InMemory(None, layout, np.asarray(time, dtype=np.int64), list(names), list(infos),
                     moving_parameters(rows), rows, carried_rows=dict(carried), files=dict(attachments or {}))
    with tempfile.TemporaryDirectory(prefix="cmdtool-training-") as folder:
        state = _warmup_state(view, settings, None, no_progress, Path(folder))
    return state
