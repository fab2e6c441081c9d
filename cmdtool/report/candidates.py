"""Scoring weights with the user's ``--eval`` function: every candidate family at every epoch.

At every evaluated epoch ``t`` each family gives one set of weights:

- ``original``: the SGD checkpoint ``w(t)``;
- ``cmd``: its CMD reconstruction ``a·r(t) + b`` (what ``cmd reconstruct --at t`` writes);
- ``tail_K``: the mean of the last ``K`` checkpoints up to ``t`` (fewer at the start);
- ``ema``: the running EMA over checkpoints, ``e_0 = w_0``, ``e_t = D·e_{t−1} + (1−D)·w_t``;
- ``pca_d``: the rank-``d`` PCA reconstruction of checkpoint ``t`` (mean + ``d`` directions).

``tail_K`` and ``ema`` use only checkpoints up to ``t``; ``cmd`` and ``pca_d`` are fitted on the
whole run. All but ``cmd`` are linear in the checkpoints and are kept as running sums in float64
over one pass in time order (the PCA directions need one pass before), so scoring every family at
every epoch costs ``O(N)`` memory per family and one read of the trajectory. Integer (carried)
tensors are checkpoint ``t``'s.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from ..reconstruct import assemble_state_dict, state_dict_at
from . import metrics
from .metrics import PCA_RANKS
from .selection import Selection, check_selection, select


def evaluation_epochs(T: int, every: int, candidates_only: bool) -> list[int]:
    """Positions scored: every ``every``-th from the first, and always the last; only the last with
    ``candidates_only``."""
    if candidates_only:
        return [T - 1]
    return sorted(set(range(0, T, every)) | {T - 1})


def family_descriptions(names: Sequence[str], tail: Sequence[int], ema_decay: float) -> dict[str, str]:
    out = {"original": "the SGD checkpoint", "cmd": "its CMD reconstruction"}
    out.update({f"tail_{k}": f"mean of the last {k} checkpoints up to it" for k in tail})
    out["ema"] = f"running EMA over checkpoints, decay {ema_decay:g}"
    out.update({f"pca_{d}": f"PCA of the trajectory, mean + {d} direction{'s' * (d > 1)}, at it" for d in PCA_RANKS})
    return out


def pca_basis(W, pca: metrics.PCA, T: int) -> tuple[np.ndarray, np.ndarray]:
    """``mean (N,)`` and ``Σ_s U[s, k] w(s)`` for ``k < max(PCA_RANKS)`` (``(d, N)``), in float64: the
    rank-``d`` reconstruction of checkpoint ``t`` is ``mean + Σ_{k<d} U[t, k] · directions[k]``,
    the same combination as ``PCA.weights_at``."""
    d = max(PCA_RANKS)
    U = pca.eigenvectors[:, :d]
    mean = np.zeros(W.shape[1])
    directions = np.zeros((d, W.shape[1]))
    for t in range(T):
        row = W[t].astype(np.float64)
        mean += row / T
        directions += U[t][:, None] * row[None, :]
    return mean, directions


def score_families(modes, store, evaluate: Callable, spec: str, run_evaluate: Callable, *, tail: Sequence[int],
                   ema_decay: float, pca: metrics.PCA, epochs: Sequence[int], first: dict | None,
                   selection: Selection | None, progress) -> dict:
    """Score every family at ``epochs``; ``first`` is the trial score of checkpoint 0 (reused).

    Returns the ``evaluation`` section of report.json (see the README).
    """
    T, names = modes.T, modes.names
    carried = {tensor.name: store.carried(tensor.name) for tensor in modes.layout.carried}
    descriptions = family_descriptions(names, tail, ema_decay)
    families = list(descriptions)
    keys = list(first) if first is not None else None
    per_epoch = {family: None for family in families}
    evaluated = set(epochs)
    count = 0

    def state(flat: np.ndarray, t: int) -> dict:
        return assemble_state_dict(modes.layout, lambda s: flat[s.columns], lambda s: carried[s.name][t])

    def record(family: str, t: int, scores: dict) -> None:
        nonlocal keys
        if keys is None:
            keys = list(scores)
        if per_epoch[family] is None:
            per_epoch[family] = {k: [math.nan] * T for k in keys}
        for k in keys:
            per_epoch[family][k][t] = scores.get(k, math.nan)

    mean, directions = pca_basis(store.W, pca, T) if evaluated else (None, None)
    ema = None
    with progress(f"evaluating {len(families) * len(epochs)} state dicts", len(families) * len(epochs)) as advance:
        for t in range(T):
            w = store.W[t].astype(np.float64)
            ema = w.copy() if t == 0 else ema_decay * ema + (1 - ema_decay) * w
            if t not in evaluated:
                continue
            flats = {"original": w}
            for k in tail:
                window = store.W[max(0, t - k + 1):t + 1].astype(np.float64)
                flats[f"tail_{k}"] = window.mean(axis=0)
            flats["ema"] = ema
            for d in PCA_RANKS:
                flats[f"pca_{d}"] = mean + pca.eigenvectors[t, :d] @ directions[:d]
            for family in families:
                if family == "original" and t == 0 and first is not None:
                    scores = first
                elif family == "cmd":
                    scores = run_evaluate(evaluate, state_dict_at(modes, t), f"the CMD reconstruction of {names[t]}",
                                          spec)
                    count += 1
                else:
                    what = f"checkpoint {names[t]}" if family == "original" else f"candidate {family} at {names[t]}"
                    scores = run_evaluate(evaluate, state(flats[family], t), what, spec)
                    count += 1
                record(family, t, scores)
                advance(1)

    last = T - 1
    candidates = {("last" if f == "original" else f): {k: v[last] for k, v in per_epoch[f].items()} for f in families}
    candidate_descriptions = {"last": f"the last checkpoint ({names[-1]})",
                              "cmd": "CMD reconstruction of the last checkpoint"}
    candidate_descriptions.update({f"tail_{k}": f"mean of the last {min(k, T)} checkpoints" for k in tail})
    candidate_descriptions["ema"] = f"EMA over checkpoints, decay {ema_decay:g}"
    candidate_descriptions.update({f"pca_{d}": f"PCA of the trajectory, mean + {d} direction{'s' * (d > 1)}, "
                                   "at the last checkpoint" for d in PCA_RANKS})
    epochs = sorted(evaluated)
    unselectable = check_selection(selection, keys)
    selected = None
    if selection is not None and unselectable is None:
        selected = select(per_epoch, epochs, selection, names)
    return {"function": spec, "checkpoint_names": names,
            "per_checkpoint": {"original": per_epoch["original"], "cmd": per_epoch["cmd"]},
            "candidates": candidates, "candidate_descriptions": candidate_descriptions,
            "epochs": epochs, "evaluations": count + (first is not None),  # the trial call included
            "per_epoch": per_epoch, "family_descriptions": descriptions,
            "selection": selected, "selection_impossible": unselectable}


def trial(evaluate: Callable, store, modes, spec: str, run_evaluate: Callable, selection: Selection | None) -> dict:
    """The user's function on the first checkpoint, before any long pass: a failing function or a
    ``--select`` metric it does not return is reported at once."""
    modes.require_whole("scoring CMD reconstructions with --eval")
    carried = {tensor.name: store.carried(tensor.name) for tensor in modes.layout.carried}
    w = store.W[0].astype(np.float64)
    scores = run_evaluate(evaluate, assemble_state_dict(modes.layout, lambda s: w[s.columns],
                                                        lambda s: carried[s.name][0]),
                          f"checkpoint {modes.names[0]}", spec)
    check_selection(selection, list(scores))
    return scores
