"""Scoring weights with the user's ``--eval`` function: every candidate family at every epoch.

At every evaluated epoch ``t`` each family gives one set of weights:

- ``original``: the checkpoint ``w(t)``;
- ``cmd``: its CMD reconstruction ``a·r(t) + b`` (what ``cmd reconstruct --at t`` writes);
- ``tail_K``: the mean of the last ``K`` checkpoints up to ``t`` (fewer at the start);
- ``ema``: the running EMA over checkpoints, ``e_0 = w_0``, ``e_t = D·e_{t−1} + (1−D)·w_t``;
- ``pca_d``: the rank-``d`` PCA reconstruction of checkpoint ``t`` (mean + ``d`` directions).

``tail_K`` and ``ema`` use only checkpoints up to ``t``; ``cmd`` and ``pca_d`` are fitted on the
whole run. All but ``cmd`` are linear in the checkpoints and are kept as running sums in float64
over one pass in time order (the PCA directions need one pass before), so scoring every family at
every epoch costs ``O(N)`` memory per family and one read of the trajectory. Integer (carried)
tensors are checkpoint ``t``'s; a running variance is clamped at 0 (counted). ``cmd export``
writes the same weights, computed the same way one block of columns at a time
(``export.TrajectoryFamily``, which ``tests/test_export.py`` checks against ``FamilyWeights``).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from ..reconstruct import assemble_state_dict, state_dict_at
from ..statistics import Clamped
from . import metrics
from .evaluation import run_recalibrate
from .metrics import PCA_RANKS
from .selection import Selection, check_selection, select, split_counts


def evaluation_epochs(T: int, every: int, candidates_only: bool) -> list[int]:
    """Positions scored: every ``every``-th from the first, and always the last; only the last with
    ``candidates_only``."""
    if candidates_only:
        return [T - 1]
    return sorted(set(range(0, T, every)) | {T - 1})


def family_descriptions(names: Sequence[str], tail: Sequence[int], ema_decay: float) -> dict[str, str]:
    T = len(names)
    out = {"original": "the checkpoint", "cmd": "its CMD reconstruction"}
    out.update({f"tail_{k}": f"mean of the last {k} checkpoints up to it"
                + (f" (all: the run has {T})" if k > T else "") for k in tail})
    out["ema"] = f"running EMA over checkpoints, decay {ema_decay:g}"
    out.update({f"pca_{d}": f"PCA of the trajectory, mean + {d} direction{'s' * (d > 1)}, at it" for d in PCA_RANKS})
    return out


def family_names(tail: Sequence[int]) -> list[str]:
    """The candidate families, in the report's order."""
    return ["original", "cmd", *(f"tail_{k}" for k in tail), "ema", *(f"pca_{d}" for d in PCA_RANKS)]


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


class FamilyWeights:
    """Every family but ``cmd`` as flat float64 weights at increasing positions, over one pass in
    time order: ``at(t)`` (``t`` not below the last one asked) gives ``{family: (N,) weights}``.
    Without ``pca`` the PCA families are left out (they need a pass over the trajectory first)."""

    def __init__(self, W, tail: Sequence[int], ema_decay: float, pca: metrics.PCA | None = None):
        self.W, self.tail, self.ema_decay = W, tail, ema_decay
        self.pca = pca
        self.mean, self.directions = pca_basis(W, pca, W.shape[0]) if pca is not None else (None, None)
        self.ema, self.t = None, -1

    def at(self, t: int) -> dict[str, np.ndarray]:
        if t < self.t:
            raise ValueError("positions must be asked in increasing order")
        w = None
        while self.t < t:
            self.t += 1
            w = self.W[self.t].astype(np.float64)
            self.ema = w.copy() if self.t == 0 else self.ema_decay * self.ema + (1 - self.ema_decay) * w
        if w is None:
            w = self.W[t].astype(np.float64)
        flats = {"original": w}
        for k in self.tail:
            flats[f"tail_{k}"] = self.W[max(0, t - k + 1):t + 1].astype(np.float64).mean(axis=0)
        flats["ema"] = self.ema
        if self.pca is not None:
            for d in PCA_RANKS:
                flats[f"pca_{d}"] = self.mean + self.pca.eigenvectors[t, :d] @ self.directions[:d]
        return flats


def flat_state(modes, carried: dict, flat: np.ndarray, t: int, clamped: Clamped) -> dict:
    """A state dict of flat float64 weights (cast to each tensor's dtype; a running variance clamped at
    0) with the integer (carried) tensors of checkpoint ``t``."""
    return assemble_state_dict(modes.layout, lambda s: clamped.array(s.name, flat[s.columns]),
                               lambda s: carried[s.name][t])


def carried_rows(modes, store) -> dict:
    return {tensor.name: store.carried(tensor.name) for tensor in modes.layout.carried}


def score_families(modes, store, evaluate: Callable, spec: str, run_evaluate: Callable, *, tail: Sequence[int],
                   ema_decay: float, pca: metrics.PCA, epochs: Sequence[int], first: dict | None,
                   selection: Selection | None, progress, recalibrate: Callable | None = None,
                   recalibrate_spec: str = "") -> dict:
    """Score every family at ``epochs``; ``first`` is the trial score of checkpoint 0 (reused unless
    ``recalibrate``, the user's function that recomputes BatchNorm statistics of every candidate
    before it is scored). The counts of examples the function reports (``count``) are kept apart.

    Returns the ``evaluation`` section of report.json (docs/formats/report-json.md).
    """
    T, names = modes.T, modes.names
    carried = carried_rows(modes, store)
    descriptions = family_descriptions(names, tail, ema_decay)
    families = list(descriptions)
    first, counts = split_counts(first) if first is not None else (None, {})
    if recalibrate is not None:
        first = None  # the trial scored the checkpoint as stored
    keys = list(first) if first is not None else None
    per_epoch = {family: None for family in families}
    clamped = {family: Clamped() for family in families}
    evaluated = set(epochs)
    count = 0

    def score(state: dict, what: str) -> dict:
        nonlocal count
        if recalibrate is not None:
            state = run_recalibrate(recalibrate, state, what, recalibrate_spec)
        scores, seen = split_counts(run_evaluate(evaluate, state, what, spec))
        for split, n in seen.items():
            counts.setdefault(split, n)
        count += 1
        return scores

    def record(family: str, t: int, scores: dict) -> None:
        nonlocal keys
        if keys is None:
            keys = list(scores)
        if per_epoch[family] is None:
            per_epoch[family] = {k: [math.nan] * T for k in keys}
        for k in keys:
            per_epoch[family][k][t] = scores.get(k, math.nan)

    weights = FamilyWeights(store.W, tail, ema_decay, pca if evaluated else None)
    with progress(f"evaluating {len(families) * len(epochs)} state dicts", len(families) * len(epochs)) as advance:
        for t in sorted(evaluated):
            flats = weights.at(t)
            for family in families:
                if family == "original" and t == 0 and first is not None:
                    scores = first
                elif family == "cmd":
                    scores = score(state_dict_at(modes, t, clamped=clamped["cmd"]),
                                   f"the CMD reconstruction of {names[t]}")
                else:
                    what = f"checkpoint {names[t]}" if family == "original" else f"candidate {family} at {names[t]}"
                    scores = score(flat_state(modes, carried, flats[family], t, clamped[family]), what)
                record(family, t, scores)
                advance(1)

    last = T - 1
    candidates = {("last" if f == "original" else f): {k: v[last] for k, v in per_epoch[f].items()} for f in families}
    candidate_descriptions = {"last": f"the last checkpoint ({names[-1]})",
                              "cmd": "CMD reconstruction of the last checkpoint"}
    candidate_descriptions.update({f"tail_{k}": f"mean of the last {k} checkpoints"
                                   + (f" (all {T}: the run has fewer)" if k > T else "") for k in tail})
    candidate_descriptions["ema"] = f"EMA over checkpoints, decay {ema_decay:g}"
    candidate_descriptions.update({f"pca_{d}": f"PCA of the trajectory, mean + {d} direction{'s' * (d > 1)}, "
                                   "at the last checkpoint" for d in PCA_RANKS})
    epochs = sorted(evaluated)
    unselectable = check_selection(selection, keys)
    selected = None
    if selection is not None and unselectable is None:
        selected = select(per_epoch, epochs, selection, names)
    total = sum(c.total for c in clamped.values())
    return {"function": spec, "checkpoint_names": names,
            "per_checkpoint": {"original": per_epoch["original"], "cmd": per_epoch["cmd"]},
            "candidates": candidates, "candidate_descriptions": candidate_descriptions,
            "epochs": epochs, "evaluations": count + (first is not None or recalibrate is not None),  # the trial
            "per_epoch": per_epoch, "family_descriptions": descriptions,
            "selection": selected, "selection_impossible": unselectable,
            "counts": counts, "recalibrated": recalibrate_spec or None, "ema_decay": ema_decay,
            "clamped_running_var": {"total": total, "families": {f: c.to_json() for f, c in clamped.items()
                                                                 if c.total}}}


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
