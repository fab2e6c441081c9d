"""Concurrency and staleness (issue 11, item 3): two fits of one folder with different selections
both get their own buffers; two updates of one mode file lose nothing (a lock, ``fcntl.flock``);
report and update refuse a trajectory store rebuilt since the fit; a killed run's temporary files
are removed by the next run that finds them."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import torch

import cmdtool
from cmdtool._files import exclusive, temporary_sibling
from cmdtool.fitting import fit_trajectory
from cmdtool.modefile import open_mode_file
from cmdtool.modes import FitSettings
from cmdtool.stores import prepare_store
from helpers import cmd, error_line, ok, plant, write_run

ROOT = Path(__file__).resolve().parent.parent


def counted_run(folder: Path, T: int = 8) -> Path:
    """A planted run whose carried buffer ``step`` holds the checkpoint's position: buffers tell
    exactly which checkpoints a mode file was given."""
    states = plant(T=T).states()
    for t, state in enumerate(states):
        state["bn.num_batches_tracked"] = torch.tensor(1000 + t, dtype=torch.int64)
    return write_run(folder, states)


def carried_steps(mode_file: Path) -> list[int]:
    with open_mode_file(mode_file) as modes:
        return modes.carried("bn.num_batches_tracked").view(np.int64).ravel().tolist()


def test_a_fit_keeps_its_store_when_another_selection_replaces_it(tmp_path):
    """The default store path is one per folder: fit B rebuilds it while fit A still fits. A reads
    its carried tensors from the file it opened, not from whatever is at the path now."""
    run = counted_run(tmp_path / "run")
    first = prepare_store(run, stop=5)
    second = prepare_store(run, start=3)
    assert first.path == second.path and not second.reused  # the same cache file, rebuilt
    modes = fit_trajectory(first.store, FitSettings(modes=2))
    assert modes.names == [f"epoch_{t}.safetensors" for t in range(5)]
    assert modes.carried["bn.num_batches_tracked"].view(np.int64).ravel().tolist() == [1000, 1001, 1002, 1003, 1004]


def test_two_concurrent_fits_of_different_selections(tmp_path):
    run = counted_run(tmp_path / "run", T=10)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CMDTOOL_CACHE": str(tmp_path / "cache")}
    jobs = {name: subprocess.Popen([sys.executable, "-m", "cmdtool", "fit", str(run), "-o", str(tmp_path / name),
                                    "-m", "2", *selection], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for name, selection in (("a.cmd.h5", ["--stop", "6"]), ("b.cmd.h5", ["--start", "3"]))}
    for name, job in jobs.items():
        _, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr.decode()
    assert carried_steps(tmp_path / "a.cmd.h5") == list(range(1000, 1006))
    assert carried_steps(tmp_path / "b.cmd.h5") == list(range(1003, 1010))


def warm_mode_file(tmp_path) -> tuple[Path, Path]:
    run = counted_run(tmp_path / "run", T=12)
    later = tmp_path / "later"
    later.mkdir()
    for t in (10, 11):
        os.replace(run / f"epoch_{t}.safetensors", later / f"epoch_{t}.safetensors")
    mode_file = tmp_path / "m.cmd.h5"
    cmdtool.fit(run, mode_file, modes=2, warmup=4, trajectory=tmp_path / "t.h5")
    return mode_file, later


# The ``cmd`` command as its console script runs it, with ``fcntl.flock`` wrapped: the first time it
# finds the lock held, it writes one byte to the file descriptor given as its first argument. The
# test then knows the child is waiting for the lock (an event, not a guess after a sleep).
WAITS_FOR_LOCK = """
import fcntl, os, sys
signal_fd = int(sys.argv.pop(1))
real_flock = fcntl.flock
def flock(fd, operation):
    global signal_fd
    try:
        return real_flock(fd, operation)
    except BlockingIOError:
        if signal_fd >= 0:
            os.write(signal_fd, b"w")
            os.close(signal_fd)
            signal_fd = -1
        raise
fcntl.flock = flock
from cmdtool.cli import main
sys.exit(main())
"""


def test_an_update_waits_for_the_lock_and_then_reads_the_first_updates_file(tmp_path):
    """While a first update holds the lock and replaces the file, a second waits, then absorbs its
    checkpoint into the first's file (without the lock it would write over it from the old one)."""
    mode_file, later = warm_mode_file(tmp_path)
    first = tmp_path / "first.cmd.h5"  # what the first update will have written
    first.write_bytes(mode_file.read_bytes())
    cmdtool.update(first, [later / "epoch_10.safetensors"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    read_end, write_end = os.pipe()
    try:
        with exclusive(mode_file):
            job = subprocess.Popen([sys.executable, "-c", WAITS_FOR_LOCK, str(write_end), "update", str(mode_file),
                                    str(later / "epoch_11.safetensors")], env=env, pass_fds=(write_end,),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            os.close(write_end)
            write_end = -1
            assert os.read(read_end, 1) == b"w"  # blocks until the child has found the lock held (b"" if it exited)
            assert job.poll() is None  # and it cannot go on while we hold the lock
            before = mode_file.read_bytes()
            os.replace(first, mode_file)  # the first update's atomic replace
        _, stderr = job.communicate(timeout=120)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert job.returncode == 0, stderr
    assert mode_file.read_bytes() != before
    assert carried_steps(mode_file) == list(range(1000, 1012))


def test_a_held_lock_is_one_line_after_the_wait(runner, tmp_path, monkeypatch):
    mode_file, later = warm_mode_file(tmp_path)
    monkeypatch.setattr("cmdtool._files.LOCK_WAIT_S", 0.3)
    before = mode_file.read_bytes()
    with exclusive(mode_file):
        message = error_line(cmd(runner, "update", mode_file, later / "epoch_10.safetensors"))
    assert message == (f"{mode_file}: another cmd update or cmd watch is writing it (waited 0.3 s); "
                       f"try again when it has finished")
    assert mode_file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # the lock file is gone


def test_two_concurrent_updates_lose_nothing(tmp_path):
    mode_file, later = warm_mode_file(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    jobs = [subprocess.Popen([sys.executable, "-m", "cmdtool", "update", str(mode_file), str(later / name)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in ("epoch_10.safetensors", "epoch_11.safetensors")]
    outcomes = [(job.wait(timeout=300), job.stderr.read()) for job in jobs]
    absorbed = [t for t, (code, _) in zip((10, 11), outcomes) if code == 0]
    for code, stderr in outcomes:
        assert code == 0 or stderr.strip().endswith("online CMD only appends later checkpoints"), stderr
    assert carried_steps(mode_file) == list(range(1000, 1010)) + [1000 + t for t in absorbed]
    assert 11 in absorbed  # epoch_11 is never refused: it comes after either


def test_report_refuses_a_store_rebuilt_since_the_fit(runner, tmp_path):
    """The folder is retrained and fitted again: the shared cache store now holds the new run."""
    run = counted_run(tmp_path / "run", T=6)
    old = tmp_path / "old.cmd.h5"
    ok(cmd(runner, "fit", run, "-o", old, "-m", "2"))
    time.sleep(0.01)
    write_run(run, plant(T=6, seed=7).states())  # same names, new weights
    ok(cmd(runner, "fit", run, "-o", tmp_path / "new.cmd.h5", "-m", "2"))
    with open_mode_file(old) as modes:
        store = modes.settings.trajectory
    message = error_line(cmd(runner, "report", old, "-o", tmp_path / "report"))
    assert message == (f"{store}: this trajectory store was rebuilt after {old} was fitted (its checkpoints changed, "
                       f"or another selection was fitted); pass --checkpoints DIR with the checkpoints the mode file "
                       f"was fitted on")
    assert not (tmp_path / "report").exists()


def test_a_killed_runs_temporary_files_are_removed_by_the_next_run(runner, tmp_path):
    """Temporaries say their machine: this machine's are removed when their process is gone;
    another machine's (a shared filesystem), and those of older versions without a machine name,
    only when untouched for a day."""
    from cmdtool._files import STALE_AFTER_S, _host
    run = counted_run(tmp_path / "run", T=4)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    host = _host()
    mode_file, store = tmp_path / "m.cmd.h5", tmp_path / "t.h5"
    stale = [tmp_path / f".m.cmd.h5.{host}.{pid}.tmp", tmp_path / f".t.h5.{host}.{pid}.tmp"]
    old_elsewhere = [tmp_path / f".m.cmd.h5.other-machine.{os.getpid()}.tmp", tmp_path / f".m.cmd.h5.{pid}.tmp"]
    live = tmp_path / f".m.cmd.h5.{host}.{os.getppid()}.tmp"  # a live process's: kept
    other = tmp_path / f".notes.txt.{host}.{pid}.tmp"         # not a name of this output: kept
    elsewhere = [tmp_path / f".m.cmd.h5.other-machine.{pid}.tmp", tmp_path / f".t.h5.{pid + 1}.tmp"]  # recent: kept
    for path in (*stale, *old_elsewhere, live, other, *elsewhere):
        with h5py.File(path, "w"):
            pass
    for path in old_elsewhere:
        os.utime(path, (time.time() - STALE_AFTER_S - 60,) * 2)
    ok(cmd(runner, "fit", run, "-o", mode_file, "--trajectory", store, "-m", "2"))
    assert not any(p.exists() for p in stale + old_elsewhere)
    assert live.exists() and other.exists() and all(p.exists() for p in elsewhere)
    assert temporary_sibling(mode_file).name == f".m.cmd.h5.{host}.{os.getpid()}.tmp"


def test_temporary_names_fit_name_max_for_a_254_byte_name(tmp_path):
    name = "é" * 124 + "abc.pt"  # 254 bytes
    tmp = temporary_sibling(tmp_path / name)
    assert len(tmp.name.encode()) <= 255 and tmp.name.endswith(f".{os.getpid()}.tmp")
    assert temporary_sibling(tmp_path / name) == tmp  # one name, one temporary name
    tmp.write_bytes(b"")
    assert tmp.name.startswith("." + "é" * 93 + "~")


def test_lock_protocol_survives_removal_between_open_and_lock(tmp_path, monkeypatch):
    """A waiter that locks the file its predecessor removed locks the new one instead."""
    target = tmp_path / "m.cmd.h5"
    order = []
    waiting = threading.Event()  # set when the second writer has found the lock held
    real_flock = fcntl.flock

    def flock(fd, operation):
        try:
            return real_flock(fd, operation)
        except BlockingIOError:
            waiting.set()
            raise

    monkeypatch.setattr(fcntl, "flock", flock)

    def second():
        with exclusive(target):
            order.append("second")

    with exclusive(target):
        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(timeout=60)  # the second writer opened the lock file and found it held
        order.append("first")
    thread.join(timeout=60)
    assert order == ["first", "second"]
    assert not (tmp_path / ".m.cmd.h5.lock").exists()
