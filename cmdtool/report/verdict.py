"""The report's answer first: did CMD help on this run? As functions on the report's numbers.

In order: the thresholds' pass/FAIL (for CI); then, per metric (the ``--select`` one, else each
metric returned), CMD at the last checkpoint against the checkpoint and against the best cheap
alternative (tail means, EMA), and, under selection on validation, which family wins on test and
by how much, CMD against the best other family. Without ``--eval``, modelling only: CMD against
PCA of the trajectory at equal bytes.

A difference smaller than the evaluation's sampling error is a tie. For accuracies (and error
rates) scored on ``n`` examples, the standard error of a difference of two proportions near ``p``
is ``sqrt(2·p(1−p)/n)`` (the two scores taken as independent, which overstates it for two models
scored on the same examples: the rule errs towards calling ties). The rule: ``|Δ| < 2·sqrt(2·p(1−p)/n)``,
``p`` the mean of the two values, ``n`` the split's ``count``. Without a count, or for other
metrics (losses), the noise is unknown and only exact equality is a tie.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from .selection import SEPARATOR, VALIDATION_SPLITS, default_direction

PROPORTION_WORDS = ("accuracy", "acc", "top1", "top5", "error", "err", "error_rate")
CHEAP = ("tail_", "ema")  # the alternatives a user keeps instead of CMD at no extra cost
RULE = "|Δ| < 2·sqrt(2·p(1−p)/n)"


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def is_proportion(key: str) -> bool:
    name = key.rpartition(SEPARATOR)[2].lower().replace("-", "_")
    return name in PROPORTION_WORDS or any(w in ("accuracy", "acc") for w in name.split("_"))


def margin(a: float, b: float, key: str, counts: Mapping[str, int]) -> float | None:
    """Twice the binomial standard error of ``a − b`` (see the module), or None when unknown."""
    n = counts.get(key.rpartition(SEPARATOR)[0])
    if not n or not is_proportion(key) or not (0 <= a <= 1 and 0 <= b <= 1):
        return None
    p = (a + b) / 2
    return 2 * math.sqrt(2 * p * (1 - p) / n)


def compare(a, b, key: str, direction: str, counts: Mapping[str, int]) -> dict:
    """``a`` against ``b`` on ``key``: ``outcome`` better / worse / tie (within the sampling error)
    / unknown (a value is missing), the signed ``difference`` and the tie ``margin`` (None: unknown)."""
    if not (_finite(a) and _finite(b)):
        return {"difference": None, "margin": None, "outcome": "unknown"}
    difference = a - b
    m = margin(a, b, key, counts)
    gain = difference if direction == "max" else -difference
    if difference == 0 or (m is not None and abs(difference) < m):
        outcome = "tie"
    else:
        outcome = "better" if gain > 0 else "worse"
    return {"difference": difference, "margin": m, "outcome": outcome}


def tied_with_best(values: Mapping[str, float], key: str, direction: str, counts: Mapping[str, int]) -> list[str]:
    """The names whose value is the best or within the sampling error of it (the bold and ★ marks)."""
    finite = {name: v for name, v in values.items() if _finite(v)}
    if not finite:
        return []
    best = (max if direction == "max" else min)(finite.values())
    return [name for name, v in finite.items() if compare(v, best, key, direction, counts)["outcome"] == "tie"]


def _n(value) -> str:
    return "–" if not _finite(value) else f"{value:.4g}"


def _d(difference: float) -> str:
    return f"{difference:+.2g}"


def _delta(c: dict) -> str:
    """``+0.1: ahead, beyond the sampling error ±0.027``, ``-0.0043: a tie within ±0.024``."""
    if c["outcome"] == "unknown":
        return "not comparable: a score is missing"
    text = _d(c["difference"])
    if c["outcome"] == "tie":
        return text + (f": a tie within ±{c['margin']:.2g}" if c["margin"] is not None and c["difference"] else
                       ": equal")
    word = "ahead" if c["outcome"] == "better" else "behind"
    return text + f": {word}" + (f", beyond the sampling error ±{c['margin']:.2g}" if c["margin"] is not None else "")


def reported_key(metric: str, keys: Sequence[str]) -> str | None:
    """The key a metric is judged on: the first non-validation split that has it, or the flat metric."""
    if metric in keys:
        return metric
    for key in keys:
        split, _, name = key.rpartition(SEPARATOR)
        if name == metric and split not in VALIDATION_SPLITS:
            return key
    return None


def _metrics_judged(evaluation: dict) -> list[tuple[str, str, str]]:
    """``(metric, key, direction)`` for the ``--select`` metric, else every metric returned."""
    keys = list(evaluation["per_checkpoint"]["original"])
    selection = evaluation.get("selection")
    if selection:
        names, direction = [selection["metric"]], selection["direction"]
    else:
        names, direction = list(dict.fromkeys(k.rpartition(SEPARATOR)[2] for k in keys)), None
    out = []
    for name in names:
        key = reported_key(name, keys)
        if key is not None:
            out.append((name, key, direction or default_direction(name)))
    return out


def _at_last(evaluation: dict, key: str, direction: str, counts: Mapping[str, int]) -> dict:
    candidates = evaluation["candidates"]
    names = evaluation["checkpoint_names"]
    cmd, last = candidates["cmd"].get(key), candidates["last"].get(key)
    cheap = {name: scores.get(key) for name, scores in candidates.items() if name.startswith(CHEAP)}
    finite = {name: v for name, v in cheap.items() if _finite(v)}
    best = None
    if finite:
        best = (max if direction == "max" else min)(finite, key=finite.get)
    vs_last = compare(cmd, last, key, direction, counts)
    vs_cheap = compare(cmd, finite[best], key, direction, counts) if best else None
    sentence = (f"At the last checkpoint ({names[-1]}), {key}: CMD {_n(cmd)} against the checkpoint {_n(last)} "
                f"({_delta(vs_last)})")
    if best:
        sentence += f" and against the best cheap alternative, {best} {_n(finite[best])} ({_delta(vs_cheap)})"
    return {"cmd": cmd, "checkpoint": last, "best_cheap": best, "best_cheap_value": finite.get(best) if best else None,
            "cmd_vs_checkpoint": vs_last, "cmd_vs_best_cheap": vs_cheap, "sentence": sentence + "."}


def _under_selection(evaluation: dict, key: str, direction: str, counts: Mapping[str, int]) -> dict | None:
    selection = evaluation.get("selection")
    if not selection or key not in selection["reported"]:
        return None
    rows = {row["family"]: row for row in selection["rows"]}
    values = {family: row["scores"].get(key) for family, row in rows.items()}
    finite = {family: v for family, v in values.items() if _finite(v)}
    if not finite:
        return None
    order = sorted(finite, key=finite.get, reverse=direction == "max")
    winner = order[0]
    winners = tied_with_best(finite, key, direction, counts)
    runner_up = order[1] if len(order) > 1 else None
    margin_to_next = compare(finite[winner], finite[runner_up], key, direction, counts) if runner_up else None
    others = [f for f in order if f != "cmd"]
    best_other = others[0] if others else None
    cmd_vs_other = (compare(finite.get("cmd"), finite[best_other], key, direction, counts)
                    if best_other and "cmd" in finite else None)

    def at(family):
        return f"{_n(finite[family])} at {rows[family]['checkpoint']}"

    sentence = f"Chosen on validation (`{selection['key']}`), reported on {key}: "
    if len(winners) > 1:
        sentence += (f"no family wins beyond the sampling error. {winner} scores best, {at(winner)}, and "
                     f"{', '.join(w for w in winners if w != winner)} {'are' if len(winners) > 2 else 'is'} within "
                     "the sampling error of it.")
    else:
        sentence += f"**{winner}** wins, {at(winner)}"
        if runner_up:
            sentence += (f", {abs(margin_to_next['difference']):.2g} ahead of {runner_up} "
                         f"({_n(finite[runner_up])})")
            if margin_to_next["margin"] is not None:
                sentence += f", beyond the sampling error ±{margin_to_next['margin']:.2g}"
        sentence += "."
    if cmd_vs_other:
        sentence += (f" CMD ({at('cmd')}) against the best other family, {best_other} ({at(best_other)}): "
                     f"{_delta(cmd_vs_other)}.")
    if selection["chosen"]:
        sentence += (f" Validation alone picks {selection['chosen']} (what `cmd export --best` writes). CMD and PCA "
                     "are fitted on the whole run, later checkpoints included; the tail means and the EMA use only "
                     "the checkpoints up to theirs.")
    return {"winner": winner, "winners": winners, "runner_up": runner_up, "winner_vs_runner_up": margin_to_next,
            "best_other": best_other, "cmd_vs_best_other": cmd_vs_other, "chosen_on_validation": selection["chosen"],
            "sentence": sentence}


def _phrase(c: dict, other: str) -> str:
    if c["outcome"] == "unknown":
        return f"CMD and {other} cannot be compared (a score is missing)"
    d = _d(c["difference"])
    if c["difference"] == 0:
        return f"CMD equals {other}"
    if c["outcome"] == "tie":
        return f"CMD ties with {other} ({d}" + (", within the sampling error)" if c["margin"] is not None else ")")
    return (f"CMD is ahead of {other} ({d})" if c["outcome"] == "better" else
            f"{other}{',' * (',' in other)} is ahead of CMD ({d})")


def _headline(key: str, last: dict, selected: dict | None) -> str:
    """One sentence: did CMD help on this metric? Decided under selection on validation when there is
    one, else at the last checkpoint; both said."""
    at_last = (_phrase(last["cmd_vs_best_cheap"], f"the best cheap alternative, {last['best_cheap']}")
               if last["cmd_vs_best_cheap"] else _phrase(last["cmd_vs_checkpoint"], "the checkpoint"))
    deciding = last["cmd_vs_best_cheap"] or last["cmd_vs_checkpoint"]
    text = f"at the last checkpoint, {at_last}"
    if selected and selected["cmd_vs_best_other"]:
        deciding = selected["cmd_vs_best_other"]
        text += f"; chosen on validation, {_phrase(deciding, 'the best other family, ' + selected['best_other'])}"
    word = {"better": "CMD helped", "worse": "CMD did not help", "tie": "no clear difference",
            "unknown": "not comparable"}[deciding["outcome"]]
    return f"{key}: {word}. " + text[0].upper() + text[1:]


def modelling(fit: dict, compactness: dict, pca: Sequence[dict]) -> dict:
    """CMD against PCA of the trajectory at equal bytes: PCA with no more bytes than CMD's mode file
    (without the tensors both carry) is the fair rival; a PCA with more bytes is mentioned too."""
    cmd_bytes, error = compactness["modelled_bytes"], fit["rel_error"]
    cheaper = [p for p in pca if p["bytes_float32"] <= cmd_bytes]
    dearer = [p for p in pca if p["bytes_float32"] > cmd_bytes]
    parts = [f"PCA d={p['d']} {_n(p['rel_error'])} ({'fewer' if p in cheaper else 'more'} bytes)" for p in pca]
    beats_equal = all(error < p["rel_error"] for p in cheaper) if cheaper else None
    beats_more = [p["d"] for p in dearer if error < p["rel_error"]]
    sentence = f"Modelling: CMD's rel_error {_n(error)} against {', '.join(parts)}"
    if beats_equal is None:
        sentence += ": every PCA baseline stores more than CMD"
        sentence += (f", and CMD is still more accurate than d={', '.join(map(str, beats_more))}." if beats_more
                     else ", and is more accurate.")
    elif beats_equal:
        fair = ", ".join(str(p["d"]) for p in cheaper)
        sentence += f": CMD models the run better than PCA at no more bytes (d={fair})"
        worse_than = [p["d"] for p in dearer if p["d"] not in beats_more]
        if beats_more:
            sentence += f", and better than PCA d={', '.join(map(str, beats_more))} with more bytes"
        if worse_than:
            sentence += f"; PCA d={', '.join(map(str, worse_than))}, with more bytes, models it better"
        sentence += "."
    else:
        sentence += ": PCA at equal bytes models the run better than CMD."
    return {"cmd_rel_error": error, "cmd_bytes": cmd_bytes, "better_at_equal_bytes": beats_equal,
            "better_than_larger_pca": beats_more, "sentence": sentence}


def verdict(fit: dict, compactness: dict, pca: Sequence[dict], evaluation: dict | None, thresholds: Sequence[dict],
            statistics: bool) -> dict:
    """The ``verdict`` section of report.json; ``lines`` are its sentences, in the order shown.
    ``statistics``: the model has BatchNorm running statistics."""
    failed = [t["description"] for t in thresholds if not t["passed"]]
    status = None if not thresholds else ("FAIL" if failed else "pass")
    lines = []
    if status == "FAIL":
        lines.append(f"**Thresholds: FAIL** ({len(failed)} of {len(thresholds)}): " + "; ".join(failed) + ".")
    elif status == "pass":
        lines.append(f"**Thresholds: pass** ({len(thresholds)} check{'s' * (len(thresholds) > 1)}).")
    judged, noise = [], None
    if evaluation:
        counts = evaluation.get("counts") or {}
        for metric, key, direction in _metrics_judged(evaluation):
            last = _at_last(evaluation, key, direction, counts)
            selected = _under_selection(evaluation, key, direction, counts)
            judged.append({"metric": metric, "key": key, "direction": direction, "headline": "",
                           "at_last": last, "under_selection": selected})
            judged[-1]["headline"] = _headline(key, last, selected)
        proportions = [j["key"] for j in judged if is_proportion(j["key"])]
        known = {j["key"].rpartition(SEPARATOR)[0]: counts[j["key"].rpartition(SEPARATOR)[0]] for j in judged
                 if j["key"].rpartition(SEPARATOR)[0] in counts}
        if proportions and known:
            shown = ", ".join(f"{split or 'n'} {n:,}" for split, n in known.items())
            noise = {"rule": RULE, "counts": known, "known": True,
                     "sentence": f"A difference is a tie when {RULE} (p the mean of the two accuracies, n the "
                                 f"examples scored: {shown}): within twice the binomial standard error."}
        else:
            why = ("the evaluation returned no `count` per split" if proportions else
                   "the metrics are not accuracies")
            noise = {"rule": None, "counts": {}, "known": False,
                     "sentence": f"The sampling error is unknown ({why}): differences are shown as they are and "
                                 "only equal values are ties."}
        for j in judged:
            lines.append(f"**{j['headline']}.**")
        for j in judged:
            lines.append(j["at_last"]["sentence"])
            if j["under_selection"]:
                lines.append(j["under_selection"]["sentence"])
        lines.append(noise["sentence"])
        if statistics or evaluation.get("recalibrated"):
            lines.append(f"BatchNorm statistics were recomputed for every candidate by `{evaluation['recalibrated']}`."
                         if evaluation.get("recalibrated") else
                         "BatchNorm statistics were not recomputed: every candidate keeps them as reconstructed or "
                         "averaged (`--recalibrate module:function` recomputes them on data).")
        clamped = (evaluation.get("clamped_running_var") or {}).get("total", 0)
        if clamped:
            lines.append(f"{clamped:,} negative running-variance values were clamped to 0 before scoring.")
    model = modelling(fit, compactness, pca)
    lines.append(model["sentence"] if evaluation else
                 model["sentence"] + " (No `--eval`: the verdict speaks of modelling only.)")
    return {"thresholds": status, "failed": failed, "metrics": judged, "noise": noise, "modelling": model,
            "recalibrated": evaluation.get("recalibrated") if evaluation else None, "lines": lines}
