"""The report's view of the per-epoch evaluation: the selection table, the marked final table, the
per-epoch plot of every family and the notes on them (rendering only; the numbers come from
``families`` and ``selection``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .selection import SEPARATOR, best_index, nonfinite_summary

CANDIDATES_CAPTION = ("Every candidate family scored per epoch (the star marks each family's epoch chosen "
                      "on validation)")
FAMILY_NAMES = {"original": "SGD checkpoints", "cmd": "CMD reconstruction", "ema": "running EMA"}


def _family_label(family: str) -> str:
    if family.startswith("tail_"):
        return f"tail mean of {family[5:]}"
    if family.startswith("pca_"):
        return f"PCA d={family[4:]}"
    return FAMILY_NAMES.get(family, family)


def final_rows(evaluation: dict, metric_names: list[str], number) -> list[list[str]]:
    """Rows of the final-weights table, the best value of each metric in bold (direction from its name;
    every candidate that reaches it; none when all are equal)."""
    candidates = evaluation["candidates"]
    best = {}
    for k in metric_names:
        values = [scores.get(k) for scores in candidates.values()]
        i = best_index(values, k)
        best[k] = None if i is None or len(set(values)) == 1 else values[i]
    return [[name, evaluation["candidate_descriptions"][name],
             *(f"**{number(scores.get(k))}**" if best[k] is not None and scores.get(k) == best[k]
               else number(scores.get(k)) for k in metric_names)]
            for name, scores in candidates.items()]


def summary(evaluation: dict, number, Heading, Paragraph, Table) -> list:
    """The selection section: each family's epoch chosen on validation, its score on the other splits."""
    epochs = evaluation["epochs"]
    cost = (f"{evaluation['evaluations']} evaluations: {len(evaluation['per_epoch'])} candidate families at "
            f"{len(epochs)} of {len(evaluation['checkpoint_names'])} checkpoints")
    impossible, chosen = evaluation["selection_impossible"], evaluation["selection"]
    if impossible:
        return [Heading(2, "Chosen on validation, reported on test"), Paragraph(f"**No selection.** {impossible}"),
                Paragraph(f"({cost}.)")]
    if not chosen:
        return [Paragraph(f"({cost}; with a validation split, `--select METRIC` chooses each family's best epoch "
                          "on it and reports the other splits.)")]
    key, reported = chosen["key"], chosen["reported"]
    columns = [key, *reported]
    rows = []
    for row in chosen["rows"]:
        mark = "★ " if row["family"] == chosen["chosen"] else ""
        rows.append([f"{mark}{row['family']}", _family_label(row["family"]), f"{row['epoch']} ({row['checkpoint']})",
                     *(number(row["scores"].get(k)) for k in columns)])
    test_key = f"{reported[0].split(SEPARATOR)[0]}{SEPARATOR}{chosen['metric']}" if reported else None
    winner = next((r for r in chosen["rows"] if r["family"] == chosen["chosen"]), None)
    last = next((r for r in chosen["rows"] if r["family"] == "original"), None)
    others = ", ".join(f"`{k}`" for k in reported)
    text = (f"Each family's epoch with the {'highest' if chosen['direction'] == 'max' else 'lowest'} `{key}` "
            f"among the {chosen['epochs_considered']} evaluated epochs (ties: the earliest), and what it scores "
            f"on the other split{'s' * (len(reported) > 1)} ({others}), which took no part in the choice. "
            "★ marks the family chosen on validation")
    if winner and test_key in winner["scores"]:
        text += f": **{winner['family']}**, {test_key} {number(winner['scores'][test_key])}"
        if last and last is not winner and test_key in last["scores"]:
            text += f" (the best SGD checkpoint by validation: {number(last['scores'][test_key])})"
    text += (". CMD and PCA are fitted on the whole run; the tail means and the EMA use only the epochs up to "
             f"theirs. ({cost}.)")
    return [Heading(2, "Chosen on validation, reported on test"), Paragraph(text),
            Table(["family", "what it is", "chosen epoch", *columns], rows,
                  numeric=[False, False, True, *[True] * len(columns)])]


def _plotted_keys(evaluation: dict) -> list[str]:
    """The metric the plot shows on each split: the selected one, else the first returned."""
    keys = list(evaluation["per_checkpoint"]["original"])
    chosen = evaluation["selection"]
    metric = chosen["metric"] if chosen else keys[0].partition(SEPARATOR)[2] or keys[0]
    if SEPARATOR not in keys[0]:
        return [metric] if metric in keys else keys[:1]
    return [k for k in keys if k.partition(SEPARATOR)[2] == metric]


def draw(plots, time: np.ndarray, evaluation: dict, folder: Path, names: dict) -> dict:
    """The per-epoch plot of every family, and the original-against-CMD metric plot; returns the files."""
    epochs = evaluation["epochs"]
    files = {}
    if len(epochs) > 1:
        keys = _plotted_keys(evaluation)
        chosen = {row["family"]: row["epoch"] for row in (evaluation["selection"] or {}).get("rows", [])}
        series = {family: {k: [scores[k][t] for t in epochs] for k in keys}
                  for family, scores in evaluation["per_epoch"].items()}
        plots.families(time[epochs], series, {f: _family_label(f) for f in series},
                       {f: list(epochs).index(t) for f, t in chosen.items()}, folder / names["candidates"])
        files["candidates"] = names["candidates"]
    original = {k: [v[t] for t in epochs] for k, v in evaluation["per_checkpoint"]["original"].items()}
    cmd = {k: [v[t] for t in epochs] for k, v in evaluation["per_checkpoint"]["cmd"].items()}
    plots.metric(time[epochs], original, cmd, folder / names["metric"])
    files["metric"] = names["metric"]
    return files


def notes(evaluation: dict, statistics: bool) -> list[str]:
    out = []
    bad = nonfinite_summary(evaluation["per_epoch"], evaluation["epochs"], evaluation["checkpoint_names"])
    if bad:
        out.append("Not finite (– in the tables, null in report.json): " + bad + "."
                   + (" A modelled BatchNorm running_var can dip below zero where the run moves fast."
                      if statistics else ""))
    if evaluation["selection"] is None and evaluation["selection_impossible"] is None:
        if any(SEPARATOR in k for k in evaluation["per_checkpoint"]["original"]):
            out.append("The evaluation returned splits but no `--select METRIC` was given: no epoch was chosen.")
    return out


def finite(value) -> bool:
    return value is not None and math.isfinite(value)
