"""``cmd export``: write the weights of any candidate family the report scores, at any position.

The families are the report's (``report.candidates``): ``original`` (the checkpoint as the
trajectory store holds it), ``cmd`` (its CMD reconstruction, as ``cmd reconstruct`` writes it),
``tail_K`` (the mean of checkpoints ``t−K+1 … t``), ``ema`` (the running EMA over checkpoints) and
``pca_1``, ``pca_2`` (the rank-``d`` PCA reconstruction of checkpoint ``t``). Floating-point tensors
are averaged in float64 and cast to their dtype; integer buffers are checkpoint ``t``'s; a running
variance is never written negative. The weights are those the report scored (PCA: to rounding, its
directions come from a Gram matrix summed in another order), written in the source format under
checkpoint ``t``'s name by ``reconstruct.write_checkpoints``: computed from the trajectory store one
block of columns at a time (``TrajectoryFamily``) and, for safetensors, written tensor by tensor,
so memory does not grow with the number of parameters. ``recalibrate`` recomputes BatchNorm
statistics on data before writing (``torch.optim.swa_utils.update_bn``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from .checkpoints.safetensors_writer import SafetensorsWriter, cast, stored
from .errors import CmdError
from .fitting import tile_width
from .layout import Layout, TensorSpec
from .modefile import open_mode_file
from .progress import Progress, no_progress
from .reconstruct import Reconstruction, TensorWriter, assemble_state_dict, parse_at, write_checkpoints
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
        X -= X[0].copy()
        X -= X.mean(axis=0)
        gram += X @ X.T
    return gram


BLOCK_BYTES = 8 * 2**20  # float64 bytes of one block of columns: its values at the positions written, and sums


class TrajectoryFamily:
    """The weights of one family but ``cmd``, computed from the trajectory store one block of
    columns at a time, reading the rows it needs one by one (memory: a block, whatever N and T),
    for ``write_checkpoints`` (as ``reconstruct.Reconstruction``: ``state`` and ``writer``).

    Per parameter these are the operations of ``report.candidates.FamilyWeights`` (which holds
    every family over all N at once, for the report's scoring), in the same order, so the same
    bits: ``original`` the stored row; ``tail_K`` the float64 sum of the window's rows in time order
    divided by its length (what ``mean(axis=0)`` of the rows computes); ``ema`` the recurrence from
    checkpoint 0; ``pca_d`` the mean and directions summed over time (``pca_basis``), then
    ``mean + Σ_k U[t, k] · directions[k]`` term by term (``FamilyWeights`` forms the sum with BLAS,
    which may fuse a multiply and an add: the same to rounding)."""

    def __init__(self, layout: Layout, store, family: str, ema_decay: float = 0.9):
        self.layout, self.store, self.family, self.ema_decay = layout, store, family, ema_decay
        self.kind, self.k = parse_family(family)
        self.pca = pca_from_gram(trajectory_gram(store)) if self.kind.startswith("pca") else None

    def _values(self, columns: slice, positions: Sequence[int]) -> np.ndarray:
        """The family's float64 values of the trajectory's ``columns`` at ``positions`` (increasing),
        ``(len(positions), columns)``."""
        W = self.store.W
        out = np.empty((len(positions), columns.stop - columns.start))
        if self.kind == "original":
            for values, t in zip(out, positions):
                values[...] = W[t, columns]
        elif self.kind == "tail":
            for values, t in zip(out, positions):
                first = max(0, t - self.k + 1)
                values[...] = W[first, columns]
                for s in range(first + 1, t + 1):
                    values += W[s, columns]
                values /= t + 1 - first
        elif self.kind == "ema":  # e = D·e + (1 − D)·w(t), in place
            decay, i = self.ema_decay, 0
            ema, row = W[0, columns].astype(np.float64), np.empty(out.shape[1])
            for t in range(positions[-1] + 1):
                if t:
                    ema *= decay
                    row[...] = W[t, columns]
                    row *= 1 - decay
                    ema += row
                while i < len(positions) and positions[i] == t:
                    out[i], i = ema, i + 1
        else:
            T, U = W.shape[0], self.pca.eigenvectors[:, :max(PCA_RANKS)]
            mean, directions = np.zeros(out.shape[1]), np.zeros((max(PCA_RANKS), out.shape[1]))
            row, term = np.empty(out.shape[1]), np.empty(out.shape[1])
            for t in range(T):
                row[...] = W[t, columns]
                mean += np.divide(row, T, out=term)
                for k in range(U.shape[1]):
                    directions[k] += np.multiply(row, U[t, k], out=term)
            d = int(self.family.removeprefix("pca_"))
            for values, t in zip(out, positions):
                combination = np.zeros(out.shape[1])
                for k, u in enumerate(self.pca.eigenvectors[t, :d]):
                    combination += np.multiply(directions[k], u, out=term)
                np.add(mean, combination, out=values)
        return out

    def _blocks(self, spec: TensorSpec, positions: Sequence[int], clamped: Clamped
                ) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, values)``: tensor ``spec``'s float64 values at ``positions``, a block of its
        columns from ``start`` on at a time (a running variance clamped at 0, counted)."""
        width = max(1, BLOCK_BYTES // (8 * (len(positions) + max(PCA_RANKS) + 3)))
        for start in range(0, spec.size, width):
            columns = slice(spec.offset + start, spec.offset + min(start + width, spec.size))
            yield start, clamped.array(spec.name, self._values(columns, positions))

    def state(self, index: int, clamped: Clamped) -> dict:
        """Checkpoint ``index``'s state dict (for torch's writers and ``--recalibrate``)."""
        def modelled(spec: TensorSpec) -> np.ndarray:
            values = np.empty(spec.size)
            for start, block in self._blocks(spec, [index], clamped):
                values[start:start + block.shape[1]] = block[0]
            return values

        return assemble_state_dict(self.layout, modelled, lambda spec: self.store.carried(spec.name)[index])

    def writer(self, indices: Sequence[int], clamped: Clamped) -> TensorWriter:
        def write(writers: Sequence[SafetensorsWriter], spec: TensorSpec) -> None:
            if not spec.modelled:
                rows = self.store.carried(spec.name)
                for writer, t in zip(writers, indices):
                    writer.write(spec.name, np.ascontiguousarray(rows[t]))
                return
            itemsize = stored(spec.dtype).itemsize
            for start, values in self._blocks(spec, indices, clamped):
                for row, writer in zip(cast(values, spec.dtype), writers):
                    writer.write(spec.name, row, start * itemsize)

        return write


def family_weights(modes, family: str, *, store=None, ema_decay: float = 0.9) -> Reconstruction | TrajectoryFamily:
    """What ``write_checkpoints`` writes for ``family``: the CMD reconstruction, or the family's
    weights from the trajectory ``store``."""
    kind, _ = parse_family(family)
    if kind == "cmd":
        return Reconstruction(modes)
    if store is None:
        raise CmdError(f"family {family}: needs the trajectory (the checkpoints)", parameter="family")
    return TrajectoryFamily(modes.layout, store, family, ema_decay)


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
        weights = family_weights(modes, family, store=store, ema_decay=ema_decay)

        def recalibrated(t: int) -> dict:
            return run_recalibrate(recalibrate, weights.state(t, clamped), f"{family} at {modes.names[t]}",
                                   recalibrate_spec)

        with progress(f"writing {family}", len(positions)) as advance:
            paths = write_checkpoints(modes, Path(output), positions, force, advance, format, clamped,
                                      recalibrated if recalibrate is not None else None, weights)
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
