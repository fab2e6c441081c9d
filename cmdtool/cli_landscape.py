"""``cmd landscape``: the command over ``cmdtool.landscape`` (options, the count of evaluations, the summary)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .cli_errors import errors_to_exit_code, say
from .cli_options import finite
from .console import progress_bar, shown


def landscape_command(
    mode_file: Path = typer.Argument(..., metavar="MODEFILE", help="A mode file written by cmd fit."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Folder to write (landscape.json, landscape.md, one PNG per metric)."),
    evaluate: str = typer.Option(
        ..., "--eval", metavar="MODULE:FUNCTION",
        help="Score weights with your function state_dict -> {metric: float} or {split: {metric: float}}, as cmd "
             "report --eval: module:function (importable from here) or path/to/file.py:function."),
    modes: Optional[str] = typer.Option(
        None, "--modes", metavar="I,J", help="The two modes to vary (as cmd info numbers them; default 0,1, the two "
                                             "largest)."),
    at: str = typer.Option(
        "last", "--at", metavar="POSITION",
        help="The checkpoint whose reference values are varied: last, first or a position (0-based)."),
    grid: int = typer.Option(11, "--grid", metavar="G", help="Points per axis, odd (G × G evaluations)."),
    span: float = typer.Option(
        0.5, "--span", metavar="S", callback=finite,
        help="Largest relative change of a reference value (0.5: from −50 % to +50 %)."),
    select: Optional[str] = typer.Option(
        None, "--select", metavar="METRIC[:max|min]",
        help="Choose the best point by this metric on the validation split (val) and report it on the others "
             "(default: the validation loss, else its first metric)."),
    checkpoints: Optional[Path] = typer.Option(
        None, "--checkpoints", metavar="DIR",
        help="Read the original checkpoint from this folder (default: the trajectory store kept by cmd fit)."),
    trajectory: Optional[Path] = typer.Option(
        None, "--trajectory", help="Trajectory store to use, or where to build one with --checkpoints."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print landscape.json on stdout instead of a summary."),
) -> None:
    """The loss and accuracy landscape over two modes' reference values (paper §3.5).

    Varies the values at --at of two mode references over a G × G grid of relative changes from
    −S to +S (the centre is the CMD weights themselves), keeps every other mode at its value,
    rebuilds the weights a·r + b at each point and scores them with --eval. The best point is
    chosen on the validation split and reported on the others, beside the centre and the
    original checkpoint; `cmd export --from-landscape DIR` writes its weights.
    """
    with errors_to_exit_code(output):
        from .landscape import landscape
        from .report import load_evaluate
        function = load_evaluate(evaluate)
        result = landscape(mode_file, output, evaluate=function, eval_spec=evaluate, modes=modes, at=at, grid=grid,
                           span=span, select=select, checkpoints=checkpoints, trajectory=trajectory, force=force,
                           progress=progress_bar, say=lambda text: say(shown(text)))
    say(f"wrote {result.folder / 'landscape.json'} (also landscape.md and {len(result.plots)} plots)")
    data = result.landscape
    if as_json:
        print(json.dumps(data))
        return
    keys = data["keys"]
    rows = []
    if data["chosen"] is not None:
        rows.append((f"chosen on {data['selection']['key']}", data["chosen"]["offsets"], data["chosen"]["scores"]))
    rows.append(("centre (CMD weights)", [0.0, 0.0], data["centre"]["scores"]))
    if data["original"] is not None:
        rows.append(("original checkpoint", data["original"]["projection"]["offsets"], data["original"]["scores"]))
    modes_shown = " ".join(f"mode {axis['mode']}" for axis in data["axes"])
    print("\t".join(shown(cell) for cell in ["point", modes_shown, *keys]))
    for label, offsets, scores in rows:
        offsets_shown = " ".join("?" if v is None else f"{v:+.1%}" for v in offsets)
        cells = [label, offsets_shown, *("" if scores.get(k) is None else f"{scores[k]:.4g}" for k in keys)]
        print("\t".join(shown(cell) for cell in cells))
    for note in (data["selection_impossible"], data["original_note"], data["clamped_running_var"]["note"]):
        if note:
            say(shown(f"note: {note}"))
