"""The ``cmd`` command line's plumbing, in its one-line error style: library errors and usage errors
as one ``error: ...`` line and exit 2 (the click group, ``errors_to_exit_code``), the check that a
float option is finite, progress bars on stderr, and the Dask engine of ``--workers/--scheduler``."""

from __future__ import annotations

import importlib
import math
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .console import shown
from .errors import CmdError

# click's exceptions, from the copy typer uses (recent typer versions vendor click)
_click = importlib.import_module(typer.BadParameter.__module__)


class OneLineErrors(typer.core.TyperGroup):
    """Usage errors (unknown option, missing argument, bad value) as one ``error:`` line, exit 2,
    instead of click's usage text and typer's box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except _click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            where = f"{ctx.command_path}: " if ctx else ""
            hint = f" (see {ctx.command_path} --help)" if ctx and isinstance(e, _click.UsageError) else ""
            say(f"error: {where}{' '.join(e.format_message().split())}{hint}")
            sys.exit(2)
        except (getattr(_click, "Abort", typer.Abort), typer.Abort):
            say("interrupted: no output was written")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


def finite(value: float | None) -> float | None:
    """A float option must be a number: ``inf`` and ``nan`` are refused."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


stderr = Console(stderr=True, highlight=False)
WORKERS_HELP = "Run on a Dask cluster of N worker processes on this machine (needs pip install 'cmd-modes[dask]')."
SCHEDULER_HELP = ("Run on an existing Dask cluster (e.g. tcp://host:8786); its workers must see the checkpoint "
                  "folder and the trajectory store path.")


def engine_for_options(workers: Optional[int], scheduler: Optional[str]):
    """A Dask engine for --workers / --scheduler, else nothing (Dask is imported only then)."""
    if workers is None and scheduler is None:
        return nullcontext(None)
    from .distributed import engine_for
    return engine_for(workers, scheduler)


def say(text: str) -> None:
    """A message line on stderr, never wrapped (paths stay whole for scripts); control characters
    of names in it (a checkpoint's, a tensor's) escaped (``console.shown``)."""
    print(shown(text), file=sys.stderr)


def error_exit(message: str) -> typer.Exit:
    say(f"error: {message}")
    return typer.Exit(2)


OPTIONS = {"evaluate": "--eval"}  # library parameters whose option is not ``--`` + the name with dashes


def option_of(parameter: str) -> str:
    return OPTIONS.get(parameter, "--" + parameter.replace("_", "-"))


def in_cli_words(error: CmdError) -> str:
    """The library names a bad argument as its parameter (``modes must be ...``) and other parameters
    in backticks (``needs `evaluate```); say the options instead."""
    message, parameter = str(error), error.parameter
    if parameter and message.startswith(parameter):
        message = option_of(parameter) + message[len(parameter):]
    for name in error.mentions:
        message = message.replace(f"`{name}`", option_of(name))
    return message


@contextmanager
def errors_to_exit_code(output: Path | None = None) -> Iterator[None]:
    """CmdError and OSError as one ``error:`` line, exit 2; an OSError that names no file (a write
    that failed on a full disk, deep inside a library) is attributed to the command's ``output``."""
    try:
        yield
    except CmdError as e:
        raise error_exit(in_cli_words(e)) from None
    except OSError as e:
        where = e.filename or output or ""
        raise error_exit(f"{where}: {e.strerror or e}".lstrip(": ")) from None
    except KeyboardInterrupt:
        say("interrupted: no output was written")
        raise typer.Exit(130) from None


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
