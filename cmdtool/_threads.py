"""Work spread over threads, results in order: the streaming passes of the fit and the report
(``fitting``, ``report.compose``) and the ingest's reading thread (``trajectory``). numpy's ufuncs,
BLAS and file reads release the GIL, so threads run them side by side."""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator


def in_threads(function: Callable, items: Iterable, threads: int, ahead: int | None = None) -> Iterator:
    """``map(function, items)``, results in the order of ``items``, computed by ``threads`` threads
    with at most ``ahead`` items (default ``2 × threads``) taken ahead of the one waited for, so that
    memory is a few items whatever their number; one thread and no ``ahead``: in the caller's, one at
    a time. ``function`` must not depend on which thread runs it or when: each result is then the
    same bits as in one thread, and so is everything summed from them in order. The item after the
    one handed out is only taken when the caller asks for the next (an item's buffers may be reused
    from then on). Leaving early (an error, Ctrl-C) cancels what has not started and waits for the
    rest."""
    if threads <= 1 and ahead is None:
        yield from map(function, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    ahead = 2 * threads if ahead is None else ahead
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="cmd-pass") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
