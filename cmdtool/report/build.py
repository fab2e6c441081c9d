"""``cmd report``: measure a mode file against the trajectory it was fitted on, compare it with the
baselines, evaluate the weights when asked, draw the plots and write report.json/.md/.html.

Nothing here refits: the modes come from the mode file, the trajectory from the trajectory store.
The jobs, one module each: ``source`` (which trajectory), ``metrics`` (one streaming pass and the
baselines, as math), ``candidates`` (scoring weights with the user's function), ``compose`` (the
numbers and plots of report.json), ``document`` (Markdown / HTML); this module wires them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from threadpoolctl import threadpool_limits

from .._files import replace_path, temporary_sibling
from ..errors import CmdError
from ..modefile import open_mode_file
from ..progress import Progress, no_progress
from ..statistics import Recalibrate
from .compose import Scoring, compose
from .document import write_outputs
from .evaluation import Evaluate, Thresholds
from .selection import Selection, parse_select
from .source import open_trajectory


@dataclass
class ReportResult:
    """What ``make_report`` returns.

    Attributes:
        folder: The report folder written.
        report: What ``report.json`` holds, as a dict.
        failures: One line per failed threshold (empty when all passed).
    """

    folder: Path
    report: dict                       # what report.json holds
    failures: list[str] = field(default_factory=list)  # one line per failed threshold


def make_report(mode_file: str | Path, output: str | Path, *, checkpoints: str | Path | None = None,
                trajectory: str | Path | None = None, evaluate: Evaluate | None = None, eval_spec: str = "",
                tail: Sequence[int] = (5, 10), ema_decay: float = 0.9, thresholds: Thresholds = Thresholds(),
                force: bool = False, progress: Progress = no_progress, select: Selection | str | None = None,
                eval_every: int = 1, candidates_only: bool = False, measure_pass=None,
                recalibrate: Recalibrate | None = None, recalibrate_spec: str = "") -> ReportResult:
    """Write the report of ``mode_file`` into the folder ``output`` (replaced only with ``force``).

    The trajectory is the store the fit kept (``settings.trajectory``), another store given as
    ``trajectory``, or built from the checkpoint folder ``checkpoints``. ``evaluate`` is a function
    ``state_dict -> {metric: float}``; with it the report scores every checkpoint (original and CMD)
    and the final candidates; every candidate family is scored per epoch (every ``eval_every``-th, or
    only the last with ``candidates_only``) and, with ``select`` (``--select``) and a validation
    split, each family's best epoch is chosen on validation and reported on the other splits.
    ``measure_pass(modes, store, advance)`` runs the streaming pass elsewhere
    (``cmdtool.distributed.Engine.measure_pass``).

    Args:
        mode_file: The mode file.
        output: The report folder to write.
        checkpoints: Read the original checkpoints from this folder instead of the kept store.
        trajectory: The trajectory store to read (or to build, with ``checkpoints``).
        evaluate: Your function ``state_dict -> {metric: float}`` or ``-> {split: {metric: float}}``.
        eval_spec: How ``evaluate`` is named in the report (default: its module and name).
        tail: Tail averages of the last K checkpoints to compare.
        ema_decay: Decay of the EMA over checkpoints that is compared.
        thresholds: What to check; failures are listed in the result.
        force: Replace an existing report folder.
        progress: Progress callback.
        select: ``"METRIC"``, ``"METRIC:max"`` or ``"METRIC:min"``: choose each family's epoch on validation.
        eval_every: Score the candidate families at every K-th checkpoint (and the last).
        candidates_only: Score the candidates at the last checkpoint only.
        measure_pass (Callable | None): Run the measuring pass elsewhere (Dask).
        recalibrate: Your function ``state_dict -> state_dict`` that recomputes BatchNorm statistics
            on data (``--recalibrate``); every candidate goes through it before ``evaluate``.
        recalibrate_spec: How ``recalibrate`` is named in the report.

    Returns:
        The folder, ``report.json`` as a dict, and the failed thresholds.

    Raises:
        CmdError: Bad input (a store rebuilt since the fit, an ``evaluate`` that fails on the first
            checkpoint, an existing folder without ``force``, ...); no report is left.
    """
    output = Path(output)
    if evaluate is not None and not eval_spec:
        eval_spec = f"{getattr(evaluate, '__module__', '?')}:{getattr(evaluate, '__qualname__', repr(evaluate))}"
    check_output_folder(output, force)
    if any(k < 1 for k in tail) or not 0 < ema_decay < 1:
        raise CmdError("tail must be at least 1 and `ema_decay` between 0 and 1 (exclusive)", parameter="tail",
                       mentions=("ema_decay",))
    if isinstance(select, str):
        select = parse_select(select)
    if eval_every < 1:
        raise CmdError("eval_every must be at least 1", parameter="eval_every")
    if select is not None and candidates_only:
        raise CmdError("select chooses among every family's checkpoints, which `candidates_only` leaves unscored; "
                       "use `eval_every` to score fewer", parameter="select",
                       mentions=("candidates_only", "eval_every"))
    if select is not None and evaluate is None:
        raise CmdError("select needs `evaluate`: it chooses checkpoints by an evaluated metric", parameter="select",
                       mentions=("evaluate",))
    if recalibrate is not None and evaluate is None:
        raise CmdError("recalibrate needs `evaluate`: it recomputes the statistics of the weights that are scored",
                       parameter="recalibrate", mentions=("evaluate",))
    if recalibrate is not None and not recalibrate_spec:
        recalibrate_spec = (f"{getattr(recalibrate, '__module__', '?')}:"
                            f"{getattr(recalibrate, '__qualname__', repr(recalibrate))}")
    if thresholds.require and evaluate is None:
        raise CmdError("require needs `evaluate`: it checks a metric of the evaluated CMD weights",
                       parameter="require", mentions=("evaluate",))
    with open_mode_file(Path(mode_file)) as modes:
        store, source = open_trajectory(modes, checkpoints, trajectory, progress)
        tmp = temporary_sibling(output)
        shutil.rmtree(tmp, ignore_errors=True)
        made = _missing_parents(output)
        tmp.mkdir(parents=True)
        try:
            with threadpool_limits(limits=1, user_api="blas"):  # as in the fit: skinny products, busy cores
                scoring = Scoring(evaluate, eval_spec, select, eval_every, candidates_only, recalibrate,
                                  recalibrate_spec)
                report, document = compose(modes, store, source, tmp, scoring, tail, ema_decay, thresholds, progress,
                                           measure_pass)
            write_outputs(report, document, tmp)
            replace_path(tmp, output)  # an old report goes only once the new one is in place
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in made:  # the parents made for this report, innermost first, if still empty
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise
    failures = [line["description"] for line in report["thresholds"] if not line["passed"]]
    return ReportResult(output, report, failures)


def _missing_parents(output: Path) -> list[Path]:
    """The parent folders of ``output`` that do not exist yet, innermost first (made by the caller)."""
    missing = []
    parent = output.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def check_output_folder(output: Path, force: bool, what: str = "report") -> None:
    """Refuse an output folder that is a file or is not empty (without ``force``), before any work."""
    if output.exists() and not output.is_dir():
        raise CmdError(f"{output}: is a file, expected a {what} folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise CmdError(f"{output}: already exists and is not empty (use --force to replace it)")
    ancestor = output.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():  # the missing parents are made, as `cmd reconstruct` makes its folder
        raise CmdError(f"{ancestor}: is a file, expected a folder for the {what}")
