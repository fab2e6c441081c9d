"""The one exception type for bad input: the CLI prints its message and exits with code 2."""


class CmdError(Exception):
    """Bad input (a file, a folder, an option): the message names what and where."""
