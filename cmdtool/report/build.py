"""``cmd report``: measure a mode file against the trajectory it was fitted on, compare it with the
baselines, evaluate the weights when asked, draw the plots and write report.json/.md/.html.

Nothing here refits: the modes come from the mode file, the trajectory from the trajectory store.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__
from ..decompose import correlation_matrix, sample_parameters
from ..errors import CmdError
from ..modefile import ModeFile, open_mode_file
from ..pipeline import TILE_BYTES, Progress, no_progress, prepare_store
from ..reconstruct import assemble_state_dict, replace_path, state_dict_at
from ..trajectory import TrajectoryStore, open_store
from . import metrics
from .evaluation import Evaluate, Requirement, run_evaluate

REPORT_FORMAT = "cmdtool-report"
REPORT_VERSION = 1
PCA_RANKS = (1, 2)
PLOTS = {"references": "references.png", "errors": "error_per_checkpoint.png",
         "mode_layers": "modes_by_layer.png", "correlation": "correlation.png",
         "parameters": "sampled_parameters.png", "metric": "metric_per_checkpoint.png"}


@dataclass
class Thresholds:
    max_rel_error: float | None = None
    max_rel_error_displacement: float | None = None
    require: Sequence[Requirement] = ()


@dataclass
class ReportResult:
    folder: Path
    report: dict                       # what report.json holds
    failures: list[str] = field(default_factory=list)  # one line per failed threshold


def make_report(mode_file: str | Path, output: str | Path, *, checkpoints: str | Path | None = None,
                trajectory: str | Path | None = None, evaluate: Evaluate | None = None, eval_spec: str = "",
                tail: Sequence[int] = (5, 10), ema_decay: float = 0.9, thresholds: Thresholds = Thresholds(),
                force: bool = False, progress: Progress = no_progress) -> ReportResult:
    """Write the report of ``mode_file`` into the folder ``output`` (replaced only with ``force``).

    The trajectory is the store the fit kept (``settings.trajectory``), another store given as
    ``trajectory``, or built from the checkpoint folder ``checkpoints``. ``evaluate`` is a function
    ``state_dict -> {metric: float}``; with it the report scores every checkpoint (original and CMD)
    and the final candidates.
    """
    output = Path(output)
    if evaluate is not None and not eval_spec:
        eval_spec = f"{getattr(evaluate, '__module__', '?')}:{getattr(evaluate, '__qualname__', repr(evaluate))}"
    _check_report_folder(output, force)
    if any(k < 1 for k in tail) or not 0 < ema_decay < 1:
        raise CmdError("--tail must be at least 1 and --ema-decay between 0 and 1 (exclusive)")
    if thresholds.require and evaluate is None:
        raise CmdError("--require needs --eval: it checks a metric of the evaluated CMD weights")
    with open_mode_file(Path(mode_file)) as modes:
        store, source = _open_trajectory(modes, checkpoints, trajectory, progress)
        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            from threadpoolctl import threadpool_limits  # BLAS on one thread, as in the fit
            with threadpool_limits(limits=1, user_api="blas"):
                report, blocks = _compose(modes, store, source, tmp, evaluate, eval_spec, tail, ema_decay,
                                          thresholds, progress)
            _write_outputs(report, blocks, tmp)
            replace_path(tmp, output)  # an old report goes only once the new one is in place
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:  # GitHub Actions shows this file on the run's page; append, never overwrite
        with open(step_summary, "a", encoding="utf-8") as f:
            f.write((output / "summary.md").read_text() + f"\nFull report: `{output / 'report.html'}`\n\n")
    failures = [line["description"] for line in report["thresholds"] if not line["passed"]]
    return ReportResult(output, report, failures)


def _check_report_folder(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise CmdError(f"{output}: is a file, expected a report folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise CmdError(f"{output}: already exists and is not empty (use --force to replace it)")
    if not output.parent.exists():
        raise CmdError(f"{output.parent}: no such folder for the report")


def _open_trajectory(modes: ModeFile, checkpoints, trajectory, progress: Progress) -> tuple[TrajectoryStore, dict]:
    settings = modes.settings
    if checkpoints is not None:
        start, stop, every = settings["start"], settings["stop"], settings["every"]
        if modes.online is not None:  # updates append checkpoints beyond the fit's selection
            start, stop, every = _online_selection(modes, Path(checkpoints))
        prepared = prepare_store(
            Path(checkpoints), start=start, stop=stop, every=every, include=settings["include"],
            exclude=settings["exclude"], ema=settings.get("ema", False), trajectory=trajectory, progress=progress)
        store = prepared.store
        source = {"kind": "checkpoints", "checkpoints": str(Path(checkpoints).resolve()),
                  "trajectory": str(prepared.path), "trajectory_reused": prepared.reused}
    else:
        from ..online import ONLINECMD_SOURCE
        if trajectory is None and settings["source"] == ONLINECMD_SOURCE:
            raise CmdError(f"{modes.path}: written by OnlineCMD, which keeps no trajectory; pass --checkpoints DIR "
                           f"with the checkpoints it observed, saved under the names it was given")
        path = Path(trajectory or settings["trajectory"])
        if not path.exists():
            raise CmdError(f"{path}: the trajectory store this mode file was fitted from is gone "
                           f"(it is a cache); pass --checkpoints DIR to read the checkpoints again")
        store = open_store(path)
        source = {"kind": "trajectory store", "checkpoints": settings["source"], "trajectory": str(path),
                  "trajectory_reused": True}
    if (store.names != modes.names or not np.array_equal(store.time, modes.time)
            or store.layout.to_json() != modes.layout.to_json()):
        raise CmdError(f"{source['trajectory']}: does not hold the checkpoints this mode file was fitted on "
                       f"(checkpoint names, times or tensors differ); pass --checkpoints with the folder "
                       f"given to cmd fit")
    return store, source


def _online_selection(modes: ModeFile, folder: Path) -> tuple[int, int, int]:
    """``start, stop, every`` of the folder's checkpoints that an online mode file holds."""
    from ..checkpoints import discover
    names = [c.name for c in discover(folder).checkpoints]
    positions = [names.index(n) if n in names else -1 for n in modes.names]
    steps = set(np.diff(positions).tolist())
    if -1 in positions or len(steps) != 1 or steps.pop() < 1:
        missing = [n for n, p in zip(modes.names, positions) if p < 0]
        raise CmdError(f"{folder}: does not hold the checkpoints of {modes.path} as one evenly spaced slice"
                       + (f" (missing {missing[0]})" if missing else ""))
    return positions[0], positions[-1] + 1, positions[1] - positions[0]


def _online(modes: ModeFile) -> dict | None:
    """An online fit's warm-up (``cmd fit --warmup``, ``cmd update``, ``cmd watch``), or None."""
    if modes.online is None:
        return None
    F, time = modes.online["warmup"], modes.time
    return {"warmup": F, "updates": modes.T - F, "warmup_last": modes.names[F - 1],
            "boundary_time": float(time[F - 1] + time[F]) / 2 if F < modes.T else None}


def _clean(value):
    """JSON-safe: NaN and infinities become null, numpy numbers plain ones."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _compose(modes: ModeFile, store: TrajectoryStore, source: dict, folder: Path, evaluate, eval_spec: str,
             tail: Sequence[int], ema_decay: float, thresholds: Thresholds, progress: Progress):
    from . import plots  # matplotlib is imported only when a report is drawn
    from .render import Heading, Image, Paragraph, Table

    layout, T, N, M = modes.layout, modes.T, modes.N, modes.M
    tensors = layout.modelled
    tensor_of_column = np.repeat(np.arange(len(tensors)), [s.size for s in tensors])
    tile = max(1, TILE_BYTES // (8 * T))
    with progress("measuring the fit", N) as advance:
        measured = metrics.measure(
            store.tiles(tile), lambda start, stop: modes.parameters(slice(start, stop)),
            modes.references, tensor_of_column, len(tensors), advance)
    time = modes.time.astype(np.int64)
    pca = metrics.pca_from_gram(measured.gram)

    # 1. Fit quality: per checkpoint, per tensor, per mode.
    per_checkpoint = {"name": modes.names, "time": time,
                      "cmd": _errors(measured.error_sq, measured)}
    baselines = []
    for d in PCA_RANKS:
        error_sq = pca.error_sq(d)
        per_checkpoint[f"pca_{d}"] = _errors(error_sq, measured)
        floats = metrics.pca_storage_floats(d, N, T)
        baselines.append({
            "name": f"pca_{d}", "d": d, "floats_stored": floats, "bytes_float32": 4 * floats,
            "rel_error": metrics.ratio(error_sq.sum(), measured.norm_sq.sum()),
            "rel_error_displacement": metrics.ratio(error_sq.sum(), measured.displacement_sq.sum()),
            "explained_variance": _share(pca.eigenvalues[:d].sum(), pca.eigenvalues.sum())})
    fit = {"rel_error": metrics.ratio(measured.error_sq.sum(), measured.norm_sq.sum()),
           "rel_error_displacement": metrics.ratio(measured.error_sq.sum(), measured.displacement_sq.sum())}
    per_tensor = [{
        "name": spec.name, "shape": list(spec.shape), "parameters": spec.size,
        "rel_error": metrics.ratio(measured.tensor_error_sq[j], measured.tensor_norm_sq[j]),
        "rel_error_displacement": metrics.ratio(measured.tensor_error_sq[j], measured.tensor_displacement_sq[j]),
        "rel_error_last": metrics.ratio(measured.tensor_error_sq_last[j], measured.tensor_norm_sq_last[j]),
        "rel_error_displacement_last": metrics.ratio(measured.tensor_error_sq_last[j],
                                                     measured.tensor_displacement_sq_last[j]),
    } for j, spec in enumerate(tensors)]
    mode_rows = []
    for m in range(M):
        name, index = layout.locate(int(modes.reference_index[m]))
        counts = measured.mode_layer_counts[m]
        mode_rows.append({
            "mode": m, "parameters": int(counts.sum()), "share": counts.sum() / N,
            "mean_abs_corr": measured.mode_abs_corr_sum[m] / measured.mode_varying[m] if measured.mode_varying[m] else None,
            "constant_members": int(counts.sum() - measured.mode_varying[m]),
            "reference": {"tensor": name, "index": list(index), "column": int(modes.reference_index[m])},
            "layers": {spec.name: int(c) for spec, c in zip(tensors, counts)}})

    # 2. Compactness.
    mode_file_bytes = modes.path.stat().st_size
    compactness = {"mode_file_bytes": mode_file_bytes, "checkpoint_bytes_float32": 4 * N * T,
                   "compression_ratio": 4 * N * T / mode_file_bytes}

    # 5. Model quality, when the user gave an evaluation function.
    evaluation = None
    if evaluate is not None:
        evaluation = _evaluate_all(modes, store, evaluate, eval_spec, tail, ema_decay, pca, progress)

    # 8. Thresholds.
    checks = []
    for option, key, limit in (("--max-rel-error", "rel_error", thresholds.max_rel_error),
                               ("--max-rel-error-displacement", "rel_error_displacement",
                                thresholds.max_rel_error_displacement)):
        if limit is not None:
            requirement = Requirement(f"{option} {float(limit)!r}", key, "<=", float(limit))
            checks.append((requirement, fit[key]))
    for requirement in thresholds.require:
        cmd_metrics = evaluation["candidates"]["cmd"]
        if requirement.metric not in cmd_metrics:
            raise CmdError(f"{requirement.option}: the evaluation has no metric {requirement.metric!r} "
                           f"(it returned {', '.join(sorted(cmd_metrics))})")
        checks.append((requirement, cmd_metrics[requirement.metric]))
    threshold_rows = [{**r.check(value), "description": r.describe(value)} for r, value in checks]

    # 6. Plots.
    files = {}
    raw_references = modes.references.astype(np.float64) * modes.reference_scale[:, None] + modes.reference_offset[:, None]
    plots.references(time, raw_references, modes.mode_sizes, folder / PLOTS["references"])
    files["references"] = PLOTS["references"]
    series = {"CMD": metrics.ratio(measured.error_sq, measured.norm_sq)}
    series.update({f"PCA d={d}": metrics.ratio(pca.error_sq(d), measured.norm_sq) for d in PCA_RANKS})
    online = _online(modes)
    plots.errors(time, series, "‖w_t − ŵ_t‖ / ‖w_t‖", folder / PLOTS["errors"],
                 boundary=online["boundary_time"] if online else None)
    files["errors"] = PLOTS["errors"]
    plots.mode_layers(measured.mode_layer_counts, [s.name for s in tensors], folder / PLOTS["mode_layers"])
    files["mode_layers"] = PLOTS["mode_layers"]
    varies = store.varies
    if online:  # the fit sampled parameters that move during the warm-up
        from ..online import moving_parameters
        varies = moving_parameters(store.W[:online["warmup"]])
    sample = sample_parameters([s.size for s in tensors], varies, modes.settings["samples"], modes.settings["seed"])
    sampled = store.columns(sample)
    C = correlation_matrix(sampled)
    sample_labels, sample_a, sample_b = (modes.handle[k][sample] for k in ("labels", "a", "b"))
    sample_labels = sample_labels.astype(np.int64)
    plots.correlation(C, sample_labels, folder / PLOTS["correlation"])
    files["correlation"] = PLOTS["correlation"]
    shown, titles = _representatives(modes, sample, sample_labels, C)
    if shown:
        rebuilt = (sample_a[shown].astype(np.float64) * modes.references[sample_labels[shown]].astype(np.float64).T
                   + sample_b[shown].astype(np.float64))
        plots.parameters(time, sampled[:, shown], rebuilt, titles, folder / PLOTS["parameters"])
        files["parameters"] = PLOTS["parameters"]
    if evaluation is not None:
        plots.metric(time, evaluation["per_checkpoint"]["original"], evaluation["per_checkpoint"]["cmd"],
                     folder / PLOTS["metric"])
        files["metric"] = PLOTS["metric"]

    notes = _notes(layout, evaluation)
    if online:
        notes.append(f"Online fit (paper §3.3): the modes and references were found on the first {online['warmup']} "
                     f"checkpoints (up to {online['warmup_last']}, the dotted line in the error plot); "
                     f"a, b were then updated exactly with each of the {online['updates']} later checkpoints, "
                     "so errors after the warm-up show how well the warm-up's modes carry on.")
    report = _clean({
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION, "tool_version": __version__,
        "mode_file": {"path": str(modes.path), "format_version": modes.format_version,
                      "tool_version": modes.tool_version, "settings": modes.settings},
        "trajectory": source,
        "run": {"checkpoints": T, "parameters": N, "modes": M, "tensors_modelled": len(tensors),
                "tensors_carried": len(layout.carried)},
        "fit": fit, "compactness": compactness, "per_checkpoint": per_checkpoint, "per_tensor": per_tensor,
        "modes": mode_rows, "baselines": {"pca": baselines}, "evaluation": evaluation,
        "thresholds": threshold_rows, "passed": all(r["passed"] for r in threshold_rows),
        "plots": files, "notes": notes, "online": online})
    blocks = _blocks(report, Heading, Paragraph, Table, Image)
    return report, blocks


def _errors(error_sq: np.ndarray, measured: metrics.FitMeasures) -> dict:
    return {"rel_error": metrics.ratio(error_sq, measured.norm_sq),
            "rel_error_displacement": metrics.ratio(error_sq, measured.displacement_sq)}


def _share(part: float, whole: float) -> float:
    return float(part / whole) if whole > 0 else 1.0


def _representatives(modes: ModeFile, sample: np.ndarray, labels: np.ndarray, C: np.ndarray, most: int = 6):
    """Up to ``most`` sampled parameters, one per mode (largest modes first): the member whose
    |corr| with its reference is the median of the mode's sampled members; a typical parameter."""
    positions, titles = [], []
    reference_positions = np.searchsorted(sample, modes.reference_index)
    for m in range(min(modes.M, most)):
        members = np.flatnonzero(labels == m)
        if m >= len(reference_positions) or reference_positions[m] >= len(sample):
            continue
        members = members[members != reference_positions[m]]
        if len(members) == 0:
            continue
        corr = C[members, reference_positions[m]]
        chosen = int(members[np.argsort(corr, kind="stable")[len(members) // 2]])
        name, index = modes.layout.locate(int(sample[chosen]))
        positions.append(chosen)
        titles.append(f"mode {m}: {name}[{', '.join(map(str, index))}] |corr| {C[chosen, reference_positions[m]]:.3f}")
    return positions, titles


def _evaluate_all(modes: ModeFile, store: TrajectoryStore, evaluate, spec: str, tail: Sequence[int],
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



def _notes(layout, evaluation: dict | None) -> list[str]:
    notes = ["Errors are those of the weights `cmd reconstruct` writes: `a·r(t) + b` from the mode file's "
             "stored values, against the trajectory store (float32). The PCA errors are those of the exact "
             "projection."]
    statistics = [s.name for s in layout.modelled if s.name.endswith(("running_mean", "running_var"))]
    evaluated = evaluation is not None
    if statistics and evaluated:
        notes.append(f"BatchNorm running statistics ({len(statistics)} tensor{'s' * (len(statistics) > 1)}) are modelled by CMD and averaged "
                     "by the averaging baselines like any other weight; they are not recalibrated on data.")
    if evaluated and any(s.dtype == "float64" for s in layout.modelled):
        notes.append("Original checkpoints are scored from the trajectory store, which holds float64 tensors "
                     "rounded to float32.")
    if evaluated:
        names = evaluation["checkpoint_names"]
        bad = [f"{kind} {names[t]} ({key})"
               for kind, scores in (("original", evaluation["per_checkpoint"]["original"]),
                                    ("CMD reconstruction of", evaluation["per_checkpoint"]["cmd"]))
               for key, values in scores.items() for t, v in enumerate(values) if not math.isfinite(v)]
        bad += [f"candidate {name} ({key})" for name, scores in evaluation["candidates"].items()
                for key, v in scores.items() if not math.isfinite(v)]
        if bad:
            notes.append("Not finite (– in the tables, null in report.json): " + "; ".join(bad) + "."
                         + (" A modelled BatchNorm running_var can dip below zero where the run moves fast."
                            if statistics else ""))
    return notes


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


def _blocks(r: dict, Heading, Paragraph, Table, Image) -> tuple[list, list]:
    """The report as blocks: ``(summary, details)``; the summary alone goes to a CI step summary."""
    run, fit, compact, per_checkpoint = r["run"], r["fit"], r["compactness"], r["per_checkpoint"]
    names, time = per_checkpoint["name"], per_checkpoint["time"]
    mode_file = Path(r["mode_file"]["path"]).name
    summary = [
        Heading(1, f"CMD report: {mode_file}"),
        Paragraph(f"{run['checkpoints']} checkpoints ({names[0]} … {names[-1]}, time {time[0]} … {time[-1]}) of "
                  f"{run['parameters']:,} parameters in {run['tensors_modelled']} tensors"
                  + (f" (+{run['tensors_carried']} carried verbatim)" if run["tensors_carried"] else "")
                  + f", modelled by **{run['modes']} modes**: every parameter follows `a·r(t) + b` of its "
                  f"mode's reference trajectory `r(t)`. Trajectory: {r['trajectory']['kind']} "
                  f"`{r['trajectory']['trajectory']}`."
                  + (f" **Online fit**: modes from the first {r['online']['warmup']} checkpoints (warm-up, up to "
                     f"{r['online']['warmup_last']}), then {r['online']['updates']} exact updates of `a, b`."
                     if r.get("online") else "")),
        Heading(2, "How well the modes explain the run"),
        Paragraph("`rel_error` is ‖W − Ŵ‖ / ‖W‖ over all checkpoints; `rel_error_displacement` divides the same "
                  "error by how far the weights moved from the first checkpoint, ‖W − W₀‖, the harder figure. "
                  "PCA of the trajectory (mean + d principal directions, as in DLDR / P-BFGS) is the baseline: "
                  "d = 1 stores the same two numbers per parameter as CMD's `a, b`."),
        Table(["model", "numbers per parameter", "stored (float32)", "compression", "rel_error", "rel_error_displacement"],
              [[f"CMD, {run['modes']} modes", "2 + mode label", _bytes(compact["mode_file_bytes"]) + " (mode file)",
                f"{compact['compression_ratio']:.1f}×", _number(fit["rel_error"]), _number(fit["rel_error_displacement"])]]
              + [[f"PCA d={p['d']}", str(p["d"] + 1), _bytes(p["bytes_float32"]),
                  f"{compact['checkpoint_bytes_float32'] / p['bytes_float32']:.1f}×",
                  _number(p["rel_error"]), _number(p["rel_error_displacement"])] for p in r["baselines"]["pca"]],
              numeric=[False, False, True, True, True, True]),
    ]
    evaluation = r["evaluation"]
    if evaluation:
        metric_names = list(evaluation["per_checkpoint"]["original"])
        summary += [
            Heading(2, "Final weights"),
            Paragraph(f"Scored by `{evaluation['function']}`. CMD's reconstructed weights against what one would "
                      "otherwise keep: the last checkpoint, averages of the last checkpoints (LAWA / SWA style), an "
                      "EMA over checkpoints, and PCA of the trajectory."),
            Table(["candidate", "what it is", *metric_names],
                  [[name, evaluation["candidate_descriptions"][name], *(_number(scores.get(k)) for k in metric_names)]
                   for name, scores in evaluation["candidates"].items()],
                  numeric=[False, False, *[True] * len(metric_names)]),
        ]
    if r["thresholds"]:
        summary += [Heading(2, "Thresholds"),
                    Table(["check", "value", "required", "result"],
                          [[t["option"], _number(t["value"], 6), f"{t['op']} {t['threshold']:g}",
                            "pass" if t["passed"] else "**FAIL**"] for t in r["thresholds"]],
                          numeric=[False, True, False, False])]
    summary += [Paragraph(f"Note: {note}") for note in r["notes"]]

    plots = r["plots"]
    details = [Image(plots["errors"], "Relative error per checkpoint: CMD against PCA of the trajectory")]
    if "metric" in plots:
        details.append(Image(plots["metric"], "Evaluated metric per checkpoint: original weights against CMD reconstruction"))
    per_metric = list(evaluation["per_checkpoint"]["original"]) if evaluation else []
    details += [
        Heading(2, "Per checkpoint"),
        Table(["#", "checkpoint", "time", "CMD rel_error", "CMD rel_error_displacement", "PCA d=1 rel_error",
               "PCA d=2 rel_error", *(f"{k} original" for k in per_metric), *(f"{k} CMD" for k in per_metric)],
              [[str(t), names[t], str(time[t]), _number(per_checkpoint["cmd"]["rel_error"][t]),
                _number(per_checkpoint["cmd"]["rel_error_displacement"][t]),
                _number(per_checkpoint["pca_1"]["rel_error"][t]), _number(per_checkpoint["pca_2"]["rel_error"][t]),
                *(_number(evaluation["per_checkpoint"]["original"][k][t]) for k in per_metric),
                *(_number(evaluation["per_checkpoint"]["cmd"][k][t]) for k in per_metric)]
               for t in range(len(names))],
              numeric=[True, False, True, *[True] * (4 + 2 * len(per_metric))]),
        Heading(2, "Modes"),
        Paragraph("Each mode's size, how closely its members follow its reference (mean |corr| over members that "
                  "move; 1 is lock-step) and which parameter is the reference."),
        Table(["mode", "parameters", "share", "mean |corr|", "reference parameter"],
              [[str(m["mode"]), f"{m['parameters']:,}", f"{100 * m['share']:.1f}%", _number(m["mean_abs_corr"], 3),
                f"{m['reference']['tensor']}[{', '.join(map(str, m['reference']['index']))}]"] for m in r["modes"]],
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
              [[layer["name"], f"{layer['parameters']:,}", _number(layer["rel_error"]), _number(layer["rel_error_last"]),
                _number(layer["rel_error_displacement_last"]),
                *(f"{100 * m['layers'][layer['name']] / layer['parameters']:.0f}%" for m in modes)]
               for layer in layers]
              + [["layers present in the mode", "", "", "", "",
                  *(f"{sum(1 for c in m['layers'].values() if c)}/{len(layers)}" for m in modes)]],
              numeric=[False, True, True, True, True, *[True] * len(modes)]),
        Image(plots["mode_layers"], "Share of each layer's parameters in each mode"),
    ]
    return summary, details


def _write_outputs(report: dict, blocks: tuple[list, list], folder: Path) -> None:
    from .render import Image, to_html, to_markdown
    summary, details = blocks
    (folder / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (folder / "report.md").write_text(to_markdown(summary + details))
    title = f"CMD report: {Path(report['mode_file']['path']).name}"
    (folder / "report.html").write_text(to_html(summary + details, folder, title))
    (folder / "summary.md").write_text(to_markdown([b for b in summary if not isinstance(b, Image)]))
