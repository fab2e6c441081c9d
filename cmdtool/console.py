"""What the commands print on stdout: tables of a mode file's summary, a report, a checkpoint listing.
Never wrapped, so that names and paths stay whole for scripts."""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .units import human_bytes

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)
UNWRAPPED = 10_000  # the width tables are laid out in when stdout is not a terminal: never wrapped
unwrapped = Console(highlight=False, width=UNWRAPPED)


def _print(renderable) -> None:
    """Print on stdout; piped or redirected, at a width that never wraps a table at 80 columns."""
    if stdout.is_terminal:
        stdout.print(renderable, markup=False)
        return
    with unwrapped.capture() as captured:
        unwrapped.print(renderable, markup=False)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def plain(text: str) -> str:
    """A report sentence for the terminal: without Markdown's ``**`` and backticks."""
    return text.replace("**", "").replace("`", "")

TIME_SOURCES = {"global_step": "the stored global_step", "step": "the stored step",
                 "epoch": "the stored epoch", "name": "the numbers in the names",
                 "position": "the position in natural sort order"}


STACK_NAMES = {"peft": "huggingface peft adapter"}  # Checkpoint.stack, where it needs more words

# control characters (C0, DEL, C1: escape sequences, carriage returns), bidirectional overrides and
# lone surrogates (an undecodable file name), which no stored string may put raw on a terminal
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def shown(text: object) -> str:
    """``text`` as it may reach a terminal: its control characters, bidirectional overrides and lone
    surrogates written as Python escapes (``\\x1b``, ``\\u202e``), everything else unchanged. Every
    string a command prints that comes from a file (checkpoint and tensor names, a mode file's
    settings) goes through here; JSON output escapes them itself."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"),
                            str(text))


def _add(table: Table, *cells: object) -> None:
    table.add_row(*(shown(cell) for cell in cells))


def print_columns(header: list[str], rows: list[list]) -> None:
    """Left-aligned columns that never wrap (names and paths stay whole for scripts)."""
    cells = [header] + [[shown(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def describe(checkpoint) -> str:
    """``huggingface safetensors, 4 shards``, ``lightning torch``, ``plain safetensors``,
    ``huggingface peft adapter safetensors``, ``torch.distributed.checkpoint, 2 shards``."""
    text = (checkpoint.stack if checkpoint.format == "dcp"
            else f"{STACK_NAMES.get(checkpoint.stack, checkpoint.stack)} {checkpoint.format}")
    if checkpoint.folder is not None and len(checkpoint.folder.weights) > 1:
        text += f", {len(checkpoint.folder.weights)} shards"
    if checkpoint.note:
        text += f", {checkpoint.note}"
    return text


def print_report(r: dict) -> None:
    """The verdict first (thresholds, then did CMD help), then the tables."""
    for line in r["verdict"]["lines"]:
        stdout.print(shown(plain(line)), markup=False, soft_wrap=True)
    fit, compact = r["fit"], r["compactness"]
    table = Table(box=None, pad_edge=False)
    for column in ("model", "compression", "rel_error", "rel_error_displacement"):
        table.add_column(column, justify="left" if column == "model" else "right")
    _add(table, f"CMD, {r['run']['modes']} modes", f"{compact['compression_ratio_modelled']:.1f}×",
                  f"{fit['rel_error']:.4g}", f"{fit['rel_error_displacement']:.4g}")
    for p in r["baselines"]["pca"]:
        _add(table, f"PCA d={p['d']}", f"{compact['checkpoint_bytes_float32'] / p['bytes_float32']:.1f}×",
                      f"{p['rel_error']:.4g}", f"{p['rel_error_displacement']:.4g}")
    _print(table)
    evaluation = r["evaluation"]
    if evaluation:
        names = list(evaluation["per_checkpoint"]["original"])
        candidates = Table(box=None, pad_edge=False)
        candidates.add_column("candidate")
        for name in names:
            candidates.add_column(shown(name), justify="right")
        for candidate, scores in evaluation["candidates"].items():
            _add(candidates, candidate, *(f"{scores[k]:.4g}" if scores.get(k) is not None else "–" for k in names))
        _print(candidates)
        print_selection(evaluation, r["verdict"])
    for t in r["thresholds"]:
        stdout.print(shown(f"{'pass' if t['passed'] else 'FAIL'}: {t['description']}"), markup=False, soft_wrap=True)


def print_selection(evaluation: dict, verdict: dict | None = None) -> None:
    """``--select``: each family's position chosen on validation and its other splits' scores; ★ on
    the families the verdict calls best on test."""
    chosen = evaluation["selection"]
    if chosen:
        judged = next((m for m in (verdict or {}).get("metrics", []) if m["under_selection"]), None)
        winners = set(judged["under_selection"]["winners"]) if judged else set()
        columns = [chosen["key"], *chosen["reported"]]
        table = Table(box=None, pad_edge=False)
        for column in ("chosen on validation", "position", *columns):
            table.add_column(shown(column), justify="left" if column == "chosen on validation" else "right")
        for row in chosen["rows"]:
            _add(table, ("★ " if row["family"] in winners else "") + row["family"], str(row["epoch"]),
                          *(f"{row['scores'][k]:.4g}" if row["scores"].get(k) is not None else "–" for k in columns))
        _print(table)
    elif evaluation["selection_impossible"]:
        stdout.print("no selection: the evaluation returned no validation split", markup=False)


def print_summary(s: dict, references: list | None = None) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    time = s["time"]
    _add(table, "mode file", f"{s['mode_file']} ({human_bytes(s['mode_file_bytes'])}, format "
                               f"v{s['format_version']}, cmdtool {s['tool_version']})")
    _add(table, "checkpoints (T)", f"{s['checkpoints']}: {s['checkpoint_names'][0]} … {s['checkpoint_names'][-1]} "
                                     f"(time {time[0]} … {time[-1]})")
    _add(table, "parameters (N)", f"{s['parameters']:,} in {s['tensors_modelled']} tensors"
                  + (f" (+{s['tensors_carried']} carried verbatim)" if s["tensors_carried"] else ""))
    asked = (f"chosen by --modes auto among 1 … {s['settings']['auto_modes']}" if s["settings"].get("auto_modes")
             else f"asked for at most {s['settings']['modes']}")
    _add(table, "modes (M)", f"{s['modes']} ({asked}; sampled K = {s['settings']['samples']}, "
                  f"seed {s['settings']['seed']})")
    settings = s["settings"]
    start, stop, every = settings["start"], settings["stop"], settings["every"]
    selection = ("all checkpoints" if start is None and stop is None and every == 1 else
                 f"checkpoints[{'' if start is None else start}:{'' if stop is None else stop}:{every}]")
    _add(table, "fitted on", f"{selection} of {settings['source']}"
                  + "".join(f" --include {p}" for p in settings["include"])
                  + "".join(f" --exclude {p}" for p in settings["exclude"]))
    if s.get("online"):
        F, names = s["online"]["warmup"], s["checkpoint_names"]
        _add(table, "online", f"modes found on the first {F} checkpoints ({names[0]} … {names[F - 1]}), "
                      f"then {s['online']['updates']} exact update{'s' * (s['online']['updates'] != 1)} of a, b")
    if s.get("embedding"):
        _add(table, "embedded", embedding_line(s["embedding"], s["time"]))
    _add(table, "trajectory store", settings["trajectory"])
    for label, text in compression_rows(s):
        _add(table, label, text)
    _add(table, "rel_error", f"{s['rel_error']:.3g}  (‖W − Ŵ‖ / ‖W‖ over all checkpoints)")
    _add(table, "rel_error_displacement", f"{s['rel_error_displacement']:.3g}  (error ÷ how far weights moved from "
                                            "the first checkpoint)")
    curve = s.get("error_curve")
    if curve:
        _add(table, "modes chosen", f"M = {curve['chosen']}: {curve['rule']} (--modes auto; measured on "
                      f"{curve['measured_on']})")
        _add(table, "error vs M", "  ".join(f"{m}:{e:.3g}" for m, e in zip(curve["modes"], curve["rel_error"])))
    if s["settings"].get("refine"):
        _add(table, "refined", f"{s['settings']['refine']} Lloyd-style passes over the references")
    _print(table)
    modes = Table(title=None, box=None, pad_edge=False)
    for column in ("mode", "parameters", "share") + (("reference parameter",) if references else ()):
        modes.add_column(column, justify="left" if column == "reference parameter" else "right")
    for m, size in enumerate(s["mode_sizes"]):
        row = [str(m), f"{size:,}", f"{100 * size / s['parameters']:.1f}%"]
        if references:
            name, index = references[m]
            row.append(f"{name}[{', '.join(map(str, index))}]")
        _add(modes, *row)
    _print(modes)


def compression_rows(s: dict) -> list[tuple[str, str]]:
    """The mode file against the checkpoints' own tensor bytes, and against float32 when the run is
    stored in another dtype (a bfloat16 run's float32 figure is twice its own)."""
    own = s.get("checkpoint_bytes")
    if own is None:  # a summary from before the own-bytes figures
        return [("compression", f"{s['compression_ratio']:.1f}× ({human_bytes(s['checkpoint_bytes_float32'])} of "
                                "float32 checkpoints)")]
    dtypes = s.get("checkpoint_dtypes") or []
    rows = [("compression", f"{s['compression_ratio_checkpoint_bytes']:.1f}× ({human_bytes(own)} of "
                            f"{'/'.join(dtypes) or 'carried'} checkpoint tensors)")]
    if dtypes != ["float32"]:
        float32 = human_bytes(s["checkpoint_bytes_float32"])
        rows.append(("compression, float32", f"{s['compression_ratio']:.1f}× ({float32} of modelled parameters "
                                             "as float32)"))
    return rows


def size_warnings(s: dict) -> list[str]:
    """A warning when the mode file is not smaller than the checkpoints it stands for."""
    own = s.get("checkpoint_bytes")
    if own is None or s["mode_file_bytes"] < own:
        return []
    return [f"the mode file ({human_bytes(s['mode_file_bytes'])}) is not smaller than the {s['checkpoints']} "
            f"checkpoints' tensors ({human_bytes(own)}): it stores about 9 bytes per parameter (a, b and a mode "
            f"label) plus fixed overhead, so it saves space only with more checkpoints or a larger model"]


def embedding_line(e: dict, time: list) -> str:
    """Embedded CMD: the final fraction, the settings, and the fraction after each window."""
    steps = [f"{100 * f:.0f}% at {t}" for i, (f, t) in enumerate(zip(e["fraction"], time))
             if f > 0 and (i == 0 or f != e["fraction"][i - 1])]
    return (f"{100 * e['embedded_fraction']:.1f}% of {e['embeddable']:,} trainable parameters ({e['embedded']:,}; "
            f"F = {e['warmup']}, L = {e['window']}, P = {e['percent']:g}%, "
            f"{'of those not yet embedded' if e['relative'] else 'of all'}); over time: "
            + (", ".join(steps) if steps else "none embedded"))


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr, or nothing when stderr is not a terminal."""
    if not stderr.is_terminal:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
