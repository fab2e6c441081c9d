"""``--workers`` and ``--scheduler`` against bad peers and bad values: each is one ``error:`` line
and exit 2, within the connect timeout, without Dask's tracebacks. Peers are socket servers on
the loopback interface in a thread of this process."""

from __future__ import annotations

import logging
import operator
import os
import socket
import struct
import threading

import pytest

from helpers import cmd, error_line

pytest.importorskip("dask.distributed")


@pytest.fixture
def peer():
    """``start(reply)``: a TCP server on 127.0.0.1 that accepts every connection and sends
    ``reply`` (nothing: it never speaks); returns its ``tcp://`` address."""
    servers, accepted = [], []

    def start(reply: bytes = b"") -> str:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def serve():
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:
                    return
                accepted.append(connection)
                if reply:
                    connection.sendall(reply)
        threading.Thread(target=serve, daemon=True).start()
        return f"tcp://127.0.0.1:{server.getsockname()[1]}"

    yield start
    for s in servers + accepted:
        s.close()


def fit_on(runner, tmp_path, run_dir, scheduler: str):
    result = cmd(runner, "fit", run_dir, "-o", tmp_path / "m.cmd.h5", "--scheduler", scheduler)
    assert not (tmp_path / "m.cmd.h5").exists()
    return error_line(result)


def test_a_peer_that_never_speaks_is_one_line_after_the_connect_timeout(tmp_path, runner, run_dir, peer,
                                                                       monkeypatch):
    from cmdtool.distributed import engine
    monkeypatch.setattr(engine, "CONNECT_TIMEOUT_S", 1)
    address = peer()
    assert fit_on(runner, tmp_path, run_dir, address) == (f"cannot reach the Dask scheduler at {address} "
                                                           "(no answer within 1 s)")


def test_a_peer_declaring_a_huge_frame_is_one_line(tmp_path, runner, run_dir, peer):
    address = peer(struct.pack("Q", 2**62) + bytes(64))  # Dask's frame header: the length, native order
    assert fit_on(runner, tmp_path, run_dir, address) == (f"cannot reach the Dask scheduler at {address} "
                                                           "(it is not a Dask scheduler: MemoryError)")


@pytest.mark.parametrize("scheme", ["tls", "ucx", "inproc"])
def test_other_schemes_are_one_line(tmp_path, runner, run_dir, scheme):
    address = f"{scheme}://127.0.0.1:8786"
    assert fit_on(runner, tmp_path, run_dir, address) == (f"--scheduler {address}: only tcp:// addresses are "
                                                           f"supported (not {scheme}://)")


def test_too_many_workers_are_refused_before_any_starts(tmp_path, runner, run_dir):
    from cmdtool.distributed.engine import max_workers
    limit = min(256, 4 * (os.cpu_count() or 1))
    assert max_workers() == limit
    message = error_line(cmd(runner, "fit", run_dir, "-o", tmp_path / "m.cmd.h5", "--workers", "10000"))
    assert message == f"--workers must be 1 … {limit} (4 per CPU core of this machine; got 10000)"


@pytest.mark.filterwarnings("ignore:Port .* is already in use")
def test_a_real_scheduler_passes_the_probe_and_failing_tasks_print_nothing(capfd):
    """A scheduler (of a LocalCluster) answers the probe; a task that raises is raised here, and
    the workers of ``--workers`` print no "Compute Failed" report of their own."""
    from distributed import LocalCluster

    from cmdtool.distributed import Engine
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=None,
                      silence_logs=logging.CRITICAL) as cluster:
        with Engine.start(scheduler=cluster.scheduler_address) as engine:
            assert list(engine._in_order(operator.add, [(1, 2)])) == [3]
    capfd.readouterr()
    with Engine.start(workers=1) as engine:
        with pytest.raises(ZeroDivisionError):
            list(engine._in_order(operator.truediv, [(1, 0)]))
    err = capfd.readouterr().err
    assert "Compute Failed" not in err and "Traceback" not in err, err
