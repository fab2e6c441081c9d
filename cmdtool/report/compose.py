"""The numbers of a report: the fit measured against the trajectory, the PCA baseline, the
evaluation, thresholds and plots, composed into what report.json holds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..decompose import correlation_matrix, sample_parameters
from ..errors import CmdError
from ..fitting import in_threads, pass_threads
from ..modefile import ModeFile, embedding_summary
from ..modes import model_values
from ..progress import Progress
from ..trajectory import TrajectoryStore, moving_parameters
from ..version import __version__
from . import candidates, metrics, selection_blocks, verdict
from .document import blocks, embedding_note, notes
from .evaluation import Evaluate, Requirement, Thresholds, run_evaluate
from .metrics import PCA_RANKS
from .selection import Selection

REPORT_FORMAT = "cmdtool-report"
REPORT_VERSION = 1
PLOTS = {"references": "references.png", "errors": "error_per_checkpoint.png",
         "mode_layers": "modes_by_layer.png", "correlation": "correlation.png",
         "parameters": "sampled_parameters.png", "metric": "metric_per_checkpoint.png",
         "candidates": "candidates_per_epoch.png", "embedded": "embedded_fraction.png"}


@dataclass
class Scoring:
    """How the ``--eval`` function is used: the function, ``--select``, ``--eval-every``, ``--candidates-only``."""
    evaluate: Evaluate | None
    spec: str
    select: Selection | None = None
    every: int = 1
    candidates_only: bool = False
    recalibrate: Callable | None = None  # the user's function that recomputes BatchNorm statistics
    recalibrate_spec: str = ""


def _online(modes: ModeFile) -> dict | None:
    """An online fit's warm-up (``cmd fit --warmup``, ``cmd update``, ``cmd watch``), or None."""
    if modes.warmup is None:
        return None
    F, time = modes.warmup, modes.time
    return {"warmup": F, "updates": modes.T - F, "warmup_last": modes.names[F - 1],
            "boundary_time": float(time[F - 1] + time[F]) / 2 if F < modes.T else None}


def json_safe(value):
    """JSON-safe: NaN and infinities become null, numpy numbers plain ones."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def measure_in_threads(modes: ModeFile, store: TrajectoryStore, advance: Callable[[int], None]) -> metrics.FitMeasures:
    """The report's pass here: ``metrics.measure_by_groups`` with one group a task in up to
    ``fitting.PASS_THREADS`` threads (the groups and order of a Dask pass, so the same bits)."""
    def map_groups(arguments):
        return in_threads(lambda group: metrics.measure_group(store, *group), arguments, pass_threads())

    return metrics.measure_by_groups(modes, map_groups, advance)


def compose(modes: ModeFile, store: TrajectoryStore, source: dict, folder: Path, scoring: Scoring,
            tail: Sequence[int], ema_decay: float, thresholds: Thresholds, progress: Progress, measure_pass=None):
    from . import plots  # matplotlib is imported only when a report is drawn

    layout, T, N, M = modes.layout, modes.T, modes.N, modes.M
    tensors = layout.modelled
    first = None
    if scoring.evaluate is not None:  # a failing function fails now, not after the measuring pass
        first = candidates.trial(scoring.evaluate, store, modes, scoring.spec, run_evaluate, scoring.select)
    with progress("measuring the fit", N) as advance:
        if measure_pass is not None:  # on Dask workers (cmdtool.distributed): the same sums, bit for bit
            measured = measure_pass(modes, store, advance)
        else:
            measured = measure_in_threads(modes, store, advance)
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
           "rel_error_displacement": metrics.ratio(measured.error_sq.sum(), measured.displacement_sq.sum()),
           "error_curve": modes.metrics.error_curve}
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
            "mean_abs_corr": (measured.mode_abs_corr_sum[m] / measured.mode_varying[m]
                              if measured.mode_varying[m] else None),
            "constant_members": int(counts.sum() - measured.mode_varying[m]),
            "reference": {"tensor": name, "index": list(index), "column": int(modes.reference_index[m])},
            "layers": {spec.name: int(c) for spec, c in zip(tensors, counts)}})

    # 2. Compactness.
    mode_file_bytes = modes.path.stat().st_size
    compactness = {"mode_file_bytes": mode_file_bytes, "checkpoint_bytes_float32": 4 * N * T,
                   "compression_ratio": 4 * N * T / mode_file_bytes, **carried_storage(modes, N, T, mode_file_bytes)}
    compactness.update(own_storage(modes, compactness["modelled_bytes"]))

    # 5. Model quality, when the user gave an evaluation function.
    evaluation = None
    if scoring.evaluate is not None:
        epochs = candidates.evaluation_epochs(T, scoring.every, scoring.candidates_only)
        evaluation = candidates.score_families(modes, store, scoring.evaluate, scoring.spec, run_evaluate, tail=tail,
                                               ema_decay=ema_decay, pca=pca, epochs=epochs, first=first,
                                               selection=scoring.select, progress=progress,
                                               recalibrate=scoring.recalibrate,
                                               recalibrate_spec=scoring.recalibrate_spec)

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
    statistics = any(s.name.endswith(("running_mean", "running_var")) for s in layout.modelled)
    answer = verdict.verdict(json_safe(fit), compactness, json_safe(baselines), json_safe(evaluation), threshold_rows,
                             statistics)

    # 6. Plots.
    files = {}
    raw_references = (modes.references.astype(np.float64) * modes.reference_scale[:, None]
                      + modes.reference_offset[:, None])
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
        varies = moving_parameters(store.W, rows=online["warmup"])
    sample = sample_parameters([s.size for s in tensors], varies, modes.settings.samples, modes.settings.seed)
    sampled = store.columns(sample)
    C = correlation_matrix(sampled)
    sample_labels, sample_a, sample_b = modes.parameters(sample)
    sample_labels = sample_labels.astype(np.int64)
    plots.correlation(C, sample_labels, folder / PLOTS["correlation"])
    files["correlation"] = PLOTS["correlation"]
    shown, titles = _representatives(modes, sample, sample_labels, C)
    if shown:
        rebuilt = model_values(sample_labels[shown], sample_a[shown], sample_b[shown], modes.references.T)
        plots.parameters(time, sampled[:, shown], rebuilt, titles, folder / PLOTS["parameters"])
        files["parameters"] = PLOTS["parameters"]
    if evaluation is not None:
        files.update(selection_blocks.draw(plots, time, evaluation, folder, PLOTS))
    embedding = embedding_summary(modes)
    if embedding:
        plots.embedded(time, embedding["fraction"], online["boundary_time"] if online else None,
                       folder / PLOTS["embedded"])
        files["embedded"] = PLOTS["embedded"]

    report_notes = notes(layout, evaluation) + ([embedding_note(embedding, modes.names)] if embedding else [])
    if online:
        report_notes.append("Online fit (paper §3.3): the modes and references were found on the first "
                            f"{online['warmup']} "
                     f"checkpoints (up to {online['warmup_last']}, the dotted line in the error plot); "
                     f"a, b were then updated exactly with each of the {online['updates']} later checkpoints, "
                     "so errors after the warm-up show how well the warm-up's modes carry on.")
    report = json_safe({
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION, "tool_version": __version__,
        "verdict": answer,
        "mode_file": {"path": str(modes.path), "format_version": modes.format_version,
                      "tool_version": modes.tool_version, "settings": modes.settings.to_json()},
        "trajectory": source,
        "run": {"checkpoints": T, "parameters": N, "modes": M, "tensors_modelled": len(tensors),
                "tensors_carried": len(layout.carried)},
        "fit": fit, "compactness": compactness, "per_checkpoint": per_checkpoint, "per_tensor": per_tensor,
        "modes": mode_rows, "baselines": {"pca": baselines}, "evaluation": evaluation,
        "thresholds": threshold_rows, "passed": all(r["passed"] for r in threshold_rows),
        "plots": files, "notes": report_notes, "online": online, "embedding": embedding})
    return report, blocks(report)


def carried_storage(modes: ModeFile, N: int, T: int, mode_file_bytes: int) -> dict:
    """Storage at equal tensors: the bytes of the tensors carried verbatim (which PCA would carry
    too), the mode file without them, and the compression of the modelled tensors alone."""
    carried = sum(int(np.prod(modes.carried_rows(s.name).shape)) for s in modes.layout.carried
                  if s.name not in modes.dropped)
    modelled = max(mode_file_bytes - carried, 1)
    return {"carried_bytes": carried, "carried_tensors": len(modes.layout.carried) - len(modes.dropped),
            "dropped_tensors": modes.dropped, "modelled_bytes": modelled,
            "compression_ratio_modelled": 4 * N * T / modelled}


def own_storage(modes: ModeFile, modelled_bytes: int) -> dict:
    """The modelled tensors in the checkpoints' own dtypes (a bfloat16 run is half its float32
    figure), and the compression of the mode file's modelled part against them."""
    own = modes.T * sum(spec.nbytes for spec in modes.layout.modelled)
    return {"checkpoint_bytes_modelled": own, "checkpoint_dtypes": sorted({s.dtype for s in modes.layout.modelled}),
            "compression_ratio_modelled_checkpoint_bytes": own / modelled_bytes}


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
