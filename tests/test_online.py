"""Online CMD (paper §3.3): update_fit, cmd update, cmd fit --warmup, cmd watch, OnlineCMD."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import weakref
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import cmdtool
from cmdtool.cli import app
from cmdtool.decompose import normalise_references
from cmdtool.errors import CmdError
from cmdtool.modefile import open_mode_file
from cmdtool.online import watch
from cmdtool.online.least_squares import update_fit
from helpers import plant, write_run

F = 8  # warm-up checkpoints in these tests


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def trajectory_of(planted) -> np.ndarray:
    """The trajectory as the checkpoints hold it (float32), columns in planted order."""
    return planted.W.astype(np.float32).astype(np.float64)


def batch_fit(W: np.ndarray, labels: np.ndarray, reference_index: np.ndarray):
    """One least-squares fit of ``w_i(t) ≈ a_i r̃(t) + b_i`` over all T checkpoints, with given labels
    and reference parameters (numpy lstsq per mode, against the normalised references)."""
    normalised = normalise_references(W[:, reference_index].T)
    a, b = np.zeros(W.shape[1]), np.zeros(W.shape[1])
    for m in range(len(reference_index)):
        members = np.flatnonzero(labels == m)
        X = np.column_stack([normalised.references[m], np.ones(W.shape[0])])
        (a[members], b[members]), *_ = np.linalg.lstsq(X, W[:, members], rcond=None)
    sse = float(((W - (a * normalised.references[labels].T + b)) ** 2).sum())
    return a, b, normalised, sse


def assert_relative(actual, expected, tolerance):
    """Elementwise ``|actual − expected| <= tolerance · max(|expected|, typical size)``."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    floor = np.median(np.abs(expected)) + 1e-300
    worst = np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), floor))
    assert worst <= tolerance, worst


# ---------------------------------------------------------------------------------------------
# The update itself, on arrays


def test_update_fit_equals_batch_least_squares_including_a_barely_moving_reference():
    """Absorbing checkpoints one at a time (float64) equals the batch fit over all of them, even for
    a reference that moves by 1e-6 of its value (DESIGN.md "Numerics")."""
    rng = np.random.default_rng(1)
    T, warm = 40, 6
    t = np.linspace(0, 1, T)
    raw = np.stack([np.exp(-3 * t), 1.0 + 1e-6 * np.sin(7 * t)])
    labels = rng.integers(0, 2, 300)
    W = rng.uniform(0.5, 2, 300) * (raw[labels] - raw[labels].mean(1, keepdims=True)).T / raw[labels].std(1) \
        + rng.normal(0, 1, 300) + 1e-3 * rng.normal(size=(T, 300))
    W[:, :2] = raw.T  # parameters 0 and 1 are the references
    labels[:2] = [0, 1]
    reference_index = np.array([0, 1])
    references, offset, scale = normalise_references(W[:warm, reference_index].T)
    b = W[:warm].mean(axis=0)  # the warm-up fit, as decompose.fit_tile computes it
    a = np.einsum("tn,nt->n", W[:warm] - b, references[labels])
    for k in range(warm, T):
        step = update_fit(a, b, labels, W[k], references, offset, scale, W[k, reference_index])
        a, b, references, offset, scale = step.a, step.b, step.references, step.offset, step.scale
    a_all, b_all, all_refs, _ = batch_fit(W, labels, reference_index)
    # float64 centring of the barely-moving raw reference itself costs 1e-16 / 1e-6 = 1e-10.
    assert_relative(a, a_all, 1e-8)
    assert_relative(b, b_all, 1e-8)
    assert_relative(b, W.mean(axis=0), 1e-13)  # b is the mean over time, against normalised references
    np.testing.assert_allclose(references, all_refs.references, atol=1e-9)
    np.testing.assert_allclose(offset, all_refs.offset, rtol=1e-14)
    np.testing.assert_allclose(scale, all_refs.scale, rtol=1e-9)
    assert np.allclose(a[:2], scale) and np.allclose(b[:2], offset)  # references stay exact


# ---------------------------------------------------------------------------------------------
# cmd update against one batch fit over all checkpoints


@pytest.fixture
def online_run(tmp_path):
    planted = plant(M=3, T=30, noise=1e-2, seed=3)
    return planted, write_run(tmp_path / "run", planted.states())


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_update_equals_batch_fit_with_the_same_labels_and_references(tmp_path, online_run, one_at_a_time):
    planted, run = online_run
    out = tmp_path / "m.cmd.h5"
    cmdtool.fit(run, out, modes=3, stop=F, trajectory=tmp_path / "warm.h5")
    later = sorted(run.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))[F:]
    for batch in ([[p] for p in later] if one_at_a_time else [later]):
        cmdtool.update(out, batch)

    with open_mode_file(out) as modes:
        order = planted.permutation(modes.layout)
        W = trajectory_of(planted)[:, order]
        labels = modes.parameters()[0].astype(np.int64)
        a_cmd, b_cmd = modes.parameters()[1], modes.parameters()[2]
        a, b, normalised, sse = batch_fit(W, labels, modes.reference_index)
        assert modes.T == 30 and modes.warmup == F
        assert modes.names == [f"epoch_{t}.safetensors" for t in range(30)] and modes.time.tolist() == list(range(30))
        assert_relative(a_cmd, a, 1e-5)
        assert_relative(b_cmd, b, 1e-5)
        np.testing.assert_allclose(modes.references, normalised.references, atol=1e-6)
        np.testing.assert_allclose(modes.reference_offset, normalised.offset, rtol=1e-7)
        np.testing.assert_allclose(modes.reference_scale, normalised.scale, rtol=1e-6)
        metrics = modes.metrics
        assert metrics.sq_norm == pytest.approx((W ** 2).sum(), rel=1e-12)
        assert metrics.sq_displacement == pytest.approx(((W - W[0]) ** 2).sum(), rel=1e-12)
        assert metrics.sq_centred == pytest.approx(((W - W.mean(0)) ** 2).sum(), rel=1e-6)
        assert metrics.sse == pytest.approx(sse, rel=1e-5)
        assert metrics.rel_error == pytest.approx(np.sqrt(sse / (W ** 2).sum()), rel=1e-5)
        assert metrics.rel_error_displacement == pytest.approx(np.sqrt(sse / ((W - W[0]) ** 2).sum()), rel=1e-5)
        residual = W - (a * normalised.references[labels].T + b)
        mode_sse = np.bincount(labels, (residual ** 2).sum(0), minlength=modes.M)
        np.testing.assert_allclose(metrics.mode_sse, mode_sse, rtol=1e-4)


def test_updated_mode_file_reconstructs_and_is_readable_as_version_1(tmp_path, online_run, runner):
    """The online state is an extra group: every version-1 dataset keeps its shape and type."""
    planted, run = online_run
    out = tmp_path / "m.cmd.h5"
    cmdtool.fit(run, out, modes=3, warmup=F, trajectory=tmp_path / "t.h5")
    with h5py.File(out, "r") as f:
        assert f.attrs["format_version"] == 1
        N, M = f["a"].shape[0], f["references"].shape[0]
        assert f["a"].dtype == np.float32 and f["references"].shape == (M, 30)
        assert f["online"].attrs["warmup"] == F and f["online/first"].shape == (N,)
        assert f["carried/bn.num_batches_tracked"].shape == (30, 8)
    result = runner.invoke(app, ["reconstruct", str(out), "-o", str(tmp_path / "out"), "--at", "all"])
    assert result.exit_code == 0, result.output
    last = load_file(tmp_path / "out" / "epoch_29.safetensors")
    assert last["bn.num_batches_tracked"].item() == 2900
    state = cmdtool.reconstruct(out, at="last")
    assert torch.equal(state["fc.weight"], last["fc.weight"])


# ---------------------------------------------------------------------------------------------
# cmd update on the command line: skip, earlier, incompatible


@pytest.fixture
def warm_file(tmp_path, online_run):
    planted, run = online_run
    out = tmp_path / "m.cmd.h5"
    cmdtool.fit(run, out, modes=3, start=2, stop=2 + F, trajectory=tmp_path / "warm.h5")
    return planted, run, out


def test_cmd_update_skips_checkpoints_already_in_the_file(runner, warm_file):
    planted, run, out = warm_file
    before = digest(out)
    result = runner.invoke(
        app, ["update", str(out), str(run / "epoch_3.safetensors"), str(run / "epoch_5.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert "note: already in the mode file, skipped: epoch_3.safetensors, epoch_5.safetensors" in result.stderr
    assert "nothing new" in result.stderr
    assert digest(out) == before


def test_cmd_update_absorbs_a_folder_skipping_known_checkpoints(runner, warm_file):
    planted, run, out = warm_file
    result = runner.invoke(app, ["update", str(out), str(run / "epoch_10.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    assert '"absorbed": ["epoch_10.safetensors"]' in result.stdout
    # A folder: the earlier epoch_0 and epoch_1 were never in the file and come first: refused.
    result = runner.invoke(app, ["update", str(out), str(run)])
    assert result.exit_code == 2
    assert "epoch_0.safetensors: comes before epoch_10.safetensors" in result.stderr


def test_cmd_update_refuses_an_earlier_checkpoint_and_leaves_the_file_untouched(runner, warm_file):
    planted, run, out = warm_file
    before = digest(out)
    result = runner.invoke(
        app, ["update", str(out), str(run / "epoch_11.safetensors"), str(run / "epoch_1.safetensors")]
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {run / 'epoch_1.safetensors'}: comes before epoch_9.safetensors, "
        f"the last checkpoint in {out}; online CMD only appends later checkpoints"
    )
    assert digest(out) == before


@pytest.mark.parametrize(
    "spoil, problem",
    [
        (
            lambda s: s.update({"fc.bias": torch.zeros(11)}),
            "tensor 'fc.bias' is float32 [11], but float32 [10] in epoch_2.safetensors",
        ),
        (lambda s: s.pop("bn.weight"), "tensor 'bn.weight' is missing (present in epoch_2.safetensors)"),
        (lambda s: s.update({"extra": torch.zeros(2)}), "tensor 'extra' is not in epoch_2.safetensors"),
        (lambda s: s.update({"conv.bias": torch.full((8,), float("nan"))}), "tensor 'conv.bias' contains NaN values"),
    ],
)
def test_cmd_update_refuses_an_incompatible_checkpoint_and_leaves_the_file_untouched(
    runner, tmp_path, warm_file, spoil, problem
):
    """Every new checkpoint is checked before anything is written: a good one before the bad one
    is not absorbed either."""
    planted, run, out = warm_file
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    state = planted.states()[12]
    spoil(state)
    save_file(state, str(bad_dir / "epoch_12.safetensors"))
    before = digest(out)
    result = runner.invoke(
        app, ["update", str(out), str(run / "epoch_11.safetensors"), str(bad_dir / "epoch_12.safetensors")]
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: {bad_dir / 'epoch_12.safetensors'}: {problem}"
    assert digest(out) == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_cmd_update_bad_paths(runner, tmp_path, warm_file):
    planted, run, out = warm_file
    before = digest(out)
    for args, problem in (
        (["nope.pt"], "nope.pt: no such file or folder"),
        ([str(tmp_path / "warm.h5")], "not a safetensors or torch checkpoint"),
    ):
        result = runner.invoke(app, ["update", str(out), *args])
        assert result.exit_code == 2 and problem in result.stderr, result.output
    result = runner.invoke(app, ["update", str(tmp_path / "missing.cmd.h5"), str(run)])
    assert result.exit_code == 2 and "missing.cmd.h5: no such file" in result.stderr
    assert digest(out) == before


def test_first_update_of_a_plain_fit_needs_the_first_checkpoint(runner, tmp_path, online_run):
    """Without the fit's store or folder, the first checkpoint can be passed along (it is skipped)."""
    planted, run = online_run
    copy = write_run(tmp_path / "copy", planted.states()[:F])
    out = tmp_path / "m.cmd.h5"
    cmdtool.fit(copy, out, modes=3, trajectory=tmp_path / "gone.h5")
    (tmp_path / "gone.h5").unlink()
    (copy / "epoch_0.safetensors").unlink()
    result = runner.invoke(app, ["update", str(out), str(run / f"epoch_{F}.safetensors")])
    assert result.exit_code == 2
    assert "needs its first checkpoint (epoch_0.safetensors)" in result.stderr
    result = runner.invoke(
        app, ["update", str(out), str(run / "epoch_0.safetensors"), str(run / f"epoch_{F}.safetensors")]
    )
    assert result.exit_code == 0, result.output
    W = trajectory_of(planted)[: F + 1]
    with open_mode_file(out) as modes:
        W = W[:, planted.permutation(modes.layout)]
        assert modes.metrics.sq_displacement == pytest.approx(((W - W[0]) ** 2).sum(), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# cmd fit --warmup, OnlineCMD


def test_fit_warmup_equals_fit_of_the_warmup_then_update(runner, tmp_path, online_run):
    planted, run = online_run
    online, warm = tmp_path / "online.cmd.h5", tmp_path / "warm.cmd.h5"
    result = runner.invoke(
        app,
        ["fit", str(run), "-o", str(online), "-m", "3", "--warmup", str(F), "--trajectory", str(tmp_path / "all.h5")],
    )
    assert result.exit_code == 0, result.output
    assert f"modes found on the first {F} checkpoints" in result.stdout
    assert (
        runner.invoke(
            app,
            ["fit", str(run), "-o", str(warm), "-m", "3", "--stop", str(F), "--trajectory", str(tmp_path / "warm.h5")],
        ).exit_code
        == 0
    )
    result = runner.invoke(app, ["update", str(warm), str(run)])
    assert result.exit_code == 0, result.output
    with h5py.File(online, "r") as f, h5py.File(warm, "r") as g:
        for name in (
            "a",
            "b",
            "labels",
            "references",
            "reference_offset",
            "reference_scale",
            "reference_index",
            "time",
            "mode_sizes",
            "online/first",
            "online/mode_sse_least_squares",
            "carried/bn.num_batches_tracked",
        ):
            np.testing.assert_array_equal(f[name][()], g[name][()], err_msg=name)
    assert cmdtool.summarize(online)["online"] == {"warmup": F, "updates": 30 - F}
    result = runner.invoke(app, ["fit", str(run), "-o", str(tmp_path / "x.h5"), "--warmup", "31"])
    assert (
        result.exit_code == 2
        and "--warmup 31: the warm-up needs at least 2 checkpoints and at most the 30 selected" in result.stderr
    )


def test_online_cmd_in_a_loop_equals_fit_warmup(tmp_path, online_run):
    planted, run = online_run
    reference = tmp_path / "fit.cmd.h5"
    cmdtool.fit(run, reference, modes=3, warmup=F, trajectory=tmp_path / "t.h5")
    online = cmdtool.OnlineCMD(modes=3, warmup=F)
    # The checkpoints as the fit reads them (safetensors lists tensors by name; the layout, and with
    # it the layer-balanced sample, follows the state dict's order).
    states = [load_file(run / f"epoch_{t}.safetensors") for t in range(30)]
    for epoch, state in enumerate(states):
        if epoch == F - 1:
            with pytest.raises(CmdError, match=f"no modes yet; the warm-up needs {F} observations, {F - 1} so far"):
                online.reconstruct()
        online.observe(state, name=f"epoch_{epoch}.safetensors", time=epoch)
    assert online.ready and online.T == 30
    saved = online.save(tmp_path / "online.cmd.h5")
    with h5py.File(saved, "r") as f, h5py.File(reference, "r") as g:
        for name in ("labels", "reference_index", "time", "online/first", "carried/bn.num_batches_tracked"):
            np.testing.assert_array_equal(f[name][()], g[name][()], err_msg=name)
        for name in ("a", "b", "references"):
            np.testing.assert_allclose(f[name][()], g[name][()], rtol=1e-6, atol=1e-6, err_msg=name)
    expected = cmdtool.reconstruct(reference, at="last")
    state = online.reconstruct()
    assert list(state) == list(states[0])  # the observed order, loadable with strict=True
    for name, tensor in expected.items():
        assert tensor.dtype == state[name].dtype and tensor.shape == state[name].shape
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-5)
    with pytest.raises(
        CmdError,
        match=r"observation 30 \(checkpoint_30.safetensors\): tensor 'fc.bias' is float32 "
        r"\[3\]",
    ):
        online.observe({**states[0], "fc.bias": torch.zeros(3)})

    # It keeps no trajectory: cmd report says where the originals must come from, and takes them.
    from cmdtool.report import make_report

    with pytest.raises(CmdError, match="written by OnlineCMD, which keeps no trajectory; pass --checkpoints DIR"):
        make_report(saved, tmp_path / "report")
    report = make_report(saved, tmp_path / "report", checkpoints=run, trajectory=tmp_path / "t.h5").report
    assert report["online"]["warmup"] == F and report["run"]["checkpoints"] == 30


# ---------------------------------------------------------------------------------------------
# cmd watch


def test_watch_absorbs_complete_files_only_and_stops_at_until(tmp_path, online_run):
    """A scripted folder: each poll of the watcher lets the 'training' write a little more, including
    a checkpoint that is half written at one poll. The result equals cmd fit --warmup."""
    planted, run = online_run
    states = planted.states()
    live = tmp_path / "live"
    live.mkdir()
    full = {t: (run / f"epoch_{t}.safetensors").read_bytes() for t in range(12)}
    # "half": half the bytes are written; "hold": nothing changes (a stalled writer: the file is
    # stable but does not parse); "rest": the writer finishes.
    script = (
        [("write", t) for t in range(F - 1)]
        + [("half", F - 1), ("rest", F - 1)]
        + [("write", t) for t in range(F, 10)]
        + [("half", 10), ("hold", 10), ("hold", 10), ("rest", 10), ("write", 11)]
    )
    polls = []

    def sleep(seconds):
        polls.append(seconds)
        if script:
            action, t = script.pop(0)
            path = live / f"epoch_{t}.safetensors"
            if action != "hold":
                path.write_bytes(full[t][: len(full[t]) // 2] if action == "half" else full[t])
            if action == "rest":  # a writer that finished: new size and modification time
                os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
        elif len(polls) > 40:
            pytest.fail("watch did not stop at --until")

    messages = []
    out = tmp_path / "w.cmd.h5"
    watch(
        live,
        out,
        warmup=F,
        until=12,
        interval=0.5,
        modes=3,
        trajectory=tmp_path / "t.h5",
        say=messages.append,
        sleep=sleep,
    )
    assert polls and set(polls) == {0.5}
    assert any(
        m.startswith(f"fitted {out} on the warm-up epoch_0.safetensors … epoch_{F - 1}.safetensors") for m in messages
    )
    assert any(m.startswith(f"waiting: {live / 'epoch_10.safetensors'}: cannot read checkpoint") for m in messages), (
        messages
    )
    reference = tmp_path / "fit.cmd.h5"
    cmdtool.fit(
        write_run(tmp_path / "first12", states[:12]), reference, modes=3, warmup=F, trajectory=tmp_path / "r.h5"
    )
    with open_mode_file(out) as got, open_mode_file(reference) as want:
        assert got.names == want.names and got.T == 12
        np.testing.assert_array_equal(got.parameters()[0], want.parameters()[0])
        assert_relative(got.parameters()[1], want.parameters()[1], 1e-5)
        assert_relative(got.parameters()[2], want.parameters()[2], 1e-5)


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "cmdtool", *map(str, args)]


def test_killing_watch_mid_update_leaves_a_readable_mode_file(tmp_path, runner):
    """SIGKILL while cmd watch writes an update (the moment its temporary file appears); every time
    cmd info reads the mode file, and a new cmd watch resumes it. Ctrl-C stops it with exit 130:
    sent once the watcher says it waits for the next checkpoint (its stderr, a file read here), so
    it is known to be in its loop, not still importing."""
    planted = plant(M=3, T=12, noise=1e-2, seed=5, shapes={"w": (256, 1024), "v": (300,)})
    states = planted.states()
    live, out = tmp_path / "live", tmp_path / "w.cmd.h5"
    live.mkdir()
    write_run(live, states[:4])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = _cmd(
        "watch", live, "-o", out, "--warmup", 4, "--interval", 0.02, "-m", 3, "--trajectory", tmp_path / "t.h5"
    )
    logs = []

    def start():
        logs.append(tmp_path / f"watch_{len(logs)}.log")
        with open(logs[-1], "w") as log:
            return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=env, text=True)

    def holds() -> int:
        info = runner.invoke(app, ["info", str(out), "--json"])
        assert info.exit_code == 0, info.output
        summary = json.loads(info.stdout)
        assert summary["online"]["warmup"] == 4
        return summary["checkpoints"]

    watcher = start()
    deadline = time.monotonic() + 60
    while not out.exists() and watcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert out.exists(), logs[-1].read_text()
    written, killed_mid_write = 4, 0
    for _ in range(3):
        deadline = time.monotonic() + 60  # a restarted watcher first absorbs what it missed
        while holds() < written and time.monotonic() < deadline:
            time.sleep(0.02)
        before = holds()
        assert before == written
        temporaries = set(tmp_path.glob(".w.cmd.h5.*.tmp"))
        save_file(states[written], str(live / f"epoch_{written}.safetensors"))
        written += 1
        deadline = time.monotonic() + 60
        while not set(tmp_path.glob(".w.cmd.h5.*.tmp")) - temporaries and time.monotonic() < deadline:
            pass
        watcher.send_signal(signal.SIGKILL)  # the update is being written right now
        watcher.wait(timeout=30)
        killed_mid_write += bool(set(tmp_path.glob(".w.cmd.h5.*.tmp")) - temporaries)
        assert holds() in (before, before + 1)  # the old file, or the new one if the rename won the race
        watcher = start()
    assert killed_mid_write >= 2  # a half-written temporary was left behind, the mode file was not
    # Resume to the end, then stop with Ctrl-C once the watcher waits for more.
    waiting = f"waiting for checkpoints after epoch_{written - 1}.safetensors"
    deadline = time.monotonic() + 120
    while waiting not in logs[-1].read_text() and watcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert waiting in logs[-1].read_text(), logs[-1].read_text()
    watcher.send_signal(signal.SIGINT)
    watcher.wait(timeout=30)
    stderr = logs[-1].read_text()
    assert watcher.returncode == 130, stderr
    assert f"interrupted: {out} is intact" in stderr
    with open_mode_file(out) as modes:
        assert modes.names == [f"epoch_{t}.safetensors" for t in range(written)]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the ignored one, on purpose
def test_a_ctrl_c_python_ignores_is_raised_at_the_next_look():
    """A KeyboardInterrupt raised inside a weakref callback is ignored by Python ("Exception ignored
    in ..."); under ``remembered`` (cmd watch) the next ``sleep`` between looks raises it again."""
    from cmdtool._interrupt import remembered

    class Held:
        pass

    def interrupt_inside_the_callback(reference):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100_000):  # the handler runs here, at a bytecode boundary inside the callback
            pass

    before = signal.getsignal(signal.SIGINT)
    for remember in (False, True):
        with remembered() if remember else contextlib.nullcontext() as interrupts:
            held = Held()
            reference = weakref.ref(held, interrupt_inside_the_callback)
            del held  # the callback runs; its KeyboardInterrupt is printed and dropped
            assert reference() is None
            if remember:
                with pytest.raises(KeyboardInterrupt):
                    interrupts.sleep(0)
    assert signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------------------------------------
# Memory: nothing grows with the checkpoints already absorbed


def test_update_state_does_not_grow_with_absorbed_checkpoints(tmp_path):
    """Structurally: the only datasets that grow with T are the references (M × T), the time axis,
    the checkpoint names and infos and the carried rows; measured: the peak Python/numpy memory of
    one update is the same after 5 as after 50 absorbed checkpoints."""
    planted = plant(M=3, T=62, noise=1e-2, seed=7, shapes={"w": (200, 250), "b": (250,)})
    run = write_run(tmp_path / "run", planted.states())
    files = sorted(run.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
    shapes = {}
    for absorbed, name in ((5, "short"), (50, "long")):
        out = tmp_path / f"{name}.cmd.h5"
        cmdtool.fit(run, out, modes=3, stop=F, trajectory=tmp_path / "t.h5")
        cmdtool.update(out, files[F : F + absorbed])
        with h5py.File(out, "r") as f:
            shapes[name] = {}
            f.visititems(
                lambda key, obj: shapes[name].__setitem__(key, obj.shape) if isinstance(obj, h5py.Dataset) else None
            )
        tracemalloc.start()
        cmdtool.update(out, [files[F + absorbed]])
        shapes[name]["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    short, long = shapes["short"], shapes["long"]
    growing = sorted(k for k in short if k != "peak" and short[k] != long[k])
    assert growing == ["carried/bn.num_batches_tracked", "checkpoint_info", "checkpoints", "references", "time"]
    assert long["references"] == (3, F + 50) and long["a"] == short["a"] == (50_250,)
    N = 50_250
    assert long["peak"] < 1.05 * short["peak"] + 64_000, (short["peak"], long["peak"])
    assert long["peak"] < 40 * 8 * N  # a few float64 vectors of N and one checkpoint, not T of them


def test_report_labels_an_online_fit_and_marks_the_warmup(tmp_path, online_run):
    from cmdtool.report import make_report

    planted, run = online_run
    out = tmp_path / "m.cmd.h5"
    cmdtool.fit(run, out, modes=3, stop=F, trajectory=tmp_path / "warm.h5")
    cmdtool.update(out, [run])
    with pytest.raises(CmdError, match="pass --checkpoints"):  # the fit's store holds the warm-up only
        make_report(out, tmp_path / "report")
    report = make_report(out, tmp_path / "report", checkpoints=run, trajectory=tmp_path / "all.h5").report
    assert report["online"] == {
        "warmup": F,
        "updates": 30 - F,
        "warmup_last": f"epoch_{F - 1}.safetensors",
        "boundary_time": F - 0.5,
    }
    assert report["run"]["checkpoints"] == 30
    assert report["fit"]["rel_error"] == pytest.approx(cmdtool.summarize(out)["rel_error"], rel=1e-4)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert (
        f"**Online fit**: modes from the first {F} checkpoints (warm-up, up to epoch_{F - 1}.safetensors)" in markdown
    )
    plain = make_report(
        cmdtool.fit(run, tmp_path / "p.cmd.h5", modes=3, trajectory=tmp_path / "all.h5").mode_file, tmp_path / "plain"
    ).report
    assert plain["online"] is None


@pytest.mark.parametrize(
    "command, expected",
    [
        (["update"], ["MODEFILE", "NEW...", "--json"]),
        (
            ["watch"],
            [
                "--output",
                "--warmup",
                "--until",
                "--interval",
                "--modes",
                "--samples",
                "--seed",
                "--include",
                "--exclude",
                "--trajectory",
                "--force",
            ],
        ),
        (["fit"], ["--warmup"]),
    ],
)
def test_help_lists_the_online_options(runner, command, expected):
    result = runner.invoke(app, command + ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for word in expected:
        assert word in result.stdout, word


# ---------------------------------------------------------------------------------------------
# Online CMD meets the formats of real training stacks


def test_update_of_an_ema_fit_reads_the_ema_weights(tmp_path, runner):
    """timm-style files: `fit --ema` models state_dict_ema, and `cmd update` must absorb the EMA
    weights too (the model's weights here are far away: absorbing them would move b by ~1000)."""
    planted = plant(T=6, seed=4)
    run = tmp_path / "timm"
    run.mkdir()
    for t, state in enumerate(planted.states()):
        weights = {k: (v - 1000.0 if v.is_floating_point() else v) for k, v in state.items()}
        torch.save({"epoch": t, "state_dict": weights, "state_dict_ema": state}, run / f"checkpoint-{t}.pth.tar")
    whole, part = tmp_path / "whole.cmd.h5", tmp_path / "part.cmd.h5"

    def cmd(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.stderr
        return result

    cmd("fit", run, "-o", whole, "--warmup", 5, "--ema", "--modes", 3, "--trajectory", tmp_path / "t.h5")
    cmd("fit", run, "-o", part, "--stop", 5, "--ema", "--modes", 3, "--trajectory", tmp_path / "p.h5")
    cmd("update", part, run / "checkpoint-5.pth.tar")
    with open_mode_file(part) as got, open_mode_file(whole) as want:
        assert got.names == want.names and got.T == 6
        np.testing.assert_array_equal(got.parameters()[1], want.parameters()[1])
        np.testing.assert_array_equal(got.parameters()[2], want.parameters()[2])


def test_update_with_numpy_safetensors_never_imports_torch(tmp_path, online_run):
    """Reading new safetensors checkpoints of numpy dtypes goes through numpy, as the fit does."""
    planted, run = online_run
    out = tmp_path / "w.cmd.h5"
    cmdtool.fit(run, out, modes=3, warmup=F, stop=F + 2, trajectory=tmp_path / "t.h5")
    code = (
        "import sys, cmdtool; cmdtool.update(sys.argv[1], [sys.argv[2]]); "
        "print('torch' in sys.modules, cmdtool.summarize(sys.argv[1])['checkpoints'])"
    )
    printed = subprocess.run(
        [sys.executable, "-c", code, str(out), str(run / f"epoch_{F + 2}.safetensors")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed.split() == ["False", str(F + 3)]


def test_watch_never_takes_last_ckpt_for_a_checkpoint(tmp_path, online_run):
    """Lightning writes last.ckpt beside epoch files: cmd watch skips it as cmd fit does."""
    planted, run = online_run
    live = tmp_path / "live"
    live.mkdir()
    for t in range(F + 2):
        (live / f"epoch_{t}.safetensors").write_bytes((run / f"epoch_{t}.safetensors").read_bytes())
    (live / "last.ckpt").write_bytes((run / f"epoch_{F + 1}.safetensors").read_bytes())
    out = tmp_path / "w.cmd.h5"
    watch(
        live,
        out,
        warmup=F,
        until=F + 2,
        interval=0.01,
        modes=3,
        trajectory=tmp_path / "t.h5",
        sleep=lambda seconds: None,
    )
    with open_mode_file(out) as modes:
        assert modes.names == [f"epoch_{t}.safetensors" for t in range(F + 2)]


def test_report_reads_the_checkpoints_an_online_cmd_loop_observed_in_state_dict_order(tmp_path, runner):
    """OnlineCMD lays out ``state_dict()`` order; saved as safetensors, the files sort the names. The
    report's store follows the mode file's order, so the same numbers come out (found in review)."""
    planted = plant(M=2, T=10, seed=5)
    states = planted.states()
    assert list(states[0]) != sorted(states[0])  # the planted state dicts are not in sorted order
    run = write_run(tmp_path / "run", states)
    online = cmdtool.OnlineCMD(modes=2, warmup=6)
    for t, state in enumerate(states):
        online.observe(state, name=f"epoch_{t}.safetensors", time=t)
    out = online.save(tmp_path / "online.cmd.h5")
    report = tmp_path / "report"
    result = runner.invoke(app, ["report", str(out), "-o", str(report), "--checkpoints", str(run), "--json"])
    assert result.exit_code == 0, result.stderr
    measured = json.loads(result.stdout)
    with open_mode_file(out) as modes:
        assert [s.name for s in modes.layout.tensors] == list(states[0])
        assert measured["fit"]["rel_error"] == pytest.approx(modes.metrics.rel_error, rel=1e-3)  # stored float32 model


def test_online_cmd_takes_state_dicts_as_training_holds_them(tmp_path):
    """OnlineCMD reads tensors where they are: parameters that require grad, non-contiguous views
    (a channels_last weight) and bfloat16 or float64 tensors (observed as float32 values) give the
    state that plain contiguous float32 tensors of those values give, bit for bit."""
    planted = plant(M=3, T=12, noise=1e-3, seed=2)
    plain_states, odd_states = [], []
    for state in planted.states():
        bf16 = state["fc.bias"].to(torch.bfloat16)
        plain = dict(state, **{"fc.bias": bf16.float()})
        odd = dict(state, **{"fc.bias": bf16,
                             "conv.weight": state["conv.weight"].to(memory_format=torch.channels_last)
                             .requires_grad_(),
                             "fc.weight": state["fc.weight"].double().t().contiguous().t()})
        assert not odd["conv.weight"].is_contiguous() and not odd["fc.weight"].is_contiguous()
        plain_states.append(plain)
        odd_states.append(odd)
    plain, odd = cmdtool.OnlineCMD(modes=3, warmup=5), cmdtool.OnlineCMD(modes=3, warmup=5)
    for t, (p, o) in enumerate(zip(plain_states, odd_states)):
        plain.observe(p, time=t)
        odd.observe(o, time=t)
    assert odd.ready and odd.state.a.device.type == "cpu"
    for key in ("a", "b", "labels", "first"):
        torch.testing.assert_close(getattr(odd.state, key), getattr(plain.state, key), rtol=0, atol=0)
    np.testing.assert_array_equal(odd.state.references, plain.state.references)
    np.testing.assert_array_equal(odd.state.mode_sse, plain.state.mode_sse)
    got = odd.reconstruct()
    assert got["fc.bias"].dtype == torch.bfloat16 and got["fc.weight"].dtype == torch.float64
    moved = {k: v.to("meta") for k, v in odd_states[-1].items()}  # the state stays where the warm-up was
    with pytest.raises(CmdError, match=r"observation 12 .*: the model is on meta but the CMD state on cpu"):
        odd.observe(moved, time=12)
    for name, value in plain.reconstruct().items():  # the same CMD weights, in each tensor's own dtype
        rtol = 2 ** -8 if got[name].dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(got[name].double(), value.double(), rtol=rtol, atol=1e-6)


def test_report_of_an_online_fit_finds_the_warmups_moving_parameters_a_column_tile_at_a_time(tmp_path, online_run,
                                                                                         monkeypatch):
    """A 16-bit store's warm-up rows are read (and widened) a column tile at a time when the report
    samples the parameters that moved during the warm-up, never all of them at once (``W[:F]`` would
    widen F float32 values a parameter)."""
    import torch

    from cmdtool.report import make_report
    from cmdtool.trajectory import EncodedRows

    planted, _ = online_run
    run = write_run(tmp_path / "bf16", [{k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                         for k, v in state.items()} for state in planted.states()])
    out = tmp_path / "m.cmd.h5"
    cmdtool.fit(run, out, modes=3, stop=F, trajectory=tmp_path / "warm.h5")
    cmdtool.update(out, [run])
    keys = []
    read = EncodedRows.__getitem__
    monkeypatch.setattr(EncodedRows, "__getitem__", lambda self, key: keys.append(key) or read(self, key))
    report = make_report(out, tmp_path / "report", checkpoints=run, trajectory=tmp_path / "all.h5").report
    assert report["online"]["warmup"] == F
    rows_only = [key for key in keys if not isinstance(key, tuple)]
    assert keys and not rows_only, rows_only
