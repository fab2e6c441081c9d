"""cmdtool.training: online CMD on the model's device equals ``cmd fit --warmup``; embedded CMD
(paper §3.4) picks the parameters whose fit stopped moving and then holds them at ``a·r(t) + b``."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import cmdtool
from cmdtool import CmdError
from cmdtool.cli import app
from cmdtool.modefile import open_mode_file
from cmdtool.online.least_squares import BLOCK, update_frame, update_parameters
from cmdtool.training import EmbeddedCMD
from helpers import assert_same_mode_files, plant, write_run

torch.set_num_threads(1)


class Holder(nn.Module):
    """A module holding exactly the tensors of a state dict, in the dict's order (floats trainable)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        for prefix in dict.fromkeys(name.split(".")[0] for name in state):
            module = nn.Module()
            for name, value in state.items():
                if name.split(".")[0] == prefix:
                    module.register_parameter(name.split(".", 1)[1], nn.Parameter(
                        value.clone(), requires_grad=value.is_floating_point()))
            self.add_module(prefix, module)


def sorted_states(planted):
    """Planted checkpoints with their tensors in name order (as safetensors files hold them)."""
    return [dict(sorted(s.items())) for s in planted.states()]


def normal_equations(a, b, labels, w, frame, frozen=None):
    """The recursive least squares as ``update_fit`` states it (``[a b] += e · x G_new⁻¹``, then the
    change of frame), written out independently of ``update_parameters``'s rearranged form."""
    e = w - a * frame.rho[labels] - b
    if frozen is not None:
        e = e * ~frozen
    a_old_frame = a + e * frame.gain_a[labels]
    b_old_frame = b + e * frame.gain_b[labels]
    sse = np.bincount(labels, weights=e * e / frame.sse_weight[labels], minlength=len(frame.rho))
    return a_old_frame * frame.ratio[labels], b_old_frame + a_old_frame * frame.shift[labels], sse


def update_case(N: int = 5000, M: int = 3, T: int = 6, seed: int = 1):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(M, T))
    r -= r.mean(axis=1, keepdims=True)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    a, b = rng.normal(size=N), rng.normal(size=N)
    w = (b + rng.normal(size=N)).astype(np.float32)
    labels, offset, scale, values = rng.integers(0, M, N), rng.normal(size=M), rng.uniform(1, 2, M), rng.normal(size=M)
    return a, b, w, labels, offset, scale, update_frame(r, offset, scale, values)


@pytest.mark.parametrize("frozen_share", [0.0, 0.5])
def test_update_parameters_equals_the_normal_equations_on_numpy_and_torch(frozen_share):
    """The one update, in place and in blocks, on numpy arrays (``cmd update``) and on torch tensors
    (``EmbeddedCMD``, ``OnlineCMD``), with lanes and blocks of any size, equals the normal equations
    to 1e-12 (torch fuses three steps, so its last bits may differ from numpy's); within one library the
    blocks and lanes give the same a, b bit for bit."""
    a, b, w, labels, offset, scale, frame = update_case()
    frozen = np.random.default_rng(2).random(len(a)) < frozen_share if frozen_share else None
    a_want, b_want, sse_want = normal_equations(a, b, labels, w.astype(np.float64), frame, frozen)
    first = np.roll(w, 1)
    results = []
    for library, lanes, block in (("numpy", 1, BLOCK), ("numpy", 4, 7), ("torch", 8, BLOCK), ("torch", 1, 7),
                                  ("torch", 8, len(a))):
        index = labels * lanes + np.arange(len(a)) % lanes
        state = [a.copy(), b.copy(), first, index, [w[:1000], w[1000:1001], w[1001:0], w[1001:]]]
        mask = frozen
        if library == "torch":
            state = [torch.from_numpy(v) for v in state[:4]] + [[torch.from_numpy(p) for p in state[4]]]
            state[3] = state[3].to(torch.int32)
            mask = None if frozen is None else torch.from_numpy(frozen)
        sums = update_parameters(*state, frame, frozen=mask, lanes=lanes, block=block)
        got_a, got_b = (np.asarray(v) for v in state[:2])
        np.testing.assert_allclose(got_a, a_want, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got_b, b_want, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(sums.mode_sse, sse_want, rtol=1e-12)
        w64, T = w.astype(np.float64), frame.references.shape[1] - 1
        assert sums.sq_norm == pytest.approx(w64 @ w64, rel=1e-12)
        assert sums.sq_displacement == pytest.approx(((w64 - first) ** 2).sum(), rel=1e-12)
        assert sums.sq_centred == pytest.approx(((w64 - b) ** 2).sum() * T / (T + 1), rel=1e-12)
        results.append((library, got_a, got_b))
    for library, got_a, got_b in results:  # blocks and lanes change no value of a, b
        _, want_a, want_b = next(r for r in results if r[0] == library)
        np.testing.assert_array_equal(got_a, want_a)
        np.testing.assert_array_equal(got_b, want_b)
    if frozen is not None:  # frozen fits only move with the frame: the same function of the raw reference
        (_, a_f, b_f), kept = results[0], labels[frozen]
        raw_before = a[frozen] / scale[kept], b[frozen] - a[frozen] * offset[kept] / scale[kept]
        raw_after = a_f[frozen] / frame.scale[kept], b_f[frozen] - a_f[frozen] * frame.offset[kept] / frame.scale[kept]
        np.testing.assert_allclose(raw_after[0], raw_before[0], rtol=1e-12)
        np.testing.assert_allclose(raw_after[1], raw_before[1], rtol=1e-12, atol=1e-12)


def test_device_update_equals_cmd_update():
    """``DeviceState.observe`` (torch, in lanes) gives what ``OnlineState.observe`` (numpy, the update
    of ``cmd update``) gives, to float64 rounding (1e-12)."""
    from cmdtool.checkpoints import CheckpointInfo
    from cmdtool.layout import build_layout
    from cmdtool.modes import FitSettings
    from cmdtool.training._warmup import warmup_state
    from cmdtool.training.state import DeviceState

    planted = plant(M=3, T=12, noise=1e-3)
    rows = planted.W.astype(np.float32)
    layout = build_layout({name: (shape, "float32") for name, shape in planted.shapes.items()})
    info = CheckpointInfo("safetensors")
    online = warmup_state(rows[:5], layout, range(5), [f"{t}" for t in range(5)], [info] * 5, {},
                          FitSettings(modes=3, samples=300, warmup=5))
    device = DeviceState.from_online(online, torch.device("cpu"))
    for t in range(5, 12):
        online.observe(rows[t], f"{t}", t, info, {})
        device.observe(torch.from_numpy(rows[t]), f"{t}", t, info, {})
    np.testing.assert_allclose(device.a.numpy(), online.a, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(device.b.numpy(), online.b, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(device.references, online.references)  # the same update_frame
    np.testing.assert_allclose(device.mode_sse, online.mode_sse_least_squares, rtol=1e-12)
    for key in ("sq_norm", "sq_displacement", "sq_centred"):
        assert getattr(device, key) == pytest.approx(getattr(online, key), rel=1e-12), key


def test_online_state_equals_fit_warmup(tmp_path):
    """Observing the checkpoints of a folder gives what ``cmd fit --warmup`` writes (float32 rounding)."""
    planted = plant(M=3, T=16, noise=1e-3)
    states = sorted_states(planted)
    run = write_run(tmp_path / "run", states)
    cmdtool.fit(run, tmp_path / "fit.cmd.h5", modes=3, samples=300, warmup=6, trajectory=tmp_path / "t.h5")
    model = Holder(states[0])
    cmd = EmbeddedCMD(model, modes=3, warmup=6, samples=300)
    for t, state in enumerate(states):
        model.load_state_dict(state)
        cmd.observe(f"epoch_{t}.safetensors", t)
    cmd.save(tmp_path / "online.cmd.h5")
    with h5py.File(tmp_path / "fit.cmd.h5") as f, h5py.File(tmp_path / "online.cmd.h5") as g:
        assert "embedding" not in g  # online CMD only: a plain online mode file
        for key in ("labels", "reference_index", "mode_sizes", "time", "carried/bn.num_batches_tracked"):
            np.testing.assert_array_equal(f[key][()], g[key][()], err_msg=key)
        for key in ("a", "b", "references", "reference_offset", "reference_scale", "online/first"):
            np.testing.assert_allclose(g[key][()], f[key][()], rtol=2e-6, atol=1e-6, err_msg=key)
        fm, gm = (json.loads(x.attrs["metrics"]) for x in (f, g))
        assert gm["rel_error"] == pytest.approx(fm["rel_error"], rel=1e-6)
    loaded = cmdtool.reconstruct(tmp_path / "online.cmd.h5")
    for name, value in cmd.reconstruct().items():
        torch.testing.assert_close(value, loaded[name], rtol=1e-6, atol=1e-6)


def planted_training(tmp_path, *, noise_free: float = 0.5, embed_percent: float = 25.0, relative: bool = False):
    """A planted run played into a live model: every "epoch" the optimizer moves each parameter to its
    planted value plus momentum-like drift; half the parameters follow their mode exactly."""
    planted = plant(M=2, T=16, noise=0.0, seed=3)
    time = np.linspace(0, 1, 16)
    planted.references = np.stack([time, np.sin(12 * time)])  # distinct already over the warm-up
    rng = np.random.default_rng(4)
    N = planted.W.shape[1]
    exact = rng.random(N) < noise_free
    planted.W = (planted.a * planted.references[planted.labels].T + planted.b
                 + np.where(exact, 0.0, 3e-2) * rng.normal(size=planted.W.shape))
    states = sorted_states(planted)
    model = Holder(states[0])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                                weight_decay=0.1)
    cmd = EmbeddedCMD(model, modes=2, warmup=6, embed_window=2, embed_percent=embed_percent, relative=relative,
                      samples=300)
    cmd.attach(optimizer)
    observed = []
    for t, state in enumerate(states):
        for _ in range(3):  # three optimizer steps towards the planted weights, with a real loss
            optimizer.zero_grad()
            loss = sum(((p - state[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad)
            loss.backward()
            for name, p in model.named_parameters():
                if name in cmd.tensor_names() and cmd.state is not None and p.grad is not None:
                    spec = next(s for s in cmd.layout.modelled if s.name == name)
                    assert (p.grad.reshape(-1)[cmd.state.embedded[spec.columns]] == 0).all()  # masked
            optimizer.step()
        with torch.no_grad():  # the last step lands on the planted values (free parameters only)
            for name, p in model.named_parameters():
                p.copy_(state[name])
        cmd.step()
        observed.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        cmd.observe(f"epoch_{t}.safetensors", t)
    return planted, exact, cmd, observed


def test_embedding_picks_fits_that_stopped_moving_and_holds_them(tmp_path):
    planted, exact, cmd, observed = planted_training(tmp_path)
    path = cmd.save(tmp_path / "embedded.cmd.h5")
    with open_mode_file(path) as modes:
        embedded_at, reference_index = modes.embedded_at(), modes.reference_index
        assert modes.embedding == {"warmup": 6, "window": 2, "percent": 25.0, "relative": False,
                                   "embeddable": modes.N - 2}  # every float is trainable here, but the 2 references
        counts = modes.embedded_counts()
        permutation = planted.permutation(modes.layout)
    assert set(np.unique(embedded_at)) == {-1, 7, 9, 11, 13}  # 4 windows of 25 % of all: nothing left for 15
    assert counts[7] == int(np.ceil(0.25 * cmd.embeddable_count))  # 25 % of all at the first window
    assert cmd.embedded_fraction == pytest.approx(counts[-1] / cmd.embeddable_count)
    assert not np.isin(reference_index, np.flatnonzero(embedded_at >= 0)).any()
    first_window = np.flatnonzero(embedded_at == 7)
    assert exact[permutation][first_window].mean() > 0.95  # the exactly planted ones, whose a, b stand still
    # After its window an embedded parameter is exactly a·r(t) + b at every later observation.
    rows = [torch.cat([o[s.name].reshape(-1).double() for s in cmd.layout.modelled]).numpy() for o in observed]
    for t in range(8, 16):
        modelled = torch.cat([v.reshape(-1).double() for k, v in cmdtool.reconstruct(path, at=t).items()
                              if k != "bn.num_batches_tracked"]).numpy()
        mask = (embedded_at >= 0) & (embedded_at < t)
        np.testing.assert_allclose(rows[t][mask], modelled[mask], rtol=1e-6, atol=1e-6)
        assert not np.allclose(rows[t][mask], rows[t - 1][mask])  # they do move, with their reference


def test_embedding_relative_takes_a_share_of_the_free_ones(tmp_path):
    _, _, cmd, _ = planted_training(tmp_path, embed_percent=50, relative=True)
    free = cmd.embeddable_count
    expected = 0
    for _ in range(5):  # windows at 7, 9, 11, 13, 15
        expected += int(np.ceil((free - expected) * 0.5))
    assert int(cmd.state.embedded.sum()) == expected


def replay(cmd: EmbeddedCMD, states, times) -> None:
    for t in times:
        with torch.no_grad():
            for name, p in cmd.model.named_parameters():
                p.copy_(states[t][name])
        cmd.step()
        cmd.observe(f"epoch_{t}.safetensors", t)


RESUME_OPTIONS = dict(modes=2, warmup=6, embed_window=2, embed_percent=25.0, relative=False, samples=300)


def stopped_run(tmp_path, stop: int = 9, whole: bool = True):
    """The planted training run replayed into fresh objects: ``(states, whole, first)``, ``whole``
    over all 16 observations (None unless asked), ``first`` stopped after ``stop``."""
    planted, _, _, _ = planted_training(tmp_path)
    states = sorted_states(planted)
    complete = None
    if whole:
        complete = EmbeddedCMD(Holder(states[0]), **RESUME_OPTIONS)
        replay(complete, states, range(16))
    first = EmbeddedCMD(Holder(states[0]), **RESUME_OPTIONS)
    replay(first, states, range(stop))
    return states, complete, first


def test_state_dict_resumes_exactly(tmp_path):
    """Stopping after 9 observations (past the first window) and resuming from ``state_dict()``,
    through ``torch.save`` and ``torch.load(weights_only=True)``, gives the same mode file."""
    states, whole, first = stopped_run(tmp_path)
    options = RESUME_OPTIONS
    whole.save(tmp_path / "whole.cmd.h5")
    torch.save(first.state_dict(), tmp_path / "state.pt")
    second = EmbeddedCMD(Holder(states[0]), **options)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    replay(second, states, range(9, 16))
    second.save(tmp_path / "resumed.cmd.h5")
    assert_same_mode_files(tmp_path / "resumed.cmd.h5", tmp_path / "whole.cmd.h5")
    warm = EmbeddedCMD(Holder(states[0]), **options)  # resuming inside the warm-up too
    replay(warm, states, range(3))
    again = EmbeddedCMD(Holder(states[0]), **options)
    again.load_state_dict(warm.state_dict())
    replay(again, states, range(3, 16))
    assert_same_mode_files(again.save(tmp_path / "warm.cmd.h5"), tmp_path / "whole.cmd.h5")


@pytest.mark.parametrize("spoil, message", [
    (lambda s: s["labels"].fill_(7), "labels range from 7 to 7, outside 0..1"),
    (lambda s: s.update(a=s["a"][:-1]), "a has .* values, not"),
    (lambda s: s.update(frozen_a=s["frozen_a"][1:]), "frozen_a has"),
    (lambda s: s.update(snapshot_b=s["snapshot_b"][:0]), "snapshot_b has 0 values"),  # the window writes N
    (lambda s: s["reference_index"].fill_(10 ** 9), "a reference index lies outside the parameters"),
    (lambda s: (s["labels"].fill_(-1), s.pop("frozen_a")), "labels range from -1 to -1"),  # checked before use
    (lambda s: s["frozen_a"].fill_(float("nan")), "frozen_a holds NaN or Inf values"),  # step() writes them
    (lambda s: s["scale"].fill_(0), "a reference scale is not positive"),
    (lambda s: s.update(reference_index=s["reference_index"].double()), "reference_index is torch.float64")])
def test_a_corrupt_saved_state_is_refused(tmp_path, spoil, message):
    """The state is read from a file and the update indexes with its labels: sizes and ranges are
    checked before anything runs."""
    states, _, first = stopped_run(tmp_path, whole=False)
    saved = first.state_dict()
    spoil(saved["state"])
    with pytest.raises(CmdError, match="the saved CMD state is incomplete or corrupt .*" + message):
        EmbeddedCMD(Holder(states[0]), **RESUME_OPTIONS).load_state_dict(saved)


def test_a_saved_state_of_strided_tensors_resumes_exactly(tmp_path):
    """torch.save keeps a view's strides; the state is made contiguous when it is read back, and
    resumes exactly."""
    states, whole, first = stopped_run(tmp_path)
    saved = first.state_dict()
    for key in ("a", "b", "first", "snapshot_a", "snapshot_b"):
        value = saved["state"][key]
        saved["state"][key] = torch.stack([value, torch.zeros_like(value)], dim=1)[:, 0]  # every other value
        assert not saved["state"][key].is_contiguous()
    torch.save(saved, tmp_path / "strided.pt")
    second = EmbeddedCMD(Holder(states[0]), **RESUME_OPTIONS)
    second.load_state_dict(torch.load(tmp_path / "strided.pt", weights_only=True))
    replay(second, states, range(9, 16))
    assert_same_mode_files(second.save(tmp_path / "resumed.cmd.h5"), whole.save(tmp_path / "whole.cmd.h5"))


def test_a_state_saved_without_the_frozen_fits_resumes(tmp_path):
    """States saved before ``frozen_a, frozen_b`` were kept: the frozen fits are made from ``a, b``."""
    states, whole, first = stopped_run(tmp_path)
    saved = first.state_dict()
    for key in ("frozen_a", "frozen_b"):
        del saved["state"][key]
    second = EmbeddedCMD(Holder(states[0]), **RESUME_OPTIONS)
    second.load_state_dict(saved)
    torch.testing.assert_close(second.state.frozen_a, first.state.frozen_a, rtol=1e-12, atol=0)
    replay(second, states, range(9, 16))
    for key in ("a", "b", "embedded_at"):
        torch.testing.assert_close(getattr(second.state, key), getattr(whole.state, key), rtol=1e-9, atol=1e-12)


def test_cli_reads_an_embedded_mode_file(tmp_path):
    _, _, cmd, _ = planted_training(tmp_path)
    path = cmd.save(tmp_path / "embedded.cmd.h5")
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "L = 2, P = 25%, of all); over time: 25% at 7, 50% at 9" in " ".join(result.stdout.split())
    summary = cmdtool.summarize(path)
    assert summary["embedding"]["fraction"][6] == 0 and summary["embedding"]["fraction"][-1] == cmd.embedded_fraction
    result = runner.invoke(app, ["reconstruct", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "epoch_15.safetensors").is_file()
    # cmd update continues it as an online fit, without the embedding record
    state = {k: v.detach().clone() for k, v in cmd.model.state_dict().items()}
    write_run(tmp_path / "new", [state] * 17)  # epoch_16.safetensors is the one that comes after
    result = runner.invoke(app, ["update", str(path), str(tmp_path / "new" / "epoch_16.safetensors")])
    assert result.exit_code == 0, result.output
    assert cmdtool.summarize(path)["checkpoints"] == 17 and cmdtool.summarize(path)["embedding"] is None
    assert "note: the embedding record of embedded CMD is dropped: an update continues the file as a plain online " \
           "fit (every parameter's a, b updated)" in result.stderr


# --------------------------------------------------------------------------- bad input


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_changed_shape_or_name_between_observations():
    model = small_model()
    cmd = EmbeddedCMD(model, warmup=3)
    cmd.observe()
    model[2] = nn.Linear(3, 5)
    with pytest.raises(CmdError, match=r"observation 1 .*tensor '2.weight' is float32 \[5, 3\], but float32 \[2, 3\]"):
        cmd.observe()
    model[2] = nn.Linear(3, 2)
    model.add_module("3", nn.Linear(2, 2))
    with pytest.raises(CmdError, match="tensor '3.weight' is not in the first observation"):
        cmd.observe()


def test_nan_weights_are_named():
    model = small_model()
    cmd = EmbeddedCMD(model, warmup=3)
    cmd.observe()
    with torch.no_grad():
        model[0].bias[1] = float("nan")
    with pytest.raises(CmdError, match="observation 1 .*tensor '0.bias' contains NaN values"):
        cmd.observe()


def test_resuming_with_other_settings():
    model = small_model()
    cmd = EmbeddedCMD(model, warmup=3, embed_percent=10, embed_window=5)
    cmd.observe()
    other = EmbeddedCMD(model, warmup=3, embed_percent=10, embed_window=4)
    with pytest.raises(CmdError, match="other CMD settings: embed_window is 5 in the saved state, 4 now"):
        other.load_state_dict(cmd.state_dict())


def test_warmup_longer_than_the_run(tmp_path):
    cmd = EmbeddedCMD(small_model(), warmup=5)
    cmd.observe()
    cmd.observe()
    with pytest.raises(CmdError, match="warm-up needs 5 observations and the run has made 2"):
        cmd.save(tmp_path / "x.cmd.h5")
    assert not (tmp_path / "x.cmd.h5").exists()


@pytest.mark.parametrize("options, message", [
    (dict(embed_percent=150), "embed_percent 150"),
    (dict(warmup=1), r"warmup must be an integer of at least 2 \(got 1\)"),
    (dict(embed_percent=5, embed_window=0), "embed_window 0"), (dict(modes=0), "modes")])
def test_bad_settings(options, message):
    with pytest.raises(CmdError, match=message):
        EmbeddedCMD(small_model(), **options)


def test_device_update_in_blocks_from_the_model_tensors():
    """The update runs over blocks of ``BLOCK`` columns on every device, filled from the model's tensors
    without a concatenation: blocks that split tensors, tensors that split blocks, and one block of
    all N columns give the same state, bit for bit, through a run with embedded (frozen) parameters and
    with a float64 and a bfloat16 tensor observed as float32 values."""
    planted = plant(M=3, T=12, noise=1e-3)
    states = sorted_states(planted)
    wide = {"conv.weight": torch.float64, "fc.bias": torch.bfloat16}
    assert set(wide) <= set(states[0])
    states = [{k: v.to(wide.get(k, v.dtype)) for k, v in state.items()} for state in states]
    runs = {block: EmbeddedCMD(Holder(states[0]), modes=3, warmup=5, samples=300, embed_window=2, embed_percent=20)
            for block in (BLOCK, 7, 1 << 30)}
    for t, state in enumerate(states):
        for block, cmd in runs.items():
            if cmd.state is not None:
                cmd.state.block = block
            cmd.model.load_state_dict(state)
            cmd.observe(f"{t}", t)
    whole = runs[1 << 30]
    assert whole.embedded_fraction > 0
    for block, cmd in runs.items():
        for key in ("a", "b", "embedded_at", "snapshot_a", "snapshot_b", "frozen_a", "frozen_b"):
            torch.testing.assert_close(getattr(cmd.state, key), getattr(whole.state, key), rtol=0, atol=0)
        np.testing.assert_allclose(cmd.state.mode_sse, whole.state.mode_sse, rtol=1e-12)
        for key in ("sq_norm", "sq_displacement", "sq_centred"):
            assert getattr(cmd.state, key) == pytest.approx(getattr(whole.state, key), rel=1e-12), key
        for name, value in whole.model.state_dict().items():  # step() set the same embedded values
            torch.testing.assert_close(cmd.model.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("settings, message", [
    (dict(seed=-1), "seed must be an integer of at least 0 (got -1)"),
    (dict(modes=2.5), "modes must be an integer of at least 1 (got 2.5)"),
    (dict(warmup=2.5), "warmup must be an integer of at least 2 (got 2.5)"),
    (dict(warmup=None), "warmup must be an integer of at least 2 (got None): the modes are found on the first "
                        "observations"),
    (dict(modes="auto"), "modes must be an integer of at least 1 (got 'auto')"),
    (dict(embed_window=1.5), "embed_window must be an integer (got 1.5)"),
    (dict(include="fc.*"), "include must be a list of glob patterns, not a string (got 'fc.*'; pass ['fc.*'])"),
])
def test_bad_settings_fail_before_training_starts(settings, message):
    """Every setting is checked when EmbeddedCMD (and so a callback) is made, not after the warm-up (review)."""
    with pytest.raises(CmdError) as raised:
        EmbeddedCMD(None, **settings)
    assert str(raised.value) == message


def test_embedded_channels_last_weights_are_held():
    """A channels_last convolution weight is not contiguous: its embedded entries (positions in the
    tensor's logical order) are still held at a·r(t) + b, and their gradients are zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 2)).to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cmd = EmbeddedCMD(model, modes=2, warmup=4, embed_window=2, embed_percent=30, samples=50)
    cmd.attach(optimizer)
    x, y = torch.randn(32, 2, 4, 4), torch.randn(32, 2)
    for epoch in range(10):
        for batch in range(4):
            optimizer.zero_grad()
            loss = ((model(x[8 * batch:8 * batch + 8]) - y[8 * batch:8 * batch + 8]) ** 2).mean()
            loss.backward()
            if cmd.state is not None and cmd.embedded_fraction > 0:
                mask = cmd.state.embedded[:model[0].weight.numel()].view(model[0].weight.shape)
                assert mask.any() and (model[0].weight.grad[mask] == 0).all()
            optimizer.step()
        cmd.observe(f"{epoch}", epoch)
    assert cmd.embedded_fraction > 0.5
    held = cmd.reconstruct()["0.weight"]
    mask = cmd.state.embedded[:held.numel()].view(held.shape)
    torch.testing.assert_close(model[0].weight.detach()[mask], held[mask], rtol=1e-6, atol=1e-7)
    assert not model[0].weight.is_contiguous()  # set in place, its memory format kept


def test_step_refuses_a_parameter_that_changed_shape():
    """step() writes embedded values by position: a parameter replaced by one of another shape since
    the last observation is an error, never a write past its end."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2))
    cmd = EmbeddedCMD(model, modes=2, warmup=3, embed_window=1, embed_percent=50, samples=30)
    for t in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.1 * (t + 1))
        cmd.observe(f"{t}", t)
    assert cmd.embedded_fraction > 0
    model[0].weight = nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(CmdError, match=r"tensor '0.weight' is \[2, 3\] now, but \[5, 6\] when observed"):
        cmd.step()
    del model[0].weight
    with pytest.raises(CmdError, match=r"tensor '0.weight' is missing now, but \[5, 6\] when observed"):
        cmd.step()


def test_a_model_moved_to_another_device_is_an_error(tmp_path):
    """The state lives where the model was; the update reads the model's own tensors, so a model
    moved since (here to the meta device) is a clear error, in observe() and in step()."""
    planted, _, _, _ = planted_training(tmp_path)
    states = sorted_states(planted)
    cmd = EmbeddedCMD(Holder(states[0]), modes=2, warmup=6, embed_window=2, embed_percent=25.0, samples=300)
    replay(cmd, states, range(9))
    cmd.model.to("meta")
    with pytest.raises(CmdError, match="EmbeddedCMD.step: the model is on meta but the CMD state on cpu"):
        cmd.step()
    with pytest.raises(CmdError, match=r"observation 9 .*: the model is on meta but the CMD state on cpu"):
        cmd.observe("9", 9)


def test_state_dict_is_a_copy_and_loading_a_warmup_state_removes_the_hooks(tmp_path):
    """state_dict() does not change as training goes on (and two objects loaded from one state do not
    share tensors); loading a state of the warm-up into a used object removes its gradient hooks."""
    states, _, first = stopped_run(tmp_path, whole=False)
    options = RESUME_OPTIONS
    saved = first.state_dict()
    kept = saved["state"]["a"].clone()
    second = EmbeddedCMD(Holder(states[0]), **options)
    second.load_state_dict(saved)
    replay(first, states, range(9, 11))
    assert torch.equal(saved["state"]["a"], kept) and torch.equal(second.state.a, kept)
    warm = EmbeddedCMD(Holder(states[0]), **options)
    replay(warm, states, range(3))
    assert first._hooks
    first.load_state_dict(warm.state_dict())
    assert not first._hooks and first.state is None
    first.step()  # nothing embedded during a warm-up: nothing to do
    model = first.model
    loss = sum((p ** 2).sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    assert all(bool((p.grad != 0).any()) for p in model.parameters() if p.requires_grad and p.numel() > 1)


def test_an_embedded_run_compiles_and_loads_nothing(tmp_path, isolated_cache):
    """Online and embedded CMD run in torch operations alone: after a run with embedding windows and
    step() holds, nothing (no shared library, no lib/ folder) is left in $CMDTOOL_CACHE, and the
    code of the update loads no native code and reads no memory by address."""
    from pathlib import Path

    _, _, cmd, _ = planted_training(tmp_path)
    assert cmd.embedded_fraction > 0
    cmd.save(tmp_path / "embedded.cmd.h5")
    assert not isolated_cache.exists() or not any(isolated_cache.rglob("*"))
    package = Path(cmdtool.__file__).parent
    sources = [package / "decompose.py", *(package / "training").rglob("*.py"), *(package / "online").rglob("*.py"),
               *(package / "integrations").rglob("*.py")]
    for source in sources:
        text = source.read_text()
        for word in ("ctypes", "CDLL", "data_ptr", "subprocess", "cffi"):
            assert word not in text, f"{source.relative_to(package)} uses {word}"


def test_cmd_weights_never_put_a_negative_running_variance_in_the_model():
    """``load_cmd_weights`` (``swap_at_end``) and ``reconstruct`` clamp a running_var that the fit
    would make negative, and ``load_cmd_weights`` returns how many values it clamped."""
    shapes = {"conv.weight": (8, 3, 3, 3), "bn.running_var": (8,), "fc.weight": (10, 72)}
    planted = plant(M=3, T=8, noise=1e-3, shapes=shapes)
    states = sorted_states(planted)
    for state in states:
        state["bn.running_var"] = state["bn.running_var"].abs() + 0.1
    model = Holder(states[0])
    cmd = EmbeddedCMD(model, modes=3, warmup=4, samples=300)
    for t, state in enumerate(states):
        model.load_state_dict(state)
        cmd.observe(f"epoch_{t}.safetensors", t)
    spec = next(s for s in cmd.layout.modelled if s.name == "bn.running_var")
    lowered = torch.arange(spec.columns.start, spec.columns.stop)[:3]
    cmd.state.b[lowered] -= 100.0  # far below anything a running variance of this run reaches
    assert (cmd.state.values()[spec.columns] < 0).sum() == 3
    reconstructed = cmd.reconstruct()["bn.running_var"]
    assert (reconstructed >= 0).all() and int((reconstructed == 0).sum()) == 3
    assert cmd.load_cmd_weights() == 3
    assert torch.equal(model.bn.running_var.detach(), reconstructed)
