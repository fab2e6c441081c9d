"""The command line: ``cmd``, ``cmdtool`` and ``python -m cmdtool``."""


def main() -> None:
    """Ctrl-C while the command line is still importing is one line and exit 130 (``_interrupt``);
    then the typer app runs. Importing ``cmdtool`` as a library installs no signal handler."""
    from ._interrupt import quiet_while_importing

    quiet_while_importing()
    from .cli import main as run

    run()


if __name__ == "__main__":
    main()
