"""The report's view of the per-epoch evaluation: the selection table, the marked final table, the
per-epoch plot of every family and the notes on them (rendering only; the numbers come from
``families`` and ``selection``)."""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import numpy as np

from .selection import SEPARATOR, default_direction, nonfinite_summary
from .verdict import tied_with_best

CANDIDATES_CAPTION = ("Every candidate family scored per checkpoint (the star marks each family's position "
                      "chosen on validation)")
FAMILY_NAMES = {"original": "checkpoints", "cmd": "CMD reconstruction", "ema": "running EMA"}


def _family_label(family: str) -> str:
    if family.startswith("tail_"):
        return f"tail mean of {family[5:]}"
    if family.startswith("pca_"):
        return f"PCA d={family[4:]}"
    return FAMILY_NAMES.get(family, family)


def export_line(r: dict):
    """``export(family, position)``: the ``cmd export`` command that writes a candidate's weights."""
    mode_file = shlex.quote(r["mode_file"]["path"])  # a line to paste into a shell
    source = r["trajectory"]
    evaluation = r["evaluation"] or {}
    extra = f" --checkpoints {shlex.quote(source['checkpoints'])}" if source.get("kind") == "checkpoints" else ""
    if evaluation.get("recalibrated"):
        extra += f" --recalibrate {shlex.quote(evaluation['recalibrated'])}"
    decay = next((d.rpartition("decay ")[2] for f, d in evaluation.get("family_descriptions", {}).items()
                  if f == "ema"), "0.9")

    def line(family: str, position: int) -> str:
        family = "original" if family == "last" else family
        options = f" --ema-decay {decay}" if family == "ema" and decay != "0.9" else ""
        return f"`cmd export {mode_file} -o export --family {family} --at {position}{options}{extra}`"
    return line


def final_rows(evaluation: dict, metric_names: list[str], number, export=None) -> list[list[str]]:
    """Rows of the final-weights table, in bold the best value of each metric and every value within
    the sampling error of it (``verdict.tied_with_best``; direction from its name; none when every
    candidate is marked); with ``export``, the command that writes each candidate."""
    candidates = evaluation["candidates"]
    counts = evaluation.get("counts") or {}
    marked = {}
    for k in metric_names:
        values = {name: scores.get(k) for name, scores in candidates.items()}
        tied = tied_with_best(values, k, default_direction(k.rpartition(SEPARATOR)[2]), counts)
        marked[k] = set(tied) if len(tied) < len(values) else set()
    last = len(evaluation["checkpoint_names"]) - 1
    return [[name, evaluation["candidate_descriptions"][name],
             *(f"**{number(scores.get(k))}**" if name in marked[k] else number(scores.get(k)) for k in metric_names),
             *([export(name, last)] if export else [])]
            for name, scores in candidates.items()]


def summary(evaluation: dict, number, Heading, Paragraph, Table, verdict: dict | None = None, export=None) -> list:
    """The selection section: each family's position chosen on validation, its score on the other
    splits; ★ on the families the verdict calls best on test (ties within the sampling error included)."""
    epochs = evaluation["epochs"]
    cost = (f"{evaluation['evaluations']} evaluations: {len(evaluation['per_epoch'])} candidate families at "
            f"{len(epochs)} of {len(evaluation['checkpoint_names'])} checkpoints"
            + (", each recalibrated first" if evaluation.get("recalibrated") else ""))
    impossible, chosen = evaluation["selection_impossible"], evaluation["selection"]
    if impossible:
        return [Heading(2, "Chosen on validation, reported on test"), Paragraph(f"**No selection.** {impossible}"),
                Paragraph(f"({cost}.)")]
    if not chosen:
        return [Paragraph(f"({cost}; with a validation split, `--select METRIC` chooses each family's best position "
                          "on it and reports the other splits.)")]
    key, reported = chosen["key"], chosen["reported"]
    columns = [key, *reported]
    judged = next((m for m in (verdict or {}).get("metrics", []) if m["under_selection"]), None)
    winners = set(judged["under_selection"]["winners"]) if judged else set()
    rows = []
    for row in chosen["rows"]:
        mark = "★ " if row["family"] in winners else ""
        picked = " (validation's pick)" if row["family"] == chosen["chosen"] else ""
        rows.append([f"{mark}{row['family']}", _family_label(row["family"]) + picked,
                     f"{row['epoch']} ({row['checkpoint']})", *(number(row["scores"].get(k)) for k in columns),
                     *([export(row["family"], row["epoch"])] if export else [])])
    others = ", ".join(f"`{k}`" for k in reported)
    text = (f"Each family's position with the {'highest' if chosen['direction'] == 'max' else 'lowest'} `{key}` "
            f"among the {chosen['epochs_considered']} evaluated positions (ties: the earliest), and what it scores "
            f"on the other split{'s' * (len(reported) > 1)} ({others}), which took no part in the choice. ")
    if judged:
        text += (f"★ marks the best family on `{judged['key']}` and every family within the sampling error of it "
                 f"(the verdict's rule): {', '.join(f'**{w}**' for w in judged['under_selection']['winners'])}. ")
    if chosen["chosen"]:
        text += f"The family best on validation is {chosen['chosen']} (`cmd export --best report.json` writes it). "
    text += ("CMD and PCA are fitted on the whole run; the tail means and the EMA use only the checkpoints up to "
             f"theirs. ({cost}.)")
    return [Heading(2, "Chosen on validation, reported on test"), Paragraph(text),
            Table(["family", "what it is", "chosen position", *columns, *(["weights"] if export else [])], rows,
                  numeric=[False, False, True, *[True] * len(columns), *([False] if export else [])])]


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
            out.append("The evaluation returned splits but no `--select METRIC` was given: no position was chosen.")
    return out


def finite(value) -> bool:
    return value is not None and math.isfinite(value)
