"""Files that are not what they claim to be, refused before anything reads them: HDF5 links in a
mode file or a trajectory store (soft, external, virtual datasets, external raw storage) and FIFOs
or devices where a mode file, a trajectory store or a checkpoint is expected. Each is one
``error:`` line and exit 2; none hangs (each command runs in a thread that must finish)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import cmd, error_line, ok, plant, snapshot, write_run
from test_modefile_untrusted import build_sources, craft

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    return build_sources(tmp_path_factory.mktemp("sources"))


def finishes(runner, *args, seconds: float = 120):
    """``cmd ARGS`` in a daemon thread that must end within ``seconds`` (a hang fails the test
    instead of stalling it)."""
    out = []
    thread = threading.Thread(target=lambda: out.append(cmd(runner, *args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"cmd {' '.join(map(str, args))} hangs"
    return out[0]


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def external_link(target: str, inner: str = "/x"):
    return lambda f, name: f.__setitem__(name, h5py.ExternalLink(target, inner))


def relink(name: str, make):
    def edit(f):
        del f[name]
        make(f, name)
    return edit


def virtual(f, name):
    layout = h5py.VirtualLayout(shape=(970,), dtype="f4")
    layout[:] = h5py.VirtualSource("other.h5", "x", shape=(970,))
    f.create_virtual_dataset(name, layout)


def external_storage(f, name):
    f.create_dataset(name, shape=(970,), dtype="f4", external=[("raw.bin", 0, 4 * 970)])


LINKS = [
    (relink("a", external_link("other.h5")), "'a' is an external link (to 'other.h5')"),
    (relink("labels", lambda f, name: f.__setitem__(name, h5py.SoftLink("/b"))), "'labels' is a soft link (to '/b')"),
    (relink("carried/bn.num_batches_tracked", external_link("pipe")),
     "'carried/bn.num_batches_tracked' is an external link (to 'pipe')"),
    (relink("b", virtual), "dataset 'b' reads other files (a virtual dataset)"),
    (relink("a", external_storage), "dataset 'a' reads other files (external storage)"),
]


@pytest.mark.parametrize("edit, problem", LINKS, ids=["external-a", "soft-labels", "external-fifo-carried",
                                                      "virtual-b", "external-storage-a"])
def test_links_in_a_mode_file_are_refused(runner, tmp_path, sources, edit, problem):
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other["x"] = np.ones(970, np.float32)
    (tmp_path / "raw.bin").write_bytes(b"\0" * 4 * 970)
    fifo(tmp_path / "pipe")
    crafted = craft(sources, tmp_path, "plain", edit)
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative link targets resolve here, where the targets are
    try:
        for command in (["info", crafted], ["reconstruct", crafted, "-o", out, "--at", "all"],
                        ["report", crafted, "-o", tmp_path / "report"]):
            message = error_line(finishes(runner, *command))
            assert message == f"{crafted}: corrupt mode file ({problem})"
    finally:
        os.chdir(cwd)
    assert snapshot(tmp_path) == before and not out.exists()


def test_a_fifo_is_never_opened_as_a_mode_file(runner, tmp_path):
    path = fifo(tmp_path / "run.cmd.h5")
    run = write_run(tmp_path / "run", plant(T=2).states())
    for command in (["info", path], ["reconstruct", path, "-o", tmp_path / "out"], ["update", path, run],
                    ["report", path, "-o", tmp_path / "report"]):
        assert error_line(finishes(runner, *command)) == f"{path}: is a FIFO (named pipe), expected a mode file"


def test_settings_trajectory_naming_a_fifo_is_refused(runner, tmp_path, sources):
    pipe = fifo(tmp_path / "pipe.h5")

    def point_at_fifo(f):
        settings = json.loads(f.attrs["settings"])
        f.attrs["settings"] = json.dumps({**settings, "trajectory": str(pipe)})

    crafted = craft(sources, tmp_path, "plain", point_at_fifo)
    message = error_line(finishes(runner, "report", crafted, "-o", tmp_path / "report"))
    assert message == f"{pipe}: is a FIFO (named pipe), expected a trajectory store"
    assert not (tmp_path / "report").exists()


def test_a_trajectory_store_with_an_external_link_is_refused(runner, tmp_path, sources):
    store = tmp_path / "store.h5"
    with h5py.File(sources["plain"].with_name("plain.h5"), "r") as source, h5py.File(store, "w") as f:
        for name in source:
            source.copy(name, f)
        f.attrs.update(source.attrs)
        del f["names"]
        f["names"] = h5py.ExternalLink("elsewhere.h5", "/names")
    message = error_line(finishes(runner, "report", sources["plain"], "-o", tmp_path / "report",
                                  "--trajectory", store))
    assert message == (f"{store}: not a readable cmdtool trajectory store "
                       "('names' is an external link (to 'elsewhere.h5'))")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_fifo_or_device_in_a_run_folder_is_called_so(runner, tmp_path, kind):
    run = write_run(tmp_path / "run", plant(T=3).states())
    entry = run / "epoch_9.safetensors"
    if kind == "fifo":
        fifo(entry)
        what = "a FIFO (named pipe)"
    else:
        if not Path("/dev/zero").exists():
            pytest.skip("no /dev/zero")
        entry.symlink_to("/dev/zero")
        what = "a character device"
    for command in (["ls", run], ["fit", run, "-o", tmp_path / "run.cmd.h5", "-m", "2"]):
        assert error_line(finishes(runner, *command)) == f"{entry}: is {what}, expected a checkpoint file"
    assert not (tmp_path / "run.cmd.h5").exists()


def test_a_254_byte_checkpoint_name_is_reconstructed(runner, tmp_path):
    """The temporary name beside a checkpoint of the longest name a filesystem takes is shortened."""
    run = tmp_path / "run"
    names = [f"epoch_{t}" + "x" * 235 + ".safetensors" for t in range(3)]
    assert {len(n.encode()) for n in names} == {254}
    write_run(run, plant(T=3).states(), name="epoch_{}" + "x" * 235)
    assert sorted(p.name for p in run.iterdir()) == names
    ok(cmd(runner, "fit", run, "-o", tmp_path / "m.cmd.h5", "-m", "2", "--trajectory", tmp_path / "t.h5"))
    out = tmp_path / "out"
    written = ok(cmd(runner, "reconstruct", tmp_path / "m.cmd.h5", "-o", out, "--at", "all")).stdout.split()
    assert written == [str(out / n) for n in names] and sorted(p.name for p in out.iterdir()) == names
