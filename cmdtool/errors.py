"""The one exception type for bad input: the CLI prints its message and exits with code 2."""


class CmdError(ValueError):
    """Bad input (a file, a folder, a value): the message names what and where. A ``ValueError``,
    so that code catching bad values as Python does catches it too.

    Messages speak the library's words: a bad argument is named as the Python parameter
    (``modes must be ...``), given as ``parameter``; other parameters the message names are
    written in backticks (``select needs `evaluate```) and listed in ``mentions``. The CLI puts its
    options (``--modes``, ``--eval``) in their place.

    Attributes:
        parameter: The Python parameter the error is about, if any.
        mentions: Other parameters the message names.
    """

    def __init__(self, message: str, *, parameter: str | None = None, mentions: tuple[str, ...] = ()):
        super().__init__(message)
        self.parameter = parameter
        self.mentions = tuple(mentions)


def first_sentence(error: Exception) -> str:
    """A third-party exception in one short line: its type and the first sentence of its message."""
    text = str(error).strip().split("\n")[0]
    return f"{type(error).__name__}: {text.split('. ')[0].rstrip('.')[:200]}"
