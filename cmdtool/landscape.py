"""``cmd landscape``: the evaluated surface over the values of two mode references (paper §3.5).

Every modelled parameter is ``a_i · r_{m(i)}(t) + b_i``, so changing the values of two references at
one checkpoint ``t`` moves the whole network along a two-dimensional slice. Point ``(x, y)`` of a
``G × G`` grid sets the raw value of the first mode's reference to ``r_I(t) · (1 + δ_x)`` and the
second's to ``r_J(t) · (1 + δ_y)``, with ``δ`` from ``−span`` to ``+span`` in even steps (``G`` odd,
so ``δ = 0`` in the middle: the centre is the CMD weights at ``t``, bit for bit); every other mode
keeps its value. A raw reference value of (nearly) 0 cannot be scaled: that axis then moves by
``δ · scale``, the reference's size (the norm of its centred trajectory), and says so
(``varied: "absolute"``). Each point's weights are built one tensor at a time
(``reconstruct.state_dict_at``) and scored with the ``--eval`` function of ``cmd report``; with a
validation split the best point is chosen on it and reported on the other splits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from ._files import replace_path, temporary_sibling
from .errors import CmdError
from .export import ExportResult
from .modefile import ModeFile, open_mode_file
from .progress import Progress, no_progress
from .reconstruct import parse_at, state_dict_at, write_checkpoints
from .report.candidates import carried_rows, flat_state
from .report.evaluation import Evaluate, run_evaluate, run_recalibrate
from .report.selection import (
    SEPARATOR,
    Selection,
    check_selection,
    default_direction,
    parse_select,
    splits_of,
    validation_split,
)
from .report.selection import (
    select as select_best,
)
from .statistics import Clamped, Recalibrate

LANDSCAPE_FORMAT = "cmdtool-landscape"
LANDSCAPE_VERSION = 1
GRID = 11    # 121 evaluations: the authors' ±50 % in steps of 10 % rather than 2 % (2,500 evaluations)
SPAN = 0.5
NEAR_ZERO = 1e-6  # a raw reference value below this fraction of the reference's scale counts as 0


class Axis(NamedTuple):
    """One varied mode: its raw reference value at the centre, the offsets ``δ`` and the values they give."""
    mode: int
    reference_value: float      # raw r_m(t) = offset + scale · r̃_m(t)
    varied: str                 # "relative": raw · (1 + δ); "absolute": raw + δ · scale (the raw value is ~0)
    unit: float                 # the raw change per unit of δ: raw, or scale
    offsets: np.ndarray         # (G,) δ, from −span to +span
    values: np.ndarray          # (G,) raw reference values
    normalised: np.ndarray      # (G,) normalised values (what a, b are expressed against)


def grid_axis(mode: int, normalised_value: float, offset: float, scale: float, grid: int, span: float) -> Axis:
    """The ``grid`` values of mode ``mode``'s reference, from ``normalised_value`` (``r̃_m(t)``) and
    the stored ``offset``/``scale`` (raw = offset + scale · r̃). In normalised units a point is
    ``r̃ + δ · unit / scale``, which is ``r̃`` exactly at ``δ = 0``."""
    offsets = span * np.arange(-(grid // 2), grid // 2 + 1) / (grid // 2)  # exact 0 in the middle
    raw = offset + scale * normalised_value
    relative = abs(raw) > NEAR_ZERO * scale
    unit = raw if relative else scale
    return Axis(mode, raw, "relative" if relative else "absolute", unit, offsets, raw + offsets * unit,
                normalised_value + offsets * (unit / scale))


def check_grid(grid: int, span: float) -> None:
    if not isinstance(grid, int) or grid < 3 or grid % 2 == 0:
        raise CmdError(f"grid must be an odd integer of at least 3, so that the centre is a grid point (got {grid!r})",
                       parameter="grid")
    if not (isinstance(span, (int, float)) and math.isfinite(span) and span > 0):
        raise CmdError(f"span must be a positive number, e.g. 0.5 for ±50 % (got {span!r})", parameter="span")


def parse_mode_pair(text: str | None, M: int, where: Path) -> tuple[int, int]:
    """``"I,J"`` (0-based, as ``cmd info`` lists them): two distinct modes; None: the two largest (0, 1)."""
    if M < 2:
        raise CmdError(f"{where}: has {M} mode; a landscape varies two (refit with --modes 2 or more)")
    if text is None:
        return 0, 1
    try:
        pair = tuple(int(part) for part in text.split(","))
    except ValueError:
        pair = ()
    if len(pair) != 2 or pair[0] == pair[1]:
        raise CmdError(f"modes {text!r}: expected two different modes I,J such as 0,1", parameter="modes")
    for m in pair:
        if not 0 <= m < M:
            raise CmdError(f"modes {text!r}: mode {m} is out of range ({where} has {M} modes, 0..{M - 1})",
                           parameter="modes")
    return pair


def default_selection(keys: list[str]) -> Selection | None:
    """Without ``--select``: the validation split's ``loss`` (min) when it has one, else its first metric."""
    split = validation_split(keys)
    if split is None:
        return None
    metrics = splits_of(keys)[split]
    metric = "loss" if "loss" in metrics else metrics[0]
    return Selection(metric, default_direction(metric))


def projection(modes: ModeFile, store, index: int, mode_list: tuple[int, ...]) -> np.ndarray:
    """The original checkpoint ``index`` projected onto the references ``mode_list``: per mode the
    normalised reference value ``r̃* = Σ a_i (w_i − b_i) / Σ a_i²`` over the mode's parameters, the
    value whose CMD weights are nearest (least squares) to the checkpoint's weights of that mode."""
    numerator, denominator = np.zeros(modes.M), np.zeros(modes.M)
    row = store.W[index]
    for spec in modes.layout.modelled:
        labels, a, b = modes.parameters(spec.columns)
        a = a.astype(np.float64)
        w = row[spec.columns].astype(np.float64)
        numerator += np.bincount(labels, weights=a * (w - b), minlength=modes.M)
        denominator += np.bincount(labels, weights=a * a, minlength=modes.M)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.array([numerator[m] / denominator[m] for m in mode_list])


@dataclass
class LandscapeResult:
    """What ``landscape`` returns: the folder written and what ``landscape.json`` holds."""
    folder: Path
    landscape: dict
    plots: dict[str, str] = field(default_factory=dict)  # metric -> PNG file name


def _point_name(axes: tuple[Axis, Axis], x: int, y: int) -> str:
    return (f"grid point ({x}, {y}) (mode {axes[0].mode} at {axes[0].offsets[x]:+.0%}, "
            f"mode {axes[1].mode} at {axes[1].offsets[y]:+.0%})")


def landscape(mode_file: str | Path, output: str | Path, *, evaluate: Evaluate, eval_spec: str = "",
              modes: str | None = None, at: str | int = "last", grid: int = GRID, span: float = SPAN,
              select: str | Selection | None = None, checkpoints: str | Path | None = None,
              trajectory: str | Path | None = None, force: bool = False, progress: Progress = no_progress,
              say: Callable[[str], None] = lambda text: None) -> LandscapeResult:
    """Evaluate the ``grid × grid`` landscape over two modes' reference values and write the folder
    ``output`` (``landscape.json``, ``landscape.md``, one PNG per metric), replaced only with ``force``.

    Args:
        mode_file: The mode file.
        output: The folder to write.
        evaluate: Your function ``state_dict -> {metric: float}`` or ``-> {split: {metric: float}}``.
        eval_spec: How ``evaluate`` is named in messages and the output.
        modes: ``"I,J"``, the two modes (0-based); default the two largest.
        at: The checkpoint position whose reference values are varied (default the last).
        grid: Points per axis, odd (the centre is the CMD weights at ``at``).
        span: Largest relative offset of a reference value (0.5: ±50 %).
        select: ``"METRIC[:max|min]"`` to choose the best point on the validation split; default its loss.
        checkpoints: Read the original checkpoint from this folder instead of the kept trajectory store.
        trajectory: The trajectory store to read (or to build, with ``checkpoints``).
        force: Replace an existing folder.
        progress: Progress callback.
        say: Called with one line before the evaluations start (how many there are).

    Returns:
        The folder and ``landscape.json`` as a dict.

    Raises:
        CmdError: Bad input or an ``evaluate`` that fails (the message names the grid point); nothing is left.
    """
    output = Path(output)
    if not eval_spec:
        eval_spec = f"{getattr(evaluate, '__module__', '?')}:{getattr(evaluate, '__qualname__', repr(evaluate))}"
    check_grid(grid, span)
    if isinstance(select, str):
        select = parse_select(select)
    from .report.build import check_output_folder  # the report's output check, loaded on use (import depth)
    check_output_folder(output, force, "landscape")
    with open_mode_file(Path(mode_file)) as mf:
        mf.require_whole("evaluating a landscape")
        pair = parse_mode_pair(modes, mf.M, mf.path)
        positions = parse_at(str(at), mf.T)
        if len(positions) != 1:
            raise CmdError(f"at {at!r}: a landscape is drawn at one position: pass one, 'first' or 'last'",
                           parameter="at")
        index = positions[0]
        scale = mf.reference_scale.astype(np.float64)
        for m in pair:
            if not (math.isfinite(scale[m]) and scale[m] > 0):
                raise CmdError(f"{mf.path}: mode {m}'s reference has scale {scale[m]!r}; it cannot be varied")
        centre = mf.references[:, index].astype(np.float64)
        axes = tuple(grid_axis(m, centre[m], float(mf.reference_offset[m]), float(scale[m]), grid, span)
                     for m in pair)
        store, original_note = _original_store(mf, checkpoints, trajectory, progress)
        parameters = mf.parameters()  # labels, a, b read once for every point
        clamped = Clamped()

        def point_state(x: int, y: int) -> dict:
            values = centre.copy()
            values[pair[0]], values[pair[1]] = axes[0].normalised[x], axes[1].normalised[y]
            return state_dict_at(with_reference_values(mf, index, values), index, parameters, clamped=clamped)

        # One evaluation before the count is printed: a failing function or a --select metric it does
        # not return is reported at once (the original checkpoint, else the centre, reused below).
        c = grid // 2
        original, first = None, None
        if store is not None:
            original = _original(mf, store, index, pair, axes, evaluate, eval_spec)
            keys = list(original["scores"])
        else:
            first = run_evaluate(evaluate, point_state(c, c), _point_name(axes, c, c), eval_spec)
            keys = list(first)
        if select is not None:
            check_selection(select, keys)
        total = grid * grid + (store is not None)
        say(f"landscape of modes {pair[0]} and {pair[1]} at {mf.names[index]}: {total} evaluations "
            f"({grid} × {grid} grid{', and the original checkpoint' if store is not None else ''})")
        flat: dict[str, list[float]] = {k: [] for k in keys}
        with progress(f"evaluating {total} state dicts", total) as advance:
            advance(1)
            for y in range(grid):
                for x in range(grid):
                    if first is not None and (x, y) == (c, c):
                        scores = first
                    else:
                        scores = run_evaluate(evaluate, point_state(x, y), _point_name(axes, x, y), eval_spec)
                        advance(1)
                    for k in keys:
                        flat[k].append(scores.get(k, math.nan))
        result = _compose(mf, index, axes, keys, flat, original, original_note, select, eval_spec, centre, grid, span)
        result["clamped_running_var"] = {**clamped.to_json(), "note": clamped.sentence("the landscape's points")}
    return _write(result, output)


def _original_store(mf: ModeFile, checkpoints, trajectory, progress):
    """The trajectory store holding the original checkpoints, or ``(None, why)`` when the mode file
    keeps none and none was given (the original checkpoint is then left out, with a note)."""
    from .modes import NO_TRAJECTORY_WRITERS
    from .report.source import open_trajectory
    if checkpoints is None and trajectory is None:
        kept = mf.settings.trajectory
        if mf.settings.source in NO_TRAJECTORY_WRITERS or not kept or not Path(kept).is_file():
            return None, ("the original checkpoint is not shown: the trajectory store is gone or was never kept "
                          "(pass --checkpoints DIR)")
    store, _ = open_trajectory(mf, checkpoints, trajectory, progress)
    return store, None


def _original(mf: ModeFile, store, index: int, pair, axes, evaluate, eval_spec) -> dict:
    """The original checkpoint's scores and its projection onto the two references."""
    state = flat_state(mf, carried_rows(mf, store), store.W[index].astype(np.float64), index, Clamped())
    scores = run_evaluate(evaluate, state, f"checkpoint {mf.names[index]}", eval_spec)
    normalised = projection(mf, store, index, pair)
    raw = [float(mf.reference_offset[m]) + float(mf.reference_scale[m]) * v for m, v in zip(pair, normalised)]
    offsets = [(r - axis.reference_value) / axis.unit for r, axis in zip(raw, axes)]
    return {"checkpoint": mf.names[index], "scores": scores,
            "projection": {"reference_values": raw, "offsets": offsets, "normalised_values": normalised.tolist()}}


def _compose(mf: ModeFile, index: int, axes, keys, flat, original, original_note, selection, eval_spec,
             centre: np.ndarray, grid: int, span: float) -> dict:
    c = grid // 2
    scores = {k: np.array(v).reshape(grid, grid) for k, v in flat.items()}  # [y][x]
    point_scores = lambda x, y: {k: float(scores[k][y, x]) for k in keys}  # noqa: E731
    if selection is None:
        selection = default_selection(keys)
    unselectable = check_selection(selection, keys) if selection is not None else (
        "no point is chosen: the evaluation returned no validation split (return {\"val\": {...}, \"test\": {...}} "
        "to choose on validation and report on test)")
    chosen, chosen_key = None, None
    if unselectable is None:
        # Points in order of distance from the centre: ties go to the point nearest the CMD weights.
        order = sorted(range(grid * grid), key=lambda p: ((p % grid - c) ** 2 + (p // grid - c) ** 2, p))
        picked = select_best({"landscape": flat}, order, selection, [str(p) for p in range(grid * grid)])
        chosen_key = picked["key"]
        if picked["rows"]:
            p = picked["rows"][0]["epoch"]
            x, y = p % grid, p // grid
            values = centre.copy()
            values[axes[0].mode], values[axes[1].mode] = axes[0].normalised[x], axes[1].normalised[y]
            chosen = {"x": x, "y": y, "offsets": [float(axes[0].offsets[x]), float(axes[1].offsets[y])],
                      "reference_values": [float(axes[0].values[x]), float(axes[1].values[y])],
                      "normalised_reference_values": values.tolist(), "scores": point_scores(x, y)}
        else:
            unselectable = f"no point has a finite {chosen_key}"
    return {
        "format": LANDSCAPE_FORMAT, "version": LANDSCAPE_VERSION, "mode_file": str(mf.path),
        "position": index, "checkpoint": mf.names[index], "function": eval_spec,
        "grid": grid, "span": span, "evaluations": grid * grid + (original is not None),
        "axes": [{"mode": a.mode, "reference_parameter": _reference_name(mf, a.mode),
                  "reference_value": a.reference_value, "varied": a.varied, "unit": a.unit,
                  "offsets": a.offsets.tolist(), "reference_values": a.values.tolist(),
                  "normalised_values": a.normalised.tolist()} for a in axes],
        "keys": keys, "scores": {k: v.tolist() for k, v in scores.items()},
        "centre": {"x": c, "y": c, "normalised_reference_values": centre.tolist(), "scores": point_scores(c, c)},
        "selection": None if selection is None else {
            "metric": selection.metric, "direction": selection.direction, "key": chosen_key,
            "split": chosen_key.partition(SEPARATOR)[0] if chosen_key else None},
        "selection_impossible": unselectable, "chosen": chosen,
        "original": original, "original_note": original_note,
    }


def _reference_name(mf: ModeFile, mode: int) -> str:
    name, position = mf.layout.locate(int(mf.reference_index[mode]))
    return f"{name}[{', '.join(map(str, position))}]"


def _write(result: dict, output: Path) -> LandscapeResult:
    from . import landscape_plots  # matplotlib is imported only when a landscape is drawn
    from .report.compose import json_safe  # JSON-safe numbers, as in report.json
    tmp = temporary_sibling(output)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plots = landscape_plots.draw(result, tmp)
        result["plots"] = plots
        (tmp / "landscape.json").write_text(json.dumps(json_safe(result), indent=1) + "\n", encoding="utf-8")
        (tmp / "landscape.md").write_text(landscape_plots.markdown(result), encoding="utf-8")
        replace_path(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LandscapeResult(output, json.loads(json.dumps(json_safe(result))), plots)


def chosen_point(landscape_dir: str | Path, modes: ModeFile) -> tuple[int, np.ndarray]:
    """The position and ``(M,)`` normalised reference values of the point a landscape folder chose,
    checked against ``modes`` (the centre's reference values must be the mode file's at that position)."""
    path = Path(landscape_dir) / "landscape.json"
    if path.is_symlink() or not path.is_file():
        raise CmdError(f"{path}: no such landscape file (landscape.json of `cmd landscape`)")
    if path.stat().st_size > 256 * 2**20:
        raise CmdError(f"{path}: too large for a landscape.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CmdError(f"{path}: cannot be read as a landscape ({type(e).__name__})") from None
    if not isinstance(data, dict) or (data.get("format"), data.get("version")) != (LANDSCAPE_FORMAT,
                                                                                  LANDSCAPE_VERSION):
        raise CmdError(f"{path}: not a landscape.json of version {LANDSCAPE_VERSION}")
    try:
        index = data["position"]
        centre = np.array(data["centre"]["normalised_reference_values"], dtype=np.float64)
        chosen = data["chosen"]
        values = None if chosen is None else np.array(chosen["normalised_reference_values"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise CmdError(f"{path}: malformed landscape (position, centre or chosen point)") from None
    if not isinstance(index, int) or not 0 <= index < modes.T or centre.shape != (modes.M,) or not np.array_equal(
            centre, modes.references[:, index].astype(np.float64)):
        raise CmdError(f"{path}: was not computed from {modes.path} (its centre is not the mode file's reference "
                       "values at its position)")
    if values is None:
        raise CmdError(f"{path}: chose no point ({data.get('selection_impossible') or 'no selection'})")
    if values.shape != (modes.M,) or not np.isfinite(values).all():
        raise CmdError(f"{path}: malformed chosen point")
    return index, values


def with_reference_values(modes: ModeFile, index: int, values: np.ndarray) -> ModeFile:
    """``modes`` with its ``(M,)`` normalised reference values at checkpoint ``index`` replaced by
    ``values`` (float64; the other checkpoints' as stored): what ``reconstruct`` builds and writes
    from it at ``index`` are the weights of that landscape point."""
    references = modes.references.astype(np.float64)
    references[:, index] = values
    return dataclasses.replace(modes, references=references)


def export_chosen(mode_file: str | Path, landscape_dir: str | Path, output: str | Path, *, format: str = "source",
                  force: bool = False, recalibrate: Recalibrate | None = None, recalibrate_spec: str = "",
                  progress: Progress = no_progress) -> ExportResult:
    """Write the weights of the point a landscape folder chose (``cmd export --from-landscape``)
    into the folder ``output``, under the name and in the format of the checkpoint it was drawn at,
    as ``cmd reconstruct`` writes that checkpoint with the two varied reference values (float64,
    the values that were scored). ``recalibrate`` as in ``export.export``."""
    if recalibrate is not None and not recalibrate_spec:
        recalibrate_spec = getattr(recalibrate, "__qualname__", repr(recalibrate))
    with open_mode_file(Path(mode_file)) as mf:
        mf.require_whole("exporting a landscape point")
        index, values = chosen_point(landscape_dir, mf)
        view, clamped = with_reference_values(mf, index, values), Clamped()

        def recalibrated(t: int) -> dict:
            return run_recalibrate(recalibrate, state_dict_at(view, t, clamped=clamped),
                                   f"the landscape point at {mf.names[t]}", recalibrate_spec)

        with progress("writing the chosen point", 1) as advance:
            paths = write_checkpoints(view, Path(output), [index], force, advance, format, clamped,
                                      recalibrated if recalibrate is not None else None)
    return ExportResult(paths, "landscape point", [index], clamped, [])
