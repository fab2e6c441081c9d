"""The report as a document: notes, the blocks of report.md / report.html / summary.md, and writing them."""

from __future__ import annotations

import json
from pathlib import Path

from ..units import human_bytes
from . import selection_blocks
from .render import Heading, Image, Paragraph, Table, code, text


def embedding_note(e: dict, names: list[str]) -> str:
    """Embedded CMD (paper §3.4): how much was embedded, and when (``embedding.fraction`` in report.json)."""
    steps = [f"{100 * f:.0f}% after {n}" for i, (f, n) in enumerate(zip(e["fraction"], names))
             if f > 0 and (i == 0 or f != e["fraction"][i - 1])]
    return (f"Embedded CMD (paper §3.4): {100 * e['embedded_fraction']:.1f}% of the {e['embeddable']:,} trainable "
            f"parameters were embedded by the end (F = {e['warmup']}, L = {e['window']}, P = {e['percent']:g}%): "
            + (", ".join(steps) if steps else "none") + ". Once embedded, a parameter follows a·r(t) + b exactly, "
            "so its error before the embedding is what the frozen fit leaves.")


def notes(layout, evaluation: dict | None) -> list[str]:
    notes = ["Errors are those of the weights `cmd reconstruct` writes: `a·r(t) + b` from the mode file's "
             "stored values, against the trajectory store (float32). The PCA errors are those of the exact "
             "projection."]
    statistics = [s.name for s in layout.modelled if s.name.endswith(("running_mean", "running_var"))]
    evaluated = evaluation is not None
    if statistics and evaluated:
        recalibrated = evaluation.get("recalibrated")
        notes.append(f"BatchNorm running statistics ({len(statistics)} tensor{'s' * (len(statistics) > 1)}) are "
                     "modelled by CMD and averaged by the averaging baselines like any other weight; "
                     + (f"every candidate's were then recomputed on data by `{recalibrated}` before scoring."
                        if recalibrated else "they are not recalibrated on data (`--recalibrate` does)."))
    if evaluated and any(s.dtype == "float64" for s in layout.modelled):
        notes.append("Original checkpoints are scored from the trajectory store, which holds float64 tensors "
                     "rounded to float32.")
    if evaluated:
        notes += selection_blocks.notes(evaluation, bool(statistics))
    return notes


def storage_sentence(compact: dict, size) -> str:
    """Which tensors the sizes count: the modelled ones only, for CMD and PCA alike."""
    text = (" Sizes and compression count the modelled tensors only, for CMD and PCA alike (the mode file "
            "without the tensors it carries verbatim")
    if compact.get("carried_tensors"):
        text += f": {compact['carried_tensors']} tensors, {size(compact['carried_bytes'])}, which PCA would carry too"
    text += ")."
    dtypes = compact.get("checkpoint_dtypes")
    if dtypes and dtypes != ["float32"]:
        text += (f" The checkpoints store them as {'/'.join(dtypes)}: against their own "
                 f"{size(compact['checkpoint_bytes_modelled'])}, CMD's compression is "
                 f"{compact['compression_ratio_modelled_checkpoint_bytes']:.1f}× (the table counts float32 for both).")
    if compact.get("dropped_tensors"):
        text += (f" {len(compact['dropped_tensors'])} floating-point tensors that are not modelled were left out "
                 "(`--drop-unmodelled`): this mode file cannot rebuild whole checkpoints.")
    return text


def curve_sentence(curve: dict | None) -> list:
    """The error-vs-M curve of ``--modes auto``, as a paragraph."""
    if not curve:
        return []
    points = ", ".join(f"{m}: {e:.3g}" for m, e in zip(curve["modes"], curve["rel_error"]))
    return [Paragraph(f"**M = {curve['chosen']}** was chosen by `--modes auto` ({text(curve['rule'])}; measured on "
                      f"{text(curve['measured_on'])}). Held-out relative error against M: {points}.")]


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def blocks(r: dict) -> tuple[list, list]:
    """The report as blocks: ``(summary, details)``; the summary alone goes to a CI step summary."""
    run, fit, compact, per_checkpoint = r["run"], r["fit"], r["compactness"], r["per_checkpoint"]
    names, time = per_checkpoint["name"], per_checkpoint["time"]
    mode_file = Path(r["mode_file"]["path"]).name
    summary = [
        Heading(1, f"CMD report: {text(mode_file)}"),
        Heading(2, "Verdict"),
        *(Paragraph(line) for line in r["verdict"]["lines"]),
        Heading(2, "The run"),
        Paragraph(f"{run['checkpoints']} checkpoints ({text(names[0])} … {text(names[-1])}, time {time[0]} … "
                  f"{time[-1]}) of "
                  f"{run['parameters']:,} parameters in {run['tensors_modelled']} tensors"
                  + (f" (+{run['tensors_carried']} carried verbatim)" if run["tensors_carried"] else "")
                  + f", modelled by **{run['modes']} modes**: every parameter follows `a·r(t) + b` of its "
                  f"mode's reference trajectory `r(t)`. Trajectory: {r['trajectory']['kind']} "
                  f"{code(r['trajectory']['trajectory'])}."
                  + (f" **Online fit**: modes from the first {r['online']['warmup']} checkpoints (warm-up, up to "
                     f"{text(r['online']['warmup_last'])}), then {r['online']['updates']} exact updates of `a, b`."
                     if r.get("online") else "")),
        Heading(2, "How well the modes explain the run"),
        Paragraph("`rel_error` is ‖W − Ŵ‖ / ‖W‖ over all checkpoints; `rel_error_displacement` divides the same "
                  "error by how far the weights moved from the first checkpoint, ‖W − W₀‖, the harder figure. "
                  "PCA of the trajectory (mean + d principal directions, as in DLDR / P-BFGS) is the baseline: "
                  "d = 1 stores the same two numbers per parameter as CMD's `a, b`."
                  + storage_sentence(compact, human_bytes)),
        Table(["model", "numbers per parameter", "stored (float32)", "compression", "rel_error",
               "rel_error_displacement"],
              [[f"CMD, {run['modes']} modes", "2 + mode label",
                human_bytes(compact["modelled_bytes"]) + " (mode file)",
                f"{compact['compression_ratio_modelled']:.1f}×", _number(fit["rel_error"]),
                _number(fit["rel_error_displacement"])]]
              + [[f"PCA d={p['d']}", str(p["d"] + 1), human_bytes(p["bytes_float32"]),
                  f"{compact['checkpoint_bytes_float32'] / p['bytes_float32']:.1f}×",
                  _number(p["rel_error"]), _number(p["rel_error_displacement"])] for p in r["baselines"]["pca"]],
              numeric=[False, False, True, True, True, True]),
        *curve_sentence(r["fit"].get("error_curve")),
    ]
    evaluation = r["evaluation"]
    if evaluation:
        metric_names = list(evaluation["per_checkpoint"]["original"])
        export = selection_blocks.export_line(r)
        summary += [
            Heading(2, "Final weights"),
            Paragraph(f"Scored by {code(evaluation['function'])}. CMD's reconstructed weights against what one would "
                      "otherwise keep: the last checkpoint, averages of the last checkpoints (LAWA / SWA style), an "
                      "EMA over checkpoints, and PCA of the trajectory. Bold: the best value of each metric and "
                      "every value within the sampling error of it (see the verdict). The last column writes the "
                      "candidate's weights."),
            Table(["candidate", "what it is", *metric_names, "weights"],
                  selection_blocks.final_rows(evaluation, metric_names, _number, export),
                  numeric=[False, False, *[True] * len(metric_names), False]),
        ]
        summary += selection_blocks.summary(evaluation, _number, Heading, Paragraph, Table, r["verdict"], export)
    if r["thresholds"]:
        summary += [Heading(2, "Thresholds"),
                    Table(["check", "value", "required", "result"],
                          [[t["option"], _number(t["value"], 6), f"{t['op']} {t['threshold']:g}",
                            "pass" if t["passed"] else "**FAIL**"] for t in r["thresholds"]],
                          numeric=[False, True, False, False])]
    summary += [Paragraph(f"Note: {note}") for note in r["notes"]]

    plots = r["plots"]
    details = [Image(plots["errors"], "Relative error per checkpoint: CMD against PCA of the trajectory")]
    if "candidates" in plots:
        details.append(Image(plots["candidates"], selection_blocks.CANDIDATES_CAPTION))
    if "metric" in plots:
        details.append(Image(plots["metric"], "Evaluated metric per checkpoint: original weights against CMD "
                                              "reconstruction"))
    if "embedded" in plots:
        details.append(Image(plots["embedded"], "Embedded CMD: share of the trainable parameters embedded by each "
                                                "checkpoint (they follow a·r(t) + b from then on)"))
    embedded = r["embedding"]["fraction"] if r.get("embedding") else None
    per_metric = list(evaluation["per_checkpoint"]["original"]) if evaluation else []
    details += [
        Heading(2, "Per checkpoint"),
        Table(["#", "checkpoint", "time", "CMD rel_error", "CMD rel_error_displacement", "PCA d=1 rel_error",
               "PCA d=2 rel_error", *(f"{k} original" for k in per_metric), *(f"{k} CMD" for k in per_metric),
               *(["embedded"] if embedded else [])],
              [[str(t), text(names[t]), str(time[t]), _number(per_checkpoint["cmd"]["rel_error"][t]),
                _number(per_checkpoint["cmd"]["rel_error_displacement"][t]),
                _number(per_checkpoint["pca_1"]["rel_error"][t]), _number(per_checkpoint["pca_2"]["rel_error"][t]),
                *(_number(evaluation["per_checkpoint"]["original"][k][t]) for k in per_metric),
                *(_number(evaluation["per_checkpoint"]["cmd"][k][t]) for k in per_metric),
                *([f"{100 * embedded[t]:.1f}%"] if embedded else [])]
               for t in range(len(names))],
              numeric=[True, False, True, *[True] * (4 + 2 * len(per_metric) + bool(embedded))]),
        Heading(2, "Modes"),
        Paragraph("Each mode's size, how closely its members follow its reference (mean |corr| over members that "
                  "move; 1 is lock-step) and which parameter is the reference."),
        Table(["mode", "parameters", "share", "mean |corr|", "reference parameter"],
              [[str(m["mode"]), f"{m['parameters']:,}", f"{100 * m['share']:.1f}%", _number(m["mean_abs_corr"], 3),
                text(f"{m['reference']['tensor']}[{', '.join(map(str, m['reference']['index']))}]")]
               for m in r["modes"]],
              numeric=[True, True, True, True, False]),
        Image(plots["references"], "Reference trajectory of each mode"),
        Image(plots["correlation"], "|corr| of the sampled parameters, grouped by mode (the paper's figure 1)"),
    ]
    if "parameters" in plots:
        details.append(Image(plots["parameters"], "Typical sampled parameters: original against CMD reconstruction"))
    layers = r["per_tensor"]
    modes = r["modes"]
    details += [
        Heading(2, "Layers"),
        Paragraph("Error of each tensor over the run and at the last checkpoint, and the share of its parameters "
                  "in each mode (each row sums to 100%; the paper observes every mode spread over all layers)."),
        Table(["tensor", "parameters", "rel_error", "rel_error last", "rel_error_displacement last",
               *(f"mode {m['mode']}" for m in modes)],
              [[text(layer["name"]), f"{layer['parameters']:,}", _number(layer["rel_error"]),
                _number(layer["rel_error_last"]),
                _number(layer["rel_error_displacement_last"]),
                *(f"{100 * m['layers'][layer['name']] / layer['parameters']:.0f}%" if layer["parameters"] else "–"
                  for m in modes)]
               for layer in layers]
              + [["layers present in the mode", "", "", "", "",
                  *(f"{sum(1 for c in m['layers'].values() if c)}/{len(layers)}" for m in modes)]],
              numeric=[False, True, True, True, True, *[True] * len(modes)]),
        Image(plots["mode_layers"], "Share of each layer's parameters in each mode"),
    ]
    return summary, details


def write_outputs(report: dict, document: tuple[list, list], folder: Path) -> None:
    from .render import to_html, to_markdown
    summary, details = document
    (folder / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (folder / "report.md").write_text(to_markdown(summary + details))
    title = f"CMD report: {Path(report['mode_file']['path']).name}"
    (folder / "report.html").write_text(to_html(summary + details, folder, title))
    (folder / "summary.md").write_text(to_markdown([b for b in summary if not isinstance(b, Image)]))
