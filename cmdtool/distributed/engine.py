"""The client side: a Dask client on a ``LocalCluster`` (``--workers N``) or an existing scheduler
(``--scheduler ADDRESS``), and the three maps the library hands to it: ingest over shards
(``map_shards``), the fit's steps 5–6 over groups of tiles (``map_tiles``, for
``fitting.fit_trajectory``) and the report's pass (``measure_pass``, for ``report.make_report``).

Results are gathered in column order and reduced here, in that order, so the mode file and the
report are the same bit for bit whatever the number of workers. A worker lost mid-task is
rescheduled by Dask (its scheduler retries a task whose worker died, up to
``distributed.scheduler.allowed-failures`` times); a task's own error (bad input) is raised here.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import warnings
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import CmdError
from ..fitting import TileResult, column_groups
from ..report.metrics import FitMeasures, measure_by_groups
from ..shards import ShardedStore
from ..trajectory import TrajectoryStore
from . import tasks

CONNECT_TIMEOUT_S = 10
IN_FLIGHT_PER_WORKER = 2  # tasks submitted a worker ahead of the result the client waits for
MALLOC_KEEP_BYTES = 64 * 2**20
# glibc reads these when a worker process starts (other C libraries ignore them). Dask's nanny
# starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also fixes glibc's mmap threshold at
# 128 KiB: every 2 MB float64 slice of the pass is then a fresh mmap and page faults (measured:
# one group of tiles took 0.92–1.08 s on a worker against 0.26 s in-process; 0.32–0.34 s with
# blocks up to 64 MiB kept). Set through Dask's own setting, before the workers start.
WORKER_MALLOC = {"MALLOC_TRIM_THRESHOLD_": MALLOC_KEEP_BYTES, "MALLOC_MMAP_THRESHOLD_": MALLOC_KEEP_BYTES}


def location(store: TrajectoryStore) -> str:
    """What a worker opens: a sharded store's folder, or the single store file (a path it must see)."""
    return str(store.folder if isinstance(store, ShardedStore) else store.path)


@dataclass
class Engine:
    """A Dask client and what it moved: ``stats`` counts tasks, the bytes the workers read from the
    store and the checkpoints, and the bytes of results sent back to this client."""
    client: object
    cluster: object = None
    stats: dict = field(default_factory=lambda: dict.fromkeys(
        ("tasks", "store_bytes_read", "checkpoint_bytes_read", "result_bytes"), 0))
    task_hook: Callable[[int], None] | None = None  # run first in every task (tests: kill a worker)

    @classmethod
    def start(cls, workers: int | None = None, scheduler: str | None = None) -> "Engine":
        if (workers is None) == (scheduler is None):
            raise CmdError("give one of `workers` (N: a Dask cluster on this machine) and `scheduler` (an ADDRESS)",
                           mentions=("workers", "scheduler"))
        try:
            from dask.distributed import Client, LocalCluster
        except ModuleNotFoundError:
            raise CmdError("workers and `scheduler` need Dask: pip install 'cmd-modes[dask]'", parameter="workers",
                           mentions=("scheduler",)) from None
        except ImportError as e:  # installed but broken (or shadowed by a local distributed.py)
            raise CmdError(f"workers and `scheduler` need Dask, which failed to import ({e})", parameter="workers",
                           mentions=("scheduler",)) from None
        if scheduler is not None:
            _probe(scheduler)
            try:
                return cls(Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s"))
            except (OSError, TimeoutError, ValueError) as e:
                raise CmdError(f"cannot reach the Dask scheduler at {scheduler} ({type(e).__name__}: "
                               f"{_first_line(e) or 'no answer'})") from None
        if not 1 <= workers <= max_workers():
            raise CmdError(f"workers must be 1 … {max_workers()} (4 per CPU core of this machine; got {workers})",
                           parameter="workers")
        import dask.config

        environment = {f"distributed.nanny.pre-spawn-environ.{name}": value for name, value in WORKER_MALLOC.items()}
        with warnings.catch_warnings(), dask.config.set(environment):
            # its HTTP server (health, metrics) takes any free port
            warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
            # silence_logs: a failing task is raised here as the one error line; the workers' own
            # "Compute Failed" report with its traceback would come before it on stderr
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=None, silence_logs=logging.CRITICAL)
        return cls(Client(cluster), cluster)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _in_order(self, function: Callable, calls: Iterable[tuple]) -> Iterator:
        """Submit one task per argument tuple; yield their results in the order of ``calls``. At most
        ``IN_FLIGHT_PER_WORKER`` tasks a worker are submitted ahead of the result the client waits for,
        so that neither the arguments ``calls`` makes (the report's ``labels, a, b`` of a group) nor
        the results waiting to be gathered add up to N of anything, on the client or the workers."""
        token = uuid.uuid4().hex[:8]
        name = function.__name__
        window = IN_FLIGHT_PER_WORKER * max(1, len(self.client.nthreads()))
        pending: deque = deque()
        try:
            for i, args in enumerate(calls):
                pending.append(self.client.submit(function, *args, key=f"cmd-{name}-{token}-{i}", pure=False))
                self.stats["tasks"] += 1
                if len(pending) > window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

    def map_shards(self, function: Callable, jobs: list) -> list:
        """``map`` for ``shards.build_sharded``: one ingest task per shard (``function`` is
        ``shards.write_shard``, run through ``tasks.ingest_shard``)."""
        function = tasks.ingest_shard if function is tasks.write_shard else function
        read = list(self._in_order(function, [(job,) for job in jobs]))
        self.stats["checkpoint_bytes_read"] += sum(read)
        return read

    def map_tiles(self, store: TrajectoryStore, group_columns: int | None = None):
        """``map_tiles`` for ``fitting.fit_trajectory`` over ``store``: one task per group of tiles."""
        def run(references: np.ndarray, width: int) -> Iterator[TileResult]:
            groups = column_groups(store.N, width, *(() if group_columns is None else (group_columns,)))
            calls = [(location(store), lo, hi, width, references, self.task_hook) for lo, hi in groups]
            for results, read in self._in_order(tasks.fit_group, calls):
                self.stats["store_bytes_read"] += read
                self.stats["result_bytes"] += sum(r.labels.nbytes + r.a.nbytes + r.b.nbytes + 16 * r.mode_sse.size
                                                  for r in results)
                yield from results
        return run

    def measure_pass(self, modes, store: TrajectoryStore, advance: Callable[[int], None]) -> FitMeasures:
        """The report's streaming pass (``metrics.measure_by_groups``) with one task per group."""
        def map_groups(arguments: Iterator[tuple]) -> Iterator[tuple[FitMeasures, int]]:
            calls = ((location(store), *group, self.task_hook) for group in arguments)
            for measured, read in self._in_order(tasks.measure_group, calls):
                self.stats["store_bytes_read"] += read
                self.stats["result_bytes"] += sum(np.asarray(v).nbytes for v in measured)
                yield measured, read

        return measure_by_groups(modes, map_groups, advance)


def max_workers() -> int:
    """The most ``--workers`` on this machine: 4 per CPU core, at most 256 (each worker is a process
    with its own sockets and files; beyond that a machine runs out of descriptors, not speed)."""
    return min(256, 4 * (os.cpu_count() or 1))


def _first_line(error: BaseException) -> str:
    return " ".join(str(error).splitlines()[:1])[:200]


def _probe(scheduler: str) -> None:
    """Connect to ``scheduler`` once with Dask's own protocol, the whole exchange bounded by
    ``CONNECT_TIMEOUT_S``: Dask bounds the TCP connect by its timeout but then waits for the
    scheduler's handshake without one (a peer that accepts and never speaks hangs the client
    forever), and a peer that sends garbage makes it allocate whatever length it declares. Only
    ``tcp://`` (the default scheme): ``tls://`` needs security settings cmdtool does not pass."""
    import asyncio

    from distributed.comm import connect
    from distributed.comm.addressing import parse_address

    try:
        scheme, _ = parse_address(scheduler)
    except (ValueError, TypeError) as e:
        raise CmdError(f"scheduler {scheduler!r} is not a Dask address ({_first_line(e)})",
                       parameter="scheduler") from None
    if scheme != "tcp":
        raise CmdError(f"scheduler {scheduler}: only tcp:// addresses are supported (not {scheme}://)",
                       parameter="scheduler")

    async def handshake() -> None:
        comm = await asyncio.wait_for(connect(scheduler, timeout=CONNECT_TIMEOUT_S), CONNECT_TIMEOUT_S)
        await comm.close()

    outcome: list[BaseException] = []

    def run() -> None:  # in a thread of its own: the caller may be inside an event loop (a notebook)
        try:
            asyncio.run(handshake())
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run, name="cmdtool-dask-probe", daemon=True)
    thread.start()
    thread.join()
    try:
        if outcome:
            raise outcome[0]
    except (asyncio.TimeoutError, TimeoutError):
        raise CmdError(f"cannot reach the Dask scheduler at {scheduler} (no answer within "
                       f"{CONNECT_TIMEOUT_S} s)") from None
    except OSError as e:
        raise CmdError(f"cannot reach the Dask scheduler at {scheduler} ({type(e).__name__}: "
                       f"{_first_line(e) or 'no answer'})") from None
    except Exception as e:  # MemoryError, ValueError, ...: what a peer that is no scheduler sent
        raise CmdError(f"cannot reach the Dask scheduler at {scheduler} (it is not a Dask scheduler: "
                       f"{type(e).__name__})") from None


def engine_for(workers: int | None, scheduler: str | None):
    """A context giving an ``Engine`` when ``workers`` or ``scheduler`` is set, else None."""
    if workers is None and scheduler is None:
        return nullcontext(None)
    return _started(workers, scheduler)


@contextmanager
def _started(workers, scheduler):
    engine = Engine.start(workers, scheduler)
    try:
        yield engine
    finally:
        engine.close()


def store_folder(path: Path) -> Path:
    """The sharded store's folder for a ``--trajectory`` or default cache path ending in ``.h5``."""
    path = Path(path)
    return path.with_suffix(".shards") if path.suffix == ".h5" else path
