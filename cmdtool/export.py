"""``cmd export``: write the weights of any candidate family the report scores, at any position.

The families are the report's (``report.candidates``): ``original`` (the checkpoint as the
trajectory store holds it), ``cmd`` (its CMD reconstruction, as ``cmd reconstruct`` writes it),
``tail_K`` (the mean of checkpoints ``t−K+1 … t``), ``ema`` (the running EMA over checkpoints) and
``pca_1``, ``pca_2`` (the rank-``d`` PCA reconstruction of checkpoint ``t``). Floating-point tensors
are averaged in float64 and cast to their dtype; integer buffers are checkpoint ``t``'s; a running
variance is never written negative. The weights are those the report scored (PCA: to rounding, its
directions come from a Gram matrix summed in another order), written in the source format under
checkpoint ``t``'s name by ``reconstruct.write_checkpoints``. ``recalibrate`` recomputes BatchNorm
statistics on data before writing (``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import CmdError
from .fitting import tile_width
from .modefile import open_mode_file
from .progress import Progress, no_progress
from .reconstruct import parse_at, state_dict_at, write_checkpoints
from .report.candidates import FamilyWeights, carried_rows, flat_state
from .report.evaluation import run_recalibrate
from .report.metrics import PCA_RANKS, pca_from_gram
from .report.source import open_trajectory
from .statistics import Clamped, Recalibrate

FAMILY_HELP = f"original, cmd, tail_K (K ≥ 1), ema, {', '.join(f'pca_{d}' for d in PCA_RANKS)}"


def parse_family(family: str) -> tuple[str, int | None]:
    """``"tail_5"`` -> ``("tail", 5)``; ``"ema"`` -> ``("ema", None)``."""
    text = family.strip()
    match = re.fullmatch(r"tail_([0-9]{1,9})", text)
    if match and int(match.group(1)) >= 1:
        return "tail", int(match.group(1))
    if text in ("original", "cmd", "ema", *(f"pca_{d}" for d in PCA_RANKS)):
        return text, None
    raise CmdError(f"family {family!r}: expected one of {FAMILY_HELP}", parameter="family")


def trajectory_gram(store) -> np.ndarray:
    """``Σ_i (w_i − mean w_i)(w_i − mean w_i)ᵀ`` over the trajectory's columns (``T × T``), as the
    report's pass forms it (the centred displacement from the first checkpoint)."""
    T = store.W.shape[0]
    gram = np.zeros((T, T))
    for _, _, block in store.tiles(tile_width(T)):
        X = block.astype(np.float64)
        X = X - X[0]
        X -= X.mean(axis=0)
        gram += X @ X.T
    return gram


def candidate_states(modes, family: str, positions, *, store=None, ema_decay: float = 0.9,
                     clamped: Clamped | None = None):
    """``state(t)`` for increasing ``t`` in ``positions``: the family's state dict at ``t``."""
    kind, k = parse_family(family)
    clamped = Clamped() if clamped is None else clamped
    if kind == "cmd":
        return lambda t: state_dict_at(modes, t, clamped=clamped)
    if store is None:
        raise CmdError(f"family {family}: needs the trajectory (the checkpoints)", parameter="family")
    pca = pca_from_gram(trajectory_gram(store)) if kind.startswith("pca") else None
    weights = FamilyWeights(store.W, [k] if k else [], ema_decay, pca)
    carried = carried_rows(modes, store)
    return lambda t: flat_state(modes, carried, weights.at(t)[family], t, clamped)


class ExportResult(NamedTuple):
    paths: list
    family: str
    positions: list
    clamped: Clamped
    notes: list


def export(mode_file: str | Path, output: str | Path, *, family: str, at: int | str = "last",
           checkpoints: str | Path | None = None, trajectory: str | Path | None = None, format: str = "source",
           force: bool = False, ema_decay: float = 0.9, recalibrate: Recalibrate | None = None,
           recalibrate_spec: str = "", progress: Progress = no_progress) -> ExportResult:
    """Write ``family``'s weights at the positions ``at`` (``last``, ``first``, ``all`` or positions
    such as ``10`` or ``0,5,-1``) into the folder ``output``, under the checkpoints' names, in the
    source format (``format="safetensors"``: plain safetensors state dicts). ``recalibrate``: the
    user's function ``state_dict -> state_dict`` that recomputes BatchNorm statistics, called once
    per checkpoint written, before it is written. The trajectory is the store the fit kept, another
    store (``trajectory``) or one built from the checkpoint folder ``checkpoints``."""
    parse_family(family)
    if not 0 < ema_decay < 1 or not math.isfinite(ema_decay):
        raise CmdError("ema_decay must be between 0 and 1 (exclusive)", parameter="ema_decay")
    if recalibrate is not None and not recalibrate_spec:
        recalibrate_spec = getattr(recalibrate, "__qualname__", repr(recalibrate))
    with open_mode_file(Path(mode_file)) as modes:
        modes.require_whole("exporting a checkpoint")
        positions = parse_at(str(at), modes.T)
        store = None
        if family != "cmd":
            store, _ = open_trajectory(modes, checkpoints, trajectory, progress)
        clamped = Clamped()
        state_at = candidate_states(modes, family, positions, store=store, ema_decay=ema_decay, clamped=clamped)

        def states(t: int) -> dict:
            state = state_at(t)
            if recalibrate is not None:
                state = run_recalibrate(recalibrate, state, f"{family} at {modes.names[t]}", recalibrate_spec)
            return state

        with progress(f"writing {family}", len(positions)) as advance:
            paths = write_checkpoints(modes, Path(output), positions, force, advance, format, clamped, states)
    return ExportResult(paths, family, positions, clamped, [])


def best_of_report(report_json: str | Path) -> dict:
    """What a report chose on validation: ``{"family", "position", "checkpoint", "ema_decay", "recalibrated"}``."""
    path = Path(report_json)
    if path.is_symlink() or not path.is_file():
        raise CmdError(f"{path}: no such report file (report.json of `cmd report`)", parameter="best")
    if path.stat().st_size > 512 * 2**20:
        raise CmdError(f"{path}: too large for a report.json", parameter="best")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CmdError(f"{path}: not a readable JSON report ({type(e).__name__})", parameter="best") from None
    if not isinstance(report, dict) or report.get("format") != "cmdtool-report":
        raise CmdError(f"{path}: not a report.json of `cmd report`", parameter="best")
    evaluation = report.get("evaluation")
    selection = evaluation.get("selection") if isinstance(evaluation, dict) else None
    chosen = selection.get("chosen") if isinstance(selection, dict) else None
    rows = selection.get("rows") if isinstance(selection, dict) else None
    if not isinstance(chosen, str) or not isinstance(rows, list):
        raise CmdError(f"{path}: the report chose nothing on validation (it needs --eval, --select and a validation "
                       "split)", parameter="best")
    row = next((r for r in rows if isinstance(r, dict) and r.get("family") == chosen), None)
    if row is None or not isinstance(row.get("epoch"), int) or isinstance(row.get("epoch"), bool) \
            or not isinstance(row.get("checkpoint"), str):
        raise CmdError(f"{path}: the chosen family {chosen!r} has no position in the report", parameter="best")
    parse_family(chosen)
    decay = evaluation.get("ema_decay", 0.9)
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0 < decay < 1:
        raise CmdError(f"{path}: ema_decay is not a number between 0 and 1", parameter="best")
    recalibrated = evaluation.get("recalibrated")
    return {"family": chosen, "position": row["epoch"], "checkpoint": row["checkpoint"], "ema_decay": float(decay),
            "recalibrated": recalibrated if isinstance(recalibrated, str) else None}


def export_best(mode_file: str | Path, output: str | Path, report_json: str | Path, **options) -> ExportResult:
    """``export`` of the family and position ``report_json`` chose on validation (``cmd export --best``);
    the report must be of this mode file's run (the chosen checkpoint's name is checked)."""
    best = best_of_report(report_json)
    with open_mode_file(Path(mode_file)) as modes:
        T, names = modes.T, list(modes.names)
    if not 0 <= best["position"] < T or names[best["position"]] != best["checkpoint"]:
        raise CmdError(f"{report_json}: chose {best['checkpoint']!r} at position {best['position']}, which is not "
                       f"a checkpoint of {mode_file} there (a report of another run?)", parameter="best")
    notes = []
    if best["recalibrated"] and options.get("recalibrate") is None:
        notes.append(f"the report recomputed BatchNorm statistics with {best['recalibrated']}; pass --recalibrate "
                     f"{best['recalibrated']} to write the weights it scored")
    result = export(mode_file, output, family=best["family"], at=best["position"],
                    **{"ema_decay": best["ema_decay"], **options})
    return result._replace(notes=notes)
