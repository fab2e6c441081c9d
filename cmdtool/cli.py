"""The ``cmd`` command line: options, progress bars, rendering and exit codes. No math here.

Exit codes: 0 success; 1 a threshold failed (reports); 2 bad input (one line on stderr);
130 interrupted (Ctrl-C; temporary files are removed, nothing partial is left).
Data goes to stdout, messages and progress bars to stderr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from ._interrupt import remembered as remembered_interrupts
from ._interrupt import restore as restore_interrupt
from .checkpoints import discover
from .cli_errors import OneLineErrors, errors_to_exit_code, say
from .cli_export import RECALIBRATE_HELP, export_command, say_clamped
from .cli_landscape import landscape_command
from .cli_options import SCHEDULER_HELP, WORKERS_HELP, engine_for_options, finite
from .console import (
    TIME_SOURCES,
    describe,
    human_bytes,
    print_columns,
    print_report,
    print_summary,
    progress_bar,
    shown,
    size_warnings,
)
from .errors import CmdError
from .modefile import open_mode_file, summarize
from .pipeline import fit as fit_folder
from .pipeline import reconstruct_noting
from .reconstruct import WRITE_FORMATS
from .statistics import Clamped
from .version import __version__

app = typer.Typer(
    name="cmd", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineErrors,
    rich_markup_mode="markdown",
    help="Correlation Mode Decomposition (CMD) of training checkpoints.\n\n"
         "CMD finds a few groups of parameters (modes) that move together during training and "
         "models every parameter as a·r(t) + b of its mode's reference trajectory r: a whole run "
         "in a small mode file, from which any checkpoint can be regenerated.\n\n"
         "Typical use: `cmd fit RUN_DIR -o run.cmd.h5`, then `cmd info run.cmd.h5`, then "
         "`cmd reconstruct run.cmd.h5 -o out/ --at last`, and `cmd report run.cmd.h5 -o report/` for "
         "how well the modes explain the run against PCA and weight averaging (with plots). "
         "`cmd ls RUN_DIR` shows which checkpoints "
         "a fit would use, in which order, and what it skips.\n\n"
         "Exit codes: 0 ok, 1 a threshold failed, 2 bad input.")

def _version(value: bool) -> None:
    if value:
        print(f"cmdtool {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(
              False, "--version", callback=_version, is_eager=True,
              help="Print the version and exit.")) -> None:
    pass


@app.command()
def fit(
    checkpoint_dir: Path = typer.Argument(
        ..., metavar="CKPT_DIR",
        help="Folder of per-epoch checkpoints (safetensors or torch files)."),
    output: Path = typer.Option(..., "--output", "-o", help="Mode file to write (conventionally *.cmd.h5)."),
    modes: str = typer.Option(
        "10", "--modes", "-m", metavar="M|auto",
        help="Most modes (M) to find, or auto (auto:MAX): the smallest M within 5 % of the smallest error of an "
             "error-vs-M curve (M = 1 … 20) measured on a second, independent parameter sample."),
    samples: int = typer.Option(
        1000, "--samples", "-k", min=1,
        help="Parameters sampled (K) to find the modes, layer-balanced."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the parameter sample."),
    refine: int = typer.Option(
        3, "--refine", metavar="P", min=0,
        help="Lloyd-style passes that re-pick each mode's reference from its members and reassign, lowering the "
             "error at the same M (0: the paper's references)."),
    start: Optional[int] = typer.Option(
        None, "--start",
        help="First checkpoint to use (position in the sorted folder; Python slice rules)."),
    stop: Optional[int] = typer.Option(None, "--stop", help="Stop before this checkpoint position."),
    every: int = typer.Option(1, "--every", min=1, help="Use every n-th checkpoint."),
    include: List[str] = typer.Option(
        [], "--include", metavar="GLOB",
        help="Model only tensors whose name matches this glob (repeatable)."),
    exclude: List[str] = typer.Option(
        [], "--exclude", metavar="GLOB",
        help="Do not model tensors matching this glob (repeatable); they are carried verbatim."),
    ema: bool = typer.Option(
        False, "--ema",
        help="Model timm's EMA weights (state_dict_ema) instead of the model's state_dict; of Lightning "
             "WeightAveraging checkpoints, the average (state_dict) instead of the trained weights "
             "(current_model_state)."),
    drop_unmodelled: bool = typer.Option(
        False, "--drop-unmodelled",
        help="Leave the floating-point tensors that are not modelled (see --include/--exclude) out of the mode "
             "file; it then cannot rebuild whole checkpoints."),
    trajectory: Optional[Path] = typer.Option(
        None, "--trajectory",
        help="Where to keep the trajectory store (as large as the checkpoints in float32). Default: $CMDTOOL_CACHE "
             "or ~/.cache/cmdtool."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing mode file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of a table."),
    tile_columns: Optional[int] = typer.Option(None, "--tile-columns", min=1, hidden=True),
    warmup: Optional[int] = typer.Option(
        None, "--warmup", metavar="F", min=2,
        help="Online CMD: find the modes and references on the first F selected checkpoints only, then update a, b "
             "exactly with each later one."),
    workers: Optional[int] = typer.Option(None, "--workers", metavar="N", min=1, help=WORKERS_HELP),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", metavar="ADDRESS", help=SCHEDULER_HELP),
    shard_columns: Optional[int] = typer.Option(None, "--shard-columns", min=1, hidden=True),
) -> None:
    """Fit CMD modes to a folder of checkpoints and write a mode file.

    Checkpoints are files or Hugging Face checkpoint-<step>/ folders (full models or PEFT adapters),
    ordered by the step or epoch stored in them, else by the numbers in their names (epoch_2 before
    epoch_10); `cmd ls` lists them. Every floating-point tensor is modelled; integer tensors are carried verbatim. The
    checkpoints are first stacked into a trajectory store, reused by later fits of the same
    unchanged folder. With --warmup F it is the paper's online CMD: the result equals fitting the
    first F checkpoints and then running cmd update with the rest.
    """
    with errors_to_exit_code(output):
        result = fit_folder(checkpoint_dir, output, modes=modes, refine=refine, samples=samples, seed=seed,
                            start=start,
                            stop=stop, every=every, include=include, exclude=exclude, ema=ema,
                            trajectory=trajectory, force=force, tile_columns=tile_columns, progress=progress_bar,
                            warmup=warmup, drop_unmodelled=drop_unmodelled, workers=workers,
                            scheduler=scheduler, shard_columns=shard_columns)
    for warning in result.discovery.warnings:
        say(f"warning: {warning}")
    if any(c.note for c in result.discovery.checkpoints):
        say("note: Lightning WeightAveraging checkpoints: modelled " + (
            "the average (state_dict), as --ema asks" if ema else
            "the trained weights (current_model_state); --ema models the average (state_dict)"))
    if result.discovery.skipped:
        say(f"note: skipped {len(result.discovery.skipped)} entries of {checkpoint_dir} "
                 f"(`cmd ls {checkpoint_dir}` says which and why)")
    size = sum(f.stat().st_size for f in result.trajectory.iterdir()) if result.trajectory.is_dir() \
        else result.trajectory.stat().st_size  # a sharded store is a folder (cmdtool.shards)
    say(f"trajectory store: {result.trajectory} ({human_bytes(size)}, "
             f"{'reused' if result.trajectory_reused else 'built'}; a cache, safe to delete)")
    for warning in size_warnings(result.summary):
        say(f"warning: {warning}")
    say(f"wrote {result.mode_file}")
    summary = {**result.summary, "trajectory": str(result.trajectory), "trajectory_reused": result.trajectory_reused}
    if as_json:
        print(json.dumps(summary))
    else:
        print_summary(summary)


@app.command("ls")
def list_checkpoints(
    checkpoint_dir: Path = typer.Argument(..., metavar="CKPT_DIR", help="Folder of checkpoints, as for cmd fit."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of a table."),
) -> None:
    """List the checkpoints cmd fit would use, in order, with their time and format, and what it
    skips and why. Positions are what --start/--stop/--every select."""
    with errors_to_exit_code():
        found = discover(checkpoint_dir)
    checkpoints = [{"position": i, "time": c.time, "name": c.name, "format": describe(c)}
                   for i, c in enumerate(found.checkpoints)]
    skipped = [{"name": s.path.name, "reason": s.reason} for s in found.skipped]
    if as_json:
        print(json.dumps({"folder": str(checkpoint_dir), "time_source": found.time_source,
                          "checkpoints": checkpoints, "skipped": skipped}))
    else:
        print(shown(f"{len(checkpoints)} checkpoints in {checkpoint_dir}, time from "
                    f"{TIME_SOURCES[found.time_source]}"))
        print_columns(["position", "time", "checkpoint", "format"],
                       [[c["position"], c["time"], c["name"], c["format"]] for c in checkpoints])
        if skipped:
            print(f"skipped {len(skipped)}")
            print_columns(["entry", "reason"], [[s["name"], s["reason"]] for s in skipped])
    for warning in found.warnings:
        say(f"warning: {warning}")


@app.command()
def info(
    mode_file: Path = typer.Argument(..., metavar="MODEFILE", help="A mode file written by cmd fit."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of a table."),
) -> None:
    """Summarise a mode file: sizes, modes, compression and how well the modes fit the run."""
    with errors_to_exit_code():
        summary = summarize(mode_file)
        with open_mode_file(mode_file) as modes:
            references = [modes.layout.locate(int(c)) for c in modes.reference_index]
    for warning in size_warnings(summary):
        say(f"warning: {warning}")
    if as_json:
        print(json.dumps(summary))
        return
    print_summary(summary, references)


@app.command()
def reconstruct(
    mode_file: Path = typer.Argument(..., metavar="MODEFILE", help="A mode file written by cmd fit."),
    output: Path = typer.Option(
        ..., "--output", "-o",
        help="Folder to write the checkpoints into (created if missing)."),
    at: str = typer.Option(
        "last", "--at",
        help="Which checkpoints: last, first, all, or positions such as 0,10,-1 (0-based, as listed by cmd info)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files in the output folder."),
    write_format: str = typer.Option(
        "source", "--format", metavar="|".join(WRITE_FORMATS),
        help="source: as the source was (file, wrapper dict or Hugging Face folder); safetensors: plain safetensors "
             "state dicts."),
) -> None:
    """Regenerate checkpoints from a mode file, in the source format and under the source names.

    The files load with your model's load_state_dict(strict=True): same tensor names, shapes and
    dtypes; integer buffers are restored exactly. Hugging Face checkpoints come back as
    checkpoint-<step>/ folders that from_pretrained loads.
    """
    clamped = Clamped()
    with errors_to_exit_code(output):
        paths, dropped = reconstruct_noting(mode_file, output, at, force, progress=progress_bar, format=write_format,
                                            clamped=clamped)
    say_clamped(clamped)
    if dropped:
        say(f"note: not restored (no longer match the weights): {', '.join(dropped)}")
    for path in paths:
        print(shown(path))


app.command("export")(export_command)


@app.command()
def update(
    mode_file: Path = typer.Argument(
        ..., metavar="MODEFILE",
        help="A mode file written by cmd fit (or an earlier update)."),
    checkpoints: List[Path] = typer.Argument(..., metavar="NEW...", help="New checkpoint files, or folders of them."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of a table."),
) -> None:
    """Online CMD: append checkpoints later than the mode file's last one, updating a, b exactly.

    Modes and references stay as fitted; each new checkpoint extends every reference by its
    reference parameter's value and updates every parameter's a, b through the normal equations,
    without the earlier checkpoints. Checkpoints already in the mode file are skipped with a note;
    an earlier or incompatible checkpoint is an error (exit 2) and the mode file is left untouched.
    The mode file is replaced atomically.
    """
    with errors_to_exit_code(mode_file):
        from .online import update as update_mode_file
        result = update_mode_file(mode_file, checkpoints, progress=progress_bar)
    if result.skipped:
        say(f"note: already in the mode file, skipped: {', '.join(result.skipped)}")
    for note in result.notes:
        say(f"note: {note}")
    if result.absorbed:
        say(f"updated {mode_file} with {len(result.absorbed)} checkpoint{'s' * (len(result.absorbed) > 1)}: "
                 f"{result.absorbed[0]} … {result.absorbed[-1]}")
    else:
        say(f"nothing new: {mode_file} is unchanged")
    for warning in size_warnings(result.summary):
        say(f"warning: {warning}")
    if as_json:
        print(json.dumps({**result.summary, "absorbed": result.absorbed, "skipped": result.skipped}))
    else:
        print_summary(result.summary)


@app.command()
def watch(
    checkpoint_dir: Path = typer.Argument(..., metavar="CKPT_DIR", help="The training run's checkpoint folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Mode file to keep up to date (resumed when it exists)."),
    warmup: int = typer.Option(
        ..., "--warmup", metavar="F", min=2,
        help="Fit the modes once F checkpoints exist; update with each later one."),
    until: Optional[int] = typer.Option(
        None, "--until", metavar="N", min=1,
        help="Stop once the mode file holds N checkpoints (default: until Ctrl-C)."),
    interval: float = typer.Option(
        10.0, "--interval", metavar="S", min=0.0, max=86400.0, callback=finite,
        help="Seconds between looks at the folder (at most a day)."),
    modes: int = typer.Option(10, "--modes", "-m", min=1, help="Most modes (M) to find."),
    samples: int = typer.Option(
        1000, "--samples", "-k", min=1,
        help="Parameters sampled (K) to find the modes, layer-balanced."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the parameter sample."),
    refine: int = typer.Option(
        3, "--refine", metavar="P", min=0,
        help="Lloyd-style passes over the warm-up's references, as cmd fit --refine (0: the paper's references)."),
    include: List[str] = typer.Option(
        [], "--include", metavar="GLOB",
        help="Model only tensors whose name matches this glob (repeatable)."),
    exclude: List[str] = typer.Option(
        [], "--exclude", metavar="GLOB",
        help="Do not model tensors matching this glob (repeatable)."),
    trajectory: Optional[Path] = typer.Option(
        None, "--trajectory",
        help="Where to keep the warm-up's trajectory store. Default: $CMDTOOL_CACHE or ~/.cache/cmdtool."),
    force: bool = typer.Option(False, "--force", help="Refit an existing mode file instead of resuming it."),
) -> None:
    """Online CMD while training runs: follow a checkpoint folder and keep a mode file up to date.

    Fits once F complete checkpoints exist, then updates with each new one in training order. A
    file counts as complete once its size and modification time are unchanged between two looks
    and it opens as a checkpoint, so files still being written are never read; a Hugging Face
    checkpoint-<step>/ folder (full model or PEFT adapter) once all its files are. When a look finds
    nothing new, it says on stderr what it is waiting for. The mode file is
    replaced atomically at every change: killing the process never corrupts it, and running the
    command again resumes. Stops on Ctrl-C (exit 130) or with --until.
    """
    from .online import watch as watch_folder
    with errors_to_exit_code(output), remembered_interrupts() as interrupts:
        try:  # a Ctrl-C Python ignored (raised in a weakref callback) stops it at the next look
            watch_folder(checkpoint_dir, output, warmup=warmup, until=until, interval=interval, modes=modes,
                         samples=samples, seed=seed, refine=refine, include=include, exclude=exclude,
                         trajectory=trajectory, force=force, progress=progress_bar, say=say,
                         sleep=interrupts.sleep)
        except KeyboardInterrupt:
            say(f"interrupted: {output} is intact (it is replaced atomically; run again to resume)"
                     if output.exists() else "interrupted: no mode file was written yet")
            raise typer.Exit(130) from None
    say(f"stopped: {output} holds {until} checkpoints or more (--until {until})")


@app.command()
def report(
    mode_file: Path = typer.Argument(..., metavar="MODEFILE", help="A mode file written by cmd fit."),
    output: Path = typer.Option(
        ..., "--output", "-o",
        help="Report folder to write (report.html, report.md, report.json, PNG plots)."),
    checkpoints: Optional[Path] = typer.Option(
        None, "--checkpoints", metavar="DIR",
        help="Read the original checkpoints from this folder (default: the trajectory store kept by cmd fit)."),
    trajectory: Optional[Path] = typer.Option(
        None, "--trajectory",
        help="Trajectory store to use, or where to build one with --checkpoints."),
    evaluate: Optional[str] = typer.Option(
        None, "--eval", metavar="MODULE:FUNCTION",
        help="Score weights with your function state_dict -> {metric: float} or {split: {metric: float}} (e.g. val "
             "and test): module:function (importable from here) or path/to/file.py:function."),
    eval_timeout: Optional[float] = typer.Option(
        None, "--eval-timeout", metavar="SECONDS", callback=finite,
        help="Stop with an error when one call of the --eval function takes longer than this."),
    select: Optional[str] = typer.Option(
        None, "--select", metavar="METRIC[:max|min]",
        help="Choose each candidate family's best checkpoint by this metric on the validation split (val) and report "
             "it on the others; max unless the name says loss or error."),
    eval_every: int = typer.Option(
        1, "--eval-every", metavar="K", min=1,
        help="Score the candidate families at every K-th checkpoint (and the last) only."),
    candidates_only: bool = typer.Option(
        False, "--candidates-only",
        help="Score the candidates at the last checkpoint only (no per-checkpoint curves, no selection)."),
    tail: List[int] = typer.Option(
        [5, 10], "--tail", metavar="K", min=1,
        help="Tail averages of the last K checkpoints to compare (repeatable)."),
    ema_decay: float = typer.Option(
        0.9, "--ema-decay", callback=finite,
        help="Decay of the EMA over checkpoints that is compared."),
    max_rel_error: Optional[float] = typer.Option(
        None, "--max-rel-error", metavar="X", callback=finite,
        help="Fail (exit 1) when rel_error is above X."),
    max_rel_error_displacement: Optional[float] = typer.Option(
        None, "--max-rel-error-displacement", metavar="X", callback=finite,
        help="Fail (exit 1) when rel_error_displacement is above X."),
    require: List[str] = typer.Option(
        [], "--require", metavar="METRIC>=VALUE",
        help="Fail (exit 1) unless an evaluated metric of the CMD weights at the last checkpoint meets this (>=, "
             "<=, >, <; repeatable; needs --eval)."),
    recalibrate: Optional[str] = typer.Option(None, "--recalibrate", metavar="MODULE:FUNCTION", help=RECALIBRATE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing report folder."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json on stdout instead of a summary."),
    workers: Optional[int] = typer.Option(None, "--workers", metavar="N", min=1, help=WORKERS_HELP),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", metavar="ADDRESS", help=SCHEDULER_HELP),
) -> None:
    """Report how well the modes explain the run, against PCA of the trajectory and weight averaging.

    Writes report.html (self-contained), report.md, report.json and PNG plots into the report
    folder; with --eval also scores every candidate family (original, CMD, tail means, EMA, PCA) at
    every checkpoint, and with --select and a validation split chooses each family's best epoch on
    validation and reports it on test.
    When GITHUB_STEP_SUMMARY is set, the summary is appended to it. Exit 1 when a threshold fails.
    """
    with errors_to_exit_code(output):
        from .report import Thresholds, load_evaluate, make_report, parse_requirement
        thresholds = Thresholds(max_rel_error, max_rel_error_displacement, [parse_requirement(r) for r in require])
        if eval_timeout is not None and not evaluate:
            raise CmdError("eval_timeout needs `evaluate`", parameter="eval_timeout", mentions=("evaluate",))
        function = load_evaluate(evaluate, eval_timeout) if evaluate else None
        recalibrate_function = load_evaluate(recalibrate, parameter="recalibrate") if recalibrate else None
        with engine_for_options(workers, scheduler) as engine:
            result = make_report(mode_file, output, checkpoints=checkpoints, trajectory=trajectory, evaluate=function,
                                 eval_spec=evaluate or "", tail=tail, ema_decay=ema_decay, thresholds=thresholds,
                                 force=force, progress=progress_bar, select=select, eval_every=eval_every,
                                 candidates_only=candidates_only, measure_pass=engine and engine.measure_pass,
                                 recalibrate=recalibrate_function, recalibrate_spec=recalibrate or "")
    r = result.report
    say_clamped((r["evaluation"] or {}).get("clamped_running_var", {}).get("total", 0))
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:  # GitHub Actions shows this file on the run's page; append, never overwrite
        with open(step_summary, "a", encoding="utf-8") as f:
            f.write((result.folder / "summary.md").read_text()
                    + f"\nFull report: `{result.folder / 'report.html'}`\n\n")
    if r["evaluation"]:
        e = r["evaluation"]
        say(f"evaluated {e['evaluations']} state dicts: {len(e['per_epoch'])} candidate families at "
                 f"{len(e['epochs'])} of {r['run']['checkpoints']} checkpoints (--eval-every, --candidates-only "
                 "score fewer)")
    say(f"wrote {result.folder / 'report.html'} (also report.md, report.json and {len(r['plots'])} plots)")
    if as_json:
        print(json.dumps(r))
    else:
        print_report(r)
    for line in result.failures:
        say(f"threshold failed: {line}")
    if result.failures:
        raise typer.Exit(1)


app.command("landscape")(landscape_command)


def main() -> None:
    restore_interrupt()
    app()
