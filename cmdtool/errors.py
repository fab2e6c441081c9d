"""The one exception type for bad input: the CLI prints its message and exits with code 2."""


class CmdError(Exception):
    """Bad input (a file, a folder, a value): the message names what and where.

    Messages speak the library's words: a bad argument is named as the Python parameter
    (``modes``), given as ``parameter``; the CLI puts its option (``--modes``) in its place.
    """

    def __init__(self, message: str, *, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter
