"""Scoring weights with the user's function: every checkpoint (original and CMD reconstruction)
and the final candidates one would keep instead (last checkpoint, tail averages, EMA, PCA)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..modefile import ModeFile
from ..progress import Progress
from ..reconstruct import assemble_state_dict, state_dict_at
from ..trajectory import TrajectoryStore
from . import metrics
from .evaluation import run_evaluate
from .metrics import PCA_RANKS


def evaluate_all(modes: ModeFile, store: TrajectoryStore, evaluate, spec: str, tail: Sequence[int],
                  ema_decay: float, pca: metrics.PCA, progress: Progress) -> dict:
    """Score every checkpoint (original and CMD) and the final candidates with the user's function."""
    T = modes.T
    carried = {tensor.name: store.carried(tensor.name) for tensor in modes.layout.carried}

    def combination(weights: np.ndarray, carried_from: int) -> dict:
        """``Σ_t weights[t] · w(t)`` as a state dict; carried tensors from checkpoint ``carried_from``."""
        flat = np.zeros(modes.N)
        for t in np.flatnonzero(weights):
            flat += weights[t] * store.W[t].astype(np.float64)
        return assemble_state_dict(modes.layout, lambda s: flat[s.columns],
                                   lambda s: carried[s.name][carried_from])

    original, cmd = {}, {}
    with progress("evaluating checkpoints", 2 * T) as advance:
        for t in range(T):
            scores = run_evaluate(evaluate, combination(metrics.unit_weights(T, t), t),
                                  f"checkpoint {modes.names[t]}", spec)
            advance(1)
            reconstructed = run_evaluate(evaluate, state_dict_at(modes, t), f"the CMD reconstruction of {modes.names[t]}", spec)
            advance(1)
            for key in scores:
                original.setdefault(key, []).append(scores[key])
                cmd.setdefault(key, []).append(reconstructed.get(key, math.nan))

    candidates = {"last": {"description": f"the last checkpoint ({modes.names[-1]})", "weights": metrics.unit_weights(T, T - 1)},
                  "cmd": {"description": "CMD reconstruction of the last checkpoint", "weights": None}}
    for k in tail:
        candidates[f"tail_{k}"] = {"description": f"mean of the last {min(k, T)} checkpoints",
                                   "weights": metrics.tail_weights(T, k)}
    candidates["ema"] = {"description": f"EMA over checkpoints, decay {ema_decay:g}",
                         "weights": metrics.ema_weights(T, ema_decay)}
    for d in PCA_RANKS:
        candidates[f"pca_{d}"] = {"description": f"PCA of the trajectory, mean + {d} direction{'s' * (d > 1)}, at the last checkpoint",
                                  "weights": pca.weights_at(d, T - 1)}
    scores = {}
    with progress("evaluating final candidates", len(candidates)) as advance:
        for name, candidate in candidates.items():
            if name == "last":
                scores[name] = {k: v[-1] for k, v in original.items()}
            elif name == "cmd":
                scores[name] = {k: v[-1] for k, v in cmd.items()}
            else:
                scores[name] = run_evaluate(evaluate, combination(candidate["weights"], T - 1),
                                            f"candidate {name}", spec)
            advance(1)
    return {"function": spec, "checkpoint_names": modes.names, "per_checkpoint": {"original": original, "cmd": cmd},
            "candidates": scores,
            "candidate_descriptions": {name: c["description"] for name, c in candidates.items()}}
