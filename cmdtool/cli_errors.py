"""Usage errors and option values of the ``cmd`` command line, in its one-line error style: the
click group that maps usage errors to ``error: ...`` and exit 2, and the check that a float option
is finite."""

from __future__ import annotations

import importlib
import math
import sys

import typer


def _say(text: str) -> None:
    print(text, file=sys.stderr)


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
            _say(f"error: {where}{' '.join(e.format_message().split())}{hint}")
            sys.exit(2)
        except (getattr(_click, "Abort", typer.Abort), typer.Abort):
            _say("interrupted: no output was written")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


def finite(value: float | None) -> float | None:
    """A float option must be a number: ``inf`` and ``nan`` are refused."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value
