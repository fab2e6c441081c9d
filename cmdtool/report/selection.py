"""Selection-honest evaluation: choose each candidate family's best epoch on a validation split and
report it on the other splits, as functions on the scores (no files, no evaluation calls).

An ``--eval`` function returns either flat metrics ``{"accuracy": 0.9, "loss": 0.3}`` or metrics per
named split ``{"val": {...}, "test": {...}}``; the report keys the latter ``"val/accuracy"``,
``"test/accuracy"``, … A split named ``val``, ``valid`` or ``validation`` is the one selection looks
at; every other split is reported. Choosing an epoch on the very numbers one then reports flatters
whichever family has the most epochs to pick from, so without a validation split there is no
selection, and the report says why.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Sequence

from ..errors import CmdError

VALIDATION_SPLITS = ("val", "valid", "validation")
SEPARATOR = "/"
_LOWER_IS_BETTER = ("loss", "error", "err", "nll", "perplexity", "ppl", "mse", "mae", "rmse", "fid")


class Selection(NamedTuple):
    """``--select METRIC[:max|min]``."""
    metric: str
    direction: str  # "max" or "min"


def parse_select(text: str) -> Selection:
    """``accuracy`` (direction from the name: ``max`` unless it names a loss or an error),
    ``accuracy:max``, ``loss:min``."""
    metric, sep, direction = text.strip().rpartition(":")
    if not sep:
        metric, direction = text.strip(), default_direction(text.strip())
    if not metric or direction not in ("max", "min"):
        raise CmdError(f"select {text!r}: expected METRIC, METRIC:max or METRIC:min, e.g. accuracy or loss:min",
                       parameter="select")
    return Selection(metric, direction)


COUNT = "count"  # the number of examples a split was scored on: not a metric, the sampling error's n


def split_counts(scores: Mapping[str, float]) -> tuple[dict[str, float], dict[str, int]]:
    """The metrics apart from the ``count`` entries: ``({"test/accuracy": …}, {"test": 699})``; a flat
    ``count`` is keyed ``""``."""
    metrics, counts = {}, {}
    for key, value in scores.items():
        split, _, name = key.rpartition(SEPARATOR)
        if name == COUNT:
            if value is not None and math.isfinite(value) and value > 0:
                counts[split] = int(value)
        else:
            metrics[key] = value
    return metrics, counts


def default_direction(metric: str) -> str:
    """``min`` for metrics whose name says lower is better (loss, error, nll, perplexity, …), else ``max``."""
    words = metric.lower().replace("-", "_").split("_")
    return "min" if any(w in _LOWER_IS_BETTER for w in words) or "loss" in metric.lower() else "max"


def flatten_scores(result: Mapping, what: str, spec: str) -> dict[str, float]:
    """The user's answer as ``{key: float}``: flat metrics as they are, split metrics as ``split/metric``."""
    if not isinstance(result, Mapping) or not result:
        raise CmdError(f"evaluate {spec}: returned {type(result).__name__} on {what}, expected a dict of metrics",
                       parameter="evaluate")
    nested = [isinstance(v, Mapping) for v in result.values()]
    if any(nested) and not all(nested):
        raise CmdError(f"evaluate {spec}: on {what} some values are dicts and some are not; return either "
                       "{metric: value} or {split: {metric: value}}", parameter="evaluate")
    items = list(result.items())
    if all(nested):
        items = [(f"{split}{SEPARATOR}{key}", value)
                 for split, scores in result.items() for key, value in scores.items()]
    if not items:
        raise CmdError(f"evaluate {spec}: returned no metrics on {what}, expected a dict of metrics",
                       parameter="evaluate")
    scores = {}
    for key, value in items:
        try:
            scores[str(key)] = float(value)
        except OverflowError:  # an int beyond any float: 10**400
            raise CmdError(f"evaluate {spec}: metric {key!r} on {what} is an integer too large for a float",
                           parameter="evaluate") from None
        except (TypeError, ValueError):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise CmdError(f"evaluate {spec}: metric {key!r} on {what} is {shown}, not a number",
                           parameter="evaluate") from None
    return scores


def splits_of(keys: Sequence[str]) -> dict[str, list[str]]:
    """``{split: [metric, …]}`` of ``split/metric`` keys; ``{}`` for flat metrics."""
    out: dict[str, list[str]] = {}
    for key in keys:
        split, sep, metric = key.partition(SEPARATOR)
        if not sep:
            return {}
        out.setdefault(split, []).append(metric)
    return out


def validation_split(keys: Sequence[str]) -> str | None:
    splits = splits_of(keys)
    return next((s for s in VALIDATION_SPLITS if s in splits), None)


def check_selection(selection: Selection | None, keys: Sequence[str]) -> str | None:
    """Why selection is impossible with these metrics (a sentence for the report), or None when it
    can proceed; raises when ``--select`` names a metric the validation split does not have."""
    if selection is None:
        return None
    split = validation_split(keys)
    if split is None:
        found = ", ".join(splits_of(keys)) or "none: the metrics are flat"
        return (f"`--select {selection.metric}` cannot choose a checkpoint without bias: the evaluation returned no "
                f"validation split (a split named {' / '.join(VALIDATION_SPLITS)}; splits found: {found}). Choosing "
                "the best checkpoint on the numbers that are then reported favours whichever candidate has the most "
                "checkpoints to pick from; return {\"val\": {...}, \"test\": {...}} to select honestly.")
    if f"{split}{SEPARATOR}{selection.metric}" not in keys:
        raise CmdError(f"select {selection.metric}: the evaluation's {split!r} split has no metric "
                       f"{selection.metric!r} (it returned {', '.join(splits_of(keys)[split])})", parameter="select")
    return None


def _better(direction: str):
    return (lambda x, y: x > y) if direction == "max" else (lambda x, y: x < y)


def select(per_epoch: Mapping[str, Mapping[str, Sequence[float]]], epochs: Sequence[int], selection: Selection,
           names: Sequence[str]) -> dict:
    """Each family's best evaluated epoch on ``val/<metric>`` (ties: the earliest), with every score
    of that epoch; ``chosen`` is the family whose chosen epoch is best on validation (ties: the first
    family). Families whose validation score is never finite are left out."""
    keys = list(next(iter(per_epoch.values())))
    split = validation_split(keys)
    key = f"{split}{SEPARATOR}{selection.metric}"
    better = _better(selection.direction)
    rows = []
    for family, scores in per_epoch.items():
        best = None
        for t in epochs:
            value = scores[key][t]
            if math.isfinite(value) and (best is None or better(value, scores[key][best])):
                best = t
        if best is not None:
            rows.append({"family": family, "epoch": best, "checkpoint": names[best],
                         "scores": {k: scores[k][best] for k in keys}})
    chosen = None
    for row in rows:
        if chosen is None or better(row["scores"][key], chosen["scores"][key]):
            chosen = row
    reported = [k for k in keys if not k.startswith(f"{split}{SEPARATOR}")]
    return {"metric": selection.metric, "direction": selection.direction, "split": split, "key": key,
            "reported": reported, "epochs_considered": len(epochs), "rows": rows,
            "chosen": chosen["family"] if chosen else None}


def best_index(values: Sequence[float | None], metric: str) -> int | None:
    """Position of the best finite value under the metric's default direction (ties: the first)."""
    better = _better(default_direction(metric.rpartition(SEPARATOR)[2]))
    best = None
    for i, v in enumerate(values):
        if v is not None and math.isfinite(v) and (best is None or better(v, values[best])):
            best = i
    return best


def nonfinite_summary(per_epoch: Mapping[str, Mapping[str, Sequence[float]]], epochs: Sequence[int],
                      names: Sequence[str]) -> str | None:
    """One sentence counting the scores that are not finite, per family, instead of one entry each."""
    parts, total = [], 0
    for family, scores in per_epoch.items():
        bad = [(k, t) for k, values in scores.items() for t in epochs if not math.isfinite(values[t])]
        if not bad:
            continue
        total += len(bad)
        at = sorted({t for _, t in bad})
        where = names[at[0]] if len(at) == 1 else f"{names[at[0]]} … {names[at[-1]]}"
        metrics = sorted({k for k, _ in bad})
        parts.append(f"{family} {len(bad)} ({len(at)} position{'s' * (len(at) > 1)}, {where}; {', '.join(metrics)})")
    if not parts:
        return None
    evaluated = sum(len(scores) * len(epochs) for scores in per_epoch.values())
    return f"{total} of {evaluated} scores: " + "; ".join(parts)
