"""cmdtool/_portable.py and the platform choices of cmdtool/_files.py: every Linux-only call has a
fallback chosen at run time. The command line run where those calls are missing (a Python made to
look like macOS and Windows by tests/simulated_platform/sitecustomize.py) writes the same files,
byte for byte, as the native run."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest

import cmdtool._files as files
from cmdtool import _portable
from cmdtool._files import plain_name
from helpers import plant, write_run

ROOT = Path(__file__).resolve().parent.parent
SIMULATED = Path(__file__).resolve().parent / "simulated_platform"
LINUX_ONLY = ("posix_fallocate", "pread", "pwrite", "preadv", "pwritev", "readv", "writev", "sched_getaffinity",
              "O_NOFOLLOW", "O_NONBLOCK", "O_DIRECTORY")


def without_linux_calls(monkeypatch) -> None:
    for name in LINUX_ONLY:
        monkeypatch.delattr(os, name, raising=False)


@pytest.mark.parametrize("platform", ["native", "fallback"])
def test_positioned_reads_and_writes_with_and_without_pread(tmp_path, monkeypatch, platform):
    if platform == "fallback":
        without_linux_calls(monkeypatch)
    path = tmp_path / "f.bin"
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8)
    fd = _portable.open_fd(path, os.O_RDWR | os.O_CREAT)
    try:
        _portable.reserve(fd, 12_000, tmp_path)
        assert os.fstat(fd).st_size == 12_000
        _portable.write_full(fd, memoryview(data[5000:]), 5000)  # second half first: positions, not order
        _portable.write_full(fd, memoryview(data[:5000]), 0)
        out = np.zeros(9000, dtype=np.uint8)
        assert _portable.read_full(fd, memoryview(out), 1000) == 9000
        assert np.array_equal(out, data[1000:])
        tail = bytearray(5000)
        assert _portable.read_full(fd, memoryview(tail), 9000) == 3000  # short only at the end of the file
        assert bytes(tail[:1000]) == data[9000:].tobytes() and bytes(tail[1000:3000]) == bytes(2000)
        assert _portable.read_at(fd, memoryview(bytearray(8)), 12_000) == 0
    finally:
        os.close(fd)
    assert path.read_bytes() == data.tobytes() + bytes(2000)


def test_reserve_without_fallocate_checks_the_free_space(tmp_path, monkeypatch):
    without_linux_calls(monkeypatch)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=4096))
    fd = _portable.open_fd(tmp_path / "f.bin", os.O_RDWR | os.O_CREAT)
    try:
        _portable.reserve(fd, 4096, tmp_path)  # fits
        with pytest.raises(OSError) as caught:
            _portable.reserve(fd, 4096 + 4097, tmp_path)  # 4097 more bytes than the 4096 free
        assert caught.value.errno == errno.ENOSPC
        assert os.fstat(fd).st_size == 4096
    finally:
        os.close(fd)
    assert not _portable.allocate(0, 0, 1)  # no posix_fallocate: the caller is told, nothing raised


def test_a_full_disk_without_fallocate_is_one_error_line(runner, run_dir, tmp_path, monkeypatch):
    """macOS: the store's space is checked against the free space (before, ``os.posix_fallocate``
    was missing there and ``cmd fit`` ended in an AttributeError)."""
    from helpers import cmd, error_line

    without_linux_calls(monkeypatch)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: types.SimpleNamespace(free=1000))
    store = tmp_path / "t.h5"
    message = error_line(cmd(runner, "fit", run_dir, "-o", tmp_path / "m.cmd.h5", "--trajectory", store))
    assert message.startswith(f"{store}: cannot write: No space left on device (needs about ")
    assert not store.exists() and not (tmp_path / "m.cmd.h5").exists()


def test_plain_names_on_windows_refuse_its_separators_drives_and_devices(monkeypatch):
    monkeypatch.setattr(files, "os", types.SimpleNamespace(name="nt", sep="\\", altsep="/"))
    for bad in ("..\\x.pt", "C:x.pt", "a.pt:stream", "CON", "nul.safetensors", "COM1 .pt", "x.pt.", "x.pt "):
        with pytest.raises(ValueError, match="is not a plain file name"):
            plain_name(bad, "checkpoint name")
    assert plain_name("epoch_1.safetensors", "checkpoint name") == "epoch_1.safetensors"
    assert plain_name("console.pt", "checkpoint name") == "console.pt"
    monkeypatch.undo()
    assert plain_name("a\\b:c.pt", "checkpoint name") == "a\\b:c.pt"  # POSIX: both are plain characters


def test_a_dead_process_on_windows_is_asked_through_psutil(monkeypatch):
    """Windows has no signal 0 (``os.kill`` would end the process): psutil says whether it runs,
    and without psutil every process counts as alive (its temporary files are kept)."""
    pytest.importorskip("psutil")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    monkeypatch.setattr(files, "os", types.SimpleNamespace(name="nt", kill=None))
    assert files._alive(os.getpid()) and not files._alive(int(dead.stdout))
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert files._alive(int(dead.stdout))


def simulated_env(out: Path, simulated: bool) -> dict:
    path = [str(SIMULATED)] if simulated else []
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(ROOT)]), "CMDTOOL_CACHE": str(out / "cache"),
            "CMDTOOL_SIMULATED_LOG": str(out / "platform.log"), "CMDTOOL_SIMULATED_WINDOWS": "1",
            "OMP_NUM_THREADS": "1"}


def h5_contents(path: Path, replace: tuple[str, str]) -> dict:
    """Every dataset (dtype, shape, bytes) and attribute of an HDF5 file, with the run's folder
    name ``replace[0]`` written as ``replace[1]`` in strings (the store's path is one)."""
    def same_folder(value):
        if isinstance(value, bytes):
            return value.replace(replace[0].encode(), replace[1].encode())
        if isinstance(value, str):
            return value.replace(*replace)
        if isinstance(value, np.ndarray) and value.dtype == object:
            return [same_folder(v) for v in value.tolist()]
        return (np.asarray(value).dtype.str, np.shape(value), np.asarray(value).tobytes())

    out = {}

    def visit(name, obj):
        for key, value in obj.attrs.items():
            out[f"{name}@{key}"] = same_folder(value)
        if isinstance(obj, h5py.Dataset):
            out[name] = (obj.dtype.str, obj.shape, same_folder(obj[()]))

    with h5py.File(path, "r") as f:
        visit("/", f)
        f.visititems(visit)
    return out


def test_cli_without_the_linux_only_calls_writes_the_same_files(tmp_path):
    """``cmd fit``, ``update``, ``reconstruct --at all`` and ``report`` in a subprocess whose Python
    lacks ``posix_fallocate``, ``pread``/``pwrite``/``preadv`` and ``fcntl`` (locks through an
    ``msvcrt.locking`` as Windows has it) and renames no open file (as Windows) write the mode file,
    the checkpoints and the report that the native run writes: every dataset and attribute, every
    file, byte for byte."""
    run, later, every = tmp_path / "run", tmp_path / "later", tmp_path / "all"
    write_run(every, plant(T=12).states())
    shutil.copytree(every, run, ignore=shutil.ignore_patterns("epoch_1[01].*"))
    later.mkdir()
    for t in (10, 11):
        shutil.copy(every / f"epoch_{t}.safetensors", later)
    commands = (["fit", run, "-o", "m.cmd.h5", "--trajectory", "t.h5", "-m", "2", "--warmup", "4"],
                ["update", "m.cmd.h5", later / "epoch_10.safetensors", later / "epoch_11.safetensors"],
                ["reconstruct", "m.cmd.h5", "-o", "checkpoints", "--at", "all"],
                ["report", "m.cmd.h5", "-o", "report", "--checkpoints", every])
    for kind in ("native", "simulated"):
        out = tmp_path / kind
        out.mkdir()
        for args in commands:
            done = subprocess.run([sys.executable, "-m", "cmdtool", *map(str, args)], cwd=out,
                                  env=simulated_env(out, kind == "simulated"), capture_output=True, text=True)
            assert done.returncode == 0, (kind, args[0], done.stderr)
            assert "Traceback" not in done.stderr

    probe = ("import os, sys, cmdtool, cmdtool.cli\n"
             "try:\n    import fcntl\nexcept ImportError:\n    fcntl = None\n"
             f"print([name for name in {LINUX_ONLY!r} if hasattr(os, name)], fcntl, 'fcntl' in sys.modules)")
    seen = subprocess.run([sys.executable, "-c", probe], env=simulated_env(tmp_path, True), capture_output=True,
                          text=True, check=True).stdout.split()
    assert seen == ["[]", "None", "False"]  # the simulated run had none of them, and cmdtool imported
    native, simulated = tmp_path / "native", tmp_path / "simulated"
    log = (simulated / "platform.log").read_text().splitlines()
    assert [line for line in log if line.startswith("locking")] == ["locking 2 1 at 0", "locking 0 1 at 0"]
    refused = [re.sub(r"\S+\.h5\.(\S+\.)?[0-9]+\.tmp$", "STORE", line) for line in log if line.startswith("refused")]
    assert refused == ["refused replace of open STORE",      # the fit's new store, open: closed, then renamed
                       "refused replace of open m.cmd.h5",   # the mode file update reads: closed, then replaced
                       "refused replace of open STORE"], log  # the store report builds from --checkpoints
    assert not (native / "platform.log").exists()  # natively: fcntl.flock, and open files are renamed

    replace = (str(simulated), str(native))
    assert h5_contents(simulated / "m.cmd.h5", replace) == h5_contents(native / "m.cmd.h5", replace)
    with h5py.File(native / "m.cmd.h5", "r") as f:
        assert f["references"].shape == (2, 12) and f["labels"].shape[0] == 970  # the update took both
    names = sorted(p.name for p in (native / "checkpoints").iterdir())
    assert names == [f"epoch_{t}.safetensors" for t in sorted(range(12), key=str)]
    assert sorted(p.name for p in (simulated / "checkpoints").iterdir()) == names
    for name in names:
        assert (simulated / "checkpoints" / name).read_bytes() == (native / "checkpoints" / name).read_bytes(), name
    assert ((simulated / "report" / "report.json").read_text().replace(*replace)
            == (native / "report" / "report.json").read_text())
    assert sorted(p.name for p in (simulated / "report").iterdir()) == sorted(
        p.name for p in (native / "report").iterdir())


def test_usable_cpus_is_the_affinity_mask_or_else_every_cpu(monkeypatch):
    import cmdtool._portable as portable

    if hasattr(os, "sched_getaffinity"):
        assert portable.usable_cpus() == len(os.sched_getaffinity(0))
        monkeypatch.delattr(os, "sched_getaffinity")  # macOS and Windows have no affinity call
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert portable.usable_cpus() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undeterminable"
    assert portable.usable_cpus() == 1
