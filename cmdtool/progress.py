"""Progress reporting: library calls take an optional ``progress`` so that the CLI can draw bars
and a notebook stays quiet. ``progress(description, total)`` is a context manager yielding
``advance(n)``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator

Advance = Callable[[int], None]
Progress = Callable[[str, int], ContextManager[Advance]]


@contextmanager
def no_progress(description: str, total: int) -> Iterator[Advance]:
    yield lambda n: None
