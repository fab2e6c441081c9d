"""``cmd export``: the command that writes any candidate family of the report (``cmdtool.export``),
and the note on running variances clamped at 0 that ``reconstruct``, ``export`` and ``report`` print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_errors import errors_to_exit_code, say
from .cli_options import finite
from .console import progress_bar
from .errors import CmdError
from .reconstruct import WRITE_FORMATS
from .statistics import Clamped

RECALIBRATE_HELP = ("Recompute the BatchNorm statistics of every candidate before it is scored, with your function "
                    "state_dict -> state_dict (as torch.optim.swa_utils.update_bn on training data; needs --eval).")


def say_clamped(clamped: Clamped | int) -> None:
    """One ``note:`` line on stderr when running variances were clamped (a count: the report's candidates)."""
    if isinstance(clamped, Clamped):
        if clamped.total:
            say(f"note: {clamped.sentence('the checkpoints written')}")
    elif clamped:
        say(f"note: {clamped} negative running-variance value{'s' * (clamped > 1)} clamped to 0 in the candidates "
            "scored (per family in report.json, evaluation.clamped_running_var)")


def export_command(
    mode_file: Path = typer.Argument(..., metavar="MODEFILE", help="A mode file written by cmd fit."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Folder to write the checkpoints into (created if missing)."),
    family: Optional[str] = typer.Option(
        None, "--family", metavar="F",
        help="Which weights: original, cmd, tail_K (mean of the K checkpoints up to the position), ema, pca_1, "
             "pca_2: the candidate families of cmd report."),
    at: str = typer.Option(
        "last", "--at", metavar="POSITION",
        help="Which checkpoints: last, first, all, or positions such as 6 or 0,10,-1 (0-based, as listed by cmd "
             "info)."),
    best: Optional[Path] = typer.Option(
        None, "--best", metavar="REPORT_JSON",
        help="Write the family and position this report.json chose on validation (instead of --family/--at)."),
    from_landscape: Optional[Path] = typer.Option(
        None, "--from-landscape", metavar="DIR",
        help="Write the point this cmd landscape folder chose on validation (instead of --family/--at)."),
    checkpoints: Optional[Path] = typer.Option(
        None, "--checkpoints", metavar="DIR",
        help="Read the original checkpoints from this folder (default: the trajectory store kept by cmd fit)."),
    trajectory: Optional[Path] = typer.Option(
        None, "--trajectory", help="Trajectory store to use, or where to build one with --checkpoints."),
    ema_decay: float = typer.Option(
        0.9, "--ema-decay", callback=finite, help="Decay of the EMA over checkpoints (family ema)."),
    recalibrate: Optional[str] = typer.Option(
        None, "--recalibrate", metavar="MODULE:FUNCTION",
        help="Recompute BatchNorm statistics before writing, with your function state_dict -> state_dict (as "
             "torch.optim.swa_utils.update_bn on training data)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files in the output folder."),
    write_format: str = typer.Option(
        "source", "--format", metavar="|".join(WRITE_FORMATS),
        help="source: as the source was; safetensors: plain safetensors state dicts."),
) -> None:
    """Write the weights of any candidate the report scores, at any position, like cmd reconstruct.

    tail_K at position t is the mean of checkpoints t−K+1 … t (float tensors; integer buffers are
    checkpoint t's), ema the running EMA over checkpoints, original the checkpoint as stored, cmd
    its CMD reconstruction, pca_d the rank-d PCA reconstruction. Files are written under the
    checkpoints' names, in the source format.
    """
    from .export import export as export_family
    from .export import export_best
    from .report import load_evaluate
    with errors_to_exit_code(output):
        if sum(choice is not None for choice in (family, best, from_landscape)) != 1:
            raise CmdError("pass one of `family` (with `at`), `best` or `from_landscape`",
                           mentions=("family", "best", "at", "from_landscape"))
        function = load_evaluate(recalibrate, parameter="recalibrate") if recalibrate else None
        options = dict(checkpoints=checkpoints, trajectory=trajectory, format=write_format, force=force,
                       progress=progress_bar, recalibrate=function, recalibrate_spec=recalibrate or "")
        if from_landscape is not None:
            from .landscape import export_chosen
            del options["checkpoints"], options["trajectory"]
            result = export_chosen(mode_file, from_landscape, output, **options)
        elif best is not None:
            result = export_best(mode_file, output, best, **options)
        else:
            result = export_family(mode_file, output, family=family, at=at, ema_decay=ema_decay, **options)
    for note in result.notes:
        say(f"note: {note}")
    say_clamped(result.clamped)
    say(f"wrote {result.family} at position{'s' * (len(result.positions) > 1)} "
        f"{', '.join(map(str, result.positions))}" + (f", recalibrated by {recalibrate}" if recalibrate else ""))
    for path in result.paths:
        print(path)
