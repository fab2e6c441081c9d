"""The ``cmd`` command line's errors: library errors and usage errors as one ``error: ...`` line and
exit 2 (the click group, ``errors_to_exit_code``), in the command line's words (``in_cli_words``).
Option checks and help texts are in ``cli_options``; progress bars in ``console``."""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer

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
