"""``cmd export``: every family the report scores, written at any position in the source format, against
a direct computation from the checkpoints; ``--best`` of a report; ``--recalibrate``; bad input; and
running variances never written negative by export or reconstruct."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import cmdtool
from cmdtool.checkpoints import write_checkpoint
from cmdtool.export import export, parse_family, trajectory_gram
from cmdtool.fitting import tile_width
from cmdtool.modefile import open_mode_file
from cmdtool.reconstruct import state_dict_at
from cmdtool.report.candidates import FamilyWeights, carried_rows, flat_state
from cmdtool.report.metrics import pca_from_gram
from cmdtool.statistics import Clamped
from cmdtool.stores import open_trajectory_store
from helpers import SHAPES, cmd, error_line, ok, plant, snapshot, write_run

export_module = sys.modules["cmdtool.export"]
reconstruct_module = sys.modules["cmdtool.reconstruct"]  # the package attributes are functions

T = 12
BN_SHAPES = {**SHAPES, "bn.running_var": (8,)}

# Calls of the recalibration function, logged one JSON line each; it sets running_mean to 7.
RECALIBRATE = '''
import json, os


def recalibrate(state):
    with open(os.environ["RECALIBRATE_LOG"], "a") as f:
        f.write(json.dumps({"names": sorted(state), "steps": int(state["bn.num_batches_tracked"]),
                            "fc": float(state["fc.weight"][0, 0])}) + "\\n")
    state["bn.running_mean"].fill_(7.0)
    return state
'''


class Run:
    def __init__(self, folder: Path):
        planted = plant(M=3, T=T, noise=1e-3, seed=3, shapes=BN_SHAPES)
        states = planted.states()
        for state in states:  # a variance: positive
            state["bn.running_var"] = state["bn.running_var"].abs() + 0.1
        self.folder = folder
        self.run = write_run(folder / "run", states)
        self.mode_file, self.store = folder / "modes.cmd.h5", folder / "traj.h5"
        ok(cmd(CliRunner(), "fit", self.run, "-o", self.mode_file, "-m", 3, "--trajectory", self.store))
        self.checkpoints = [load_file(str(self.run / f"epoch_{t}.safetensors")) for t in range(T)]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    return Run(tmp_path_factory.mktemp("export"))


def written(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_tail_5_at_10_is_the_mean_of_checkpoints_6_to_10(run, runner, tmp_path):
    out = tmp_path / "out"
    result = ok(cmd(runner, "export", run.mode_file, "-o", out, "--family", "tail_5", "--at", 10))
    assert result.stdout.split() == [str(out / "epoch_10.safetensors")]
    state = written(out / "epoch_10.safetensors")
    assert list(state) == list(run.checkpoints[10])
    for name, value in state.items():
        if value.is_floating_point():
            window = torch.stack([run.checkpoints[t][name].double() for t in range(6, 11)])
            assert torch.equal(value, window.mean(dim=0).float()), name
        else:  # integer buffers: checkpoint 10's
            assert torch.equal(value, run.checkpoints[10][name]) and value.dtype == torch.int64


def test_original_at_3_is_checkpoint_3_bit_for_bit(run, runner, tmp_path):
    ok(cmd(runner, "export", run.mode_file, "-o", tmp_path, "--family", "original", "--at", 3))
    state, source = written(tmp_path / "epoch_3.safetensors"), run.checkpoints[3]
    assert list(state) == list(source)
    for name in source:
        assert state[name].dtype == source[name].dtype
        assert state[name].numpy().tobytes() == source[name].numpy().tobytes(), name


def test_every_family_matches_the_report_and_reconstruct(run, runner, tmp_path):
    """cmd as cmd reconstruct writes it (same bytes); ema and pca against direct numpy."""
    ok(cmd(runner, "export", run.mode_file, "-o", tmp_path / "cmd", "--family", "cmd", "--at", 4))
    ok(cmd(runner, "reconstruct", run.mode_file, "-o", tmp_path / "rec", "--at", 4))
    assert (tmp_path / "cmd/epoch_4.safetensors").read_bytes() == (tmp_path / "rec/epoch_4.safetensors").read_bytes()
    ok(cmd(runner, "export", run.mode_file, "-o", tmp_path / "ema", "--family", "ema", "--at", 5,
           "--ema-decay", 0.8))
    ema = {name: run.checkpoints[0][name].double() for name in run.checkpoints[0]}
    for t in range(1, 6):
        ema = {name: 0.8 * ema[name] + 0.2 * run.checkpoints[t][name].double() for name in ema}
    state = written(tmp_path / "ema/epoch_5.safetensors")
    for name in ("fc.weight", "bn.running_var"):
        torch.testing.assert_close(state[name], ema[name].float(), rtol=0, atol=1e-6)
    ok(cmd(runner, "export", run.mode_file, "-o", tmp_path / "pca", "--family", "pca_2", "--at", 7,
           "--format", "safetensors"))
    with open_mode_file(run.mode_file) as modes:
        layout = modes.layout
    W = np.stack([np.concatenate([c[s.name].double().numpy().ravel() for s in layout.modelled])
                  for c in run.checkpoints])
    mean = W.mean(axis=0)
    U, S, Vt = np.linalg.svd(W - mean, full_matrices=False)
    direct = mean + (U[:, :2] * S[:2]) @ Vt[:2]
    state = written(tmp_path / "pca/epoch_7.safetensors")
    got = np.concatenate([state[s.name].double().numpy().ravel() for s in layout.modelled])
    np.testing.assert_allclose(got, direct[7].astype(np.float32), atol=2e-6)


def test_best_writes_what_the_report_chose(run, runner, tmp_path):
    """A planted evaluation that picks tail_5 at position 8 on validation: --best writes it."""
    target = np.stack([run.checkpoints[t]["fc.weight"].double().numpy() for t in range(4, 9)]).mean(axis=0)
    np.save(tmp_path / "target.npy", target.astype(np.float32))
    (tmp_path / "pick.py").write_text(f'''
import numpy as np
TARGET = np.load({str(tmp_path / "target.npy")!r})


def evaluate(state):
    hit = float(np.allclose(state["fc.weight"].numpy(), TARGET, rtol=0, atol=1e-7))
    return {{"val": {{"accuracy": 0.5 + 0.4 * hit}}, "test": {{"accuracy": 0.5 + 0.3 * hit}}}}
''')
    ok(cmd(runner, "report", run.mode_file, "-o", tmp_path / "report", "--eval", f"{tmp_path / 'pick.py'}:evaluate",
           "--select", "accuracy"))
    chosen = json.loads((tmp_path / "report/report.json").read_text())["evaluation"]["selection"]
    assert chosen["chosen"] == "tail_5"
    assert next(r for r in chosen["rows"] if r["family"] == "tail_5")["epoch"] == 8
    report_json = tmp_path / "report/report.json"
    result = ok(cmd(runner, "export", run.mode_file, "-o", tmp_path / "best", "--best", report_json))
    assert "wrote tail_5 at position 8" in result.stderr
    ok(cmd(runner, "export", run.mode_file, "-o", tmp_path / "direct", "--family", "tail_5", "--at", 8))
    best = (tmp_path / "best/epoch_8.safetensors").read_bytes()
    assert best == (tmp_path / "direct/epoch_8.safetensors").read_bytes()
    np.testing.assert_allclose(written(tmp_path / "best/epoch_8.safetensors")["fc.weight"].numpy(), target, atol=1e-7)


def test_recalibration_is_called_once_per_export_with_the_model_state(run, runner, tmp_path, monkeypatch):
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("RECALIBRATE_LOG", str(log))
    (tmp_path / "recal.py").write_text(RECALIBRATE)
    ok(cmd(runner, "export", run.mode_file, "-o", tmp_path / "out", "--family", "tail_3", "--at", "2,9",
           "--recalibrate", f"{tmp_path / 'recal.py'}:recalibrate"))
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["steps"] for c in calls] == [200, 900]  # once per checkpoint written, with its integer buffers
    assert all(c["names"] == sorted(run.checkpoints[0]) for c in calls)
    for call, t in zip(calls, (2, 9)):
        expected = np.mean([float(run.checkpoints[s]["fc.weight"][0, 0]) for s in range(t - 2, t + 1)])
        assert call["fc"] == pytest.approx(expected, abs=1e-6)  # the averaged weights, before they are written
        state = written(tmp_path / f"out/epoch_{t}.safetensors")
        assert torch.equal(state["bn.running_mean"], torch.full((8,), 7.0))  # what the function made is written

    seen = []

    def recalibrate(state):  # the Python API: a function, returning None after changing the state in place
        seen.append(int(state["bn.num_batches_tracked"]))
        state["bn.running_mean"].zero_()

    result = export(run.mode_file, tmp_path / "api", family="ema", at=6, recalibrate=recalibrate)
    assert seen == [600] and result.positions == [6]
    assert torch.equal(written(result.paths[0])["bn.running_mean"], torch.zeros(8))


def test_a_recalibration_that_prints_and_changes_folder_is_contained(run, runner, tmp_path, monkeypatch):
    """As --eval: what the function prints goes to stderr (stdout keeps only the written paths), and its
    os.chdir does not move where the second file is written."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "recal.py").write_text(f"import os\n\ndef recalibrate(state):\n    print('recalibrating')\n"
                                       f"    os.chdir({str(elsewhere)!r})\n")
    monkeypatch.chdir(tmp_path)
    result = ok(cmd(runner, "export", run.mode_file, "-o", "out", "--family", "tail_3", "--at", "2,9",
                    "--recalibrate", "recal.py:recalibrate"))
    assert result.stdout.splitlines() == [str(Path("out/epoch_2.safetensors")), str(Path("out/epoch_9.safetensors"))]
    assert result.stderr.count("recalibrating") == 2
    assert Path.cwd() == tmp_path
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["epoch_2.safetensors", "epoch_9.safetensors"]
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--family", "tail_0"], "--family 'tail_0': expected one of original, cmd, tail_K (K ≥ 1), ema, pca_1, pca_2"),
    (["--family", "swa"], "--family 'swa': expected one of original, cmd, tail_K (K ≥ 1), ema, pca_1, pca_2"),
    (["--family", "ema", "--at", "12"], "--at '12': position 12 is out of range (the mode file has 12 checkpoints, "
                                        "0..11)"),
    (["--family", "ema", "--at", "five"], "--at 'five': expected last, first, all or positions like 0,5,-1"),
    ([], "pass one of --family (with --at), --best or --from-landscape"),
])
def test_bad_family_or_position_is_one_error_line(run, runner, tmp_path, args, message):
    assert error_line(cmd(runner, "export", run.mode_file, "-o", tmp_path / "out", *args)) == message
    assert not (tmp_path / "out").exists()


def test_bad_report_is_one_error_line(run, runner, tmp_path):
    before = snapshot(run.folder)
    missing = tmp_path / "report.json"
    assert error_line(cmd(runner, "export", run.mode_file, "-o", tmp_path / "out", "--best", missing)) == (
        f"{missing}: no such report file (report.json of `cmd report`)")
    missing.write_text("{not json")
    assert error_line(cmd(runner, "export", run.mode_file, "-o", tmp_path / "out", "--best", missing)) == (
        f"{missing}: not a readable JSON report (JSONDecodeError)")
    ok(cmd(runner, "report", run.mode_file, "-o", tmp_path / "plain"))
    plain = tmp_path / "plain/report.json"
    assert error_line(cmd(runner, "export", run.mode_file, "-o", tmp_path / "out", "--best", plain)) == (
        f"{plain}: the report chose nothing on validation (it needs --eval, --select and a validation split)")
    forged = json.loads(plain.read_text())
    forged["evaluation"] = {"selection": {"chosen": "cmd", "rows": [{"family": "cmd", "epoch": 3,
                                                                    "checkpoint": "epoch_4.safetensors"}]}}
    plain.write_text(json.dumps(forged))
    assert error_line(cmd(runner, "export", run.mode_file, "-o", tmp_path / "out", "--best", plain)) == (
        f"{plain}: chose 'epoch_4.safetensors' at position 3, which is not a checkpoint of {run.mode_file} there "
        "(a report of another run?)")
    assert not (tmp_path / "out").exists() and snapshot(run.folder) == before


def negative_running_var(run, folder: Path) -> tuple[Path, int]:
    """A copy of the mode file whose running_var reconstruction dips below zero: ``b`` lowered by 10
    on three of its columns (a running_var moves far less than that)."""
    copy = folder / "negative.cmd.h5"
    copy.write_bytes(run.mode_file.read_bytes())
    with open_mode_file(copy) as modes:
        spec = next(s for s in modes.layout.modelled if s.name == "bn.running_var")
        columns = np.arange(spec.columns.start, spec.columns.stop)[:3]
    with h5py.File(copy, "r+") as f:
        b = f["b"][()]
        b[columns] -= 10
        f["b"][...] = b
    return copy, len(columns)


@pytest.mark.parametrize("write_format", ["source", "safetensors"])
def test_running_var_is_never_written_negative(run, runner, tmp_path, write_format):
    mode_file, n = negative_running_var(run, tmp_path)
    result = ok(cmd(runner, "reconstruct", mode_file, "-o", tmp_path / "rec", "--at", "0,5", "--format", write_format))
    assert f"note: {2 * n} negative running-variance values clamped to 0 in the checkpoints written (bn.running_var)" \
        in result.stderr
    for t in (0, 5):
        value = written(tmp_path / f"rec/epoch_{t}.safetensors")["bn.running_var"]
        assert (value >= 0).all() and int((value == 0).sum()) == n
    result = ok(cmd(runner, "export", mode_file, "-o", tmp_path / "exp", "--family", "cmd", "--at", 5))
    assert f"note: {n} negative running-variance values clamped to 0" in result.stderr
    value = written(tmp_path / "exp/epoch_5.safetensors")["bn.running_var"]
    assert torch.equal(value, written(tmp_path / "rec/epoch_5.safetensors")["bn.running_var"])
    # the report's candidates: clamped, counted in report.json
    lowest = tmp_path / "var.py"
    lowest.write_text("def evaluate(state):\n    return {'low': float(state['bn.running_var'].min())}\n")
    result = ok(cmd(runner, "report", mode_file, "-o", tmp_path / "report", "--eval", f"{lowest}:evaluate",
                    "--candidates-only"))
    evaluation = json.loads((tmp_path / "report/report.json").read_text())["evaluation"]
    assert evaluation["clamped_running_var"]["families"]["cmd"] == {"total": n, "tensors": {"bn.running_var": n}}
    assert evaluation["candidates"]["cmd"]["low"] == 0.0
    assert f"note: {evaluation['clamped_running_var']['total']} negative running-variance values clamped" \
        in result.stderr


# --------------------------------------------------------------------------- streamed = what was written before


def _dtype_run(folder: Path, dtypes: str) -> tuple[Path, Path]:
    """A fitted run whose floating-point tensors are ``dtypes`` (or a mix of four), with a running
    variance near 0 that some checkpoints have negative (every family clamps it)."""
    states = []
    for state in plant(M=3, T=T, noise=1e-3, seed=5, shapes=BN_SHAPES).states():
        state["bn.running_var"] = state["bn.running_var"] * 0.01
        if dtypes == "mixed":
            state.update({"conv.weight": state["conv.weight"].half(), "fc.weight": state["fc.weight"].bfloat16(),
                          "bn.weight": state["bn.weight"].double()})
        else:
            state = {n: v.to(getattr(torch, dtypes)) if v.is_floating_point() else v for n, v in state.items()}
        states.append(state)
    run = write_run(folder / "run", states, fmt="torch" if dtypes == "float64" else "safetensors")
    cmdtool.fit(run, folder / "m.cmd.h5", modes=3, trajectory=folder / "t.h5")
    return folder / "m.cmd.h5", folder / "t.h5"


def _states_before(mode_file: Path, store_path: Path, family: str, positions: list[int], ema_decay: float):
    """The state dicts ``cmd export`` built before it streamed (all N at once): ``FamilyWeights`` and
    ``flat_state`` of ``report.candidates``, or ``state_dict_at`` for cmd. For pca_d, whose sum
    ``mean + Σ U[t, k]·directions[k]`` was formed by BLAS (which may fuse a multiply and an add), the
    same terms added one by one, as the export now does (and checked equal to rounding)."""
    clamped = Clamped()
    with open_mode_file(mode_file) as modes:
        if family == "cmd":
            return [state_dict_at(modes, t, clamped=clamped) for t in positions], clamped
        store = open_trajectory_store(store_path)
        kind, k = parse_family(family)
        pca = None
        if kind.startswith("pca"):
            gram = np.zeros((T, T))
            for _, _, block in store.tiles(tile_width(T)):
                X = block.astype(np.float64)
                X = X - X[0]
                X -= X.mean(axis=0)
                gram += X @ X.T
            assert np.array_equal(gram, trajectory_gram(store))
            pca = pca_from_gram(gram)
        weights = FamilyWeights(store.W, [k] if k else [], ema_decay, pca)
        carried, states = carried_rows(modes, store), []
        for t in positions:
            flat = weights.at(t)[family]
            if pca is not None:
                combination = np.zeros(flat.shape)
                for j, u in enumerate(pca.eigenvectors[t, :int(family[4:])]):
                    combination += u * weights.directions[j]
                np.testing.assert_allclose(weights.mean + combination, flat, rtol=1e-13, atol=1e-13)
                flat = weights.mean + combination
            states.append(flat_state(modes, carried, flat, t, clamped))
        return states, clamped


FAMILIES = ["original", "cmd", "tail_3", "tail_20", "ema", "pca_1", "pca_2"]


@pytest.mark.parametrize("dtypes", ["bfloat16", "float16", "float32", "mixed", "float64"])
def test_every_family_is_written_as_before(tmp_path, monkeypatch, dtypes):
    """Every family at every position (in groups of 5 files, blocks of a few columns) is byte for
    byte ``save_file`` of the state dict the export built before (float64: a torch file, whose
    tensors are compared), with the same running variances clamped; in runs of bfloat16 (the store
    keeps 16 bits), float16, float32, float64 and a mix."""
    monkeypatch.setattr(export_module, "BLOCK_BYTES", 8 * 7 * 30)
    monkeypatch.setattr(reconstruct_module, "GROUP_FILES", 5)
    mode_file, store = _dtype_run(tmp_path, dtypes)
    with open_mode_file(mode_file) as modes:
        names, metadata = modes.names, [info.metadata for info in modes.infos]
    for family in FAMILIES:
        out = tmp_path / family
        result = export(mode_file, out, family=family, at="all", ema_decay=0.8)
        before, clamped = _states_before(mode_file, store, family, list(range(T)), 0.8)
        assert result.clamped.counts == clamped.counts and clamped.total > 0, family
        for t, state in enumerate(before):
            if dtypes == "float64":
                got = torch.load(out / names[t], weights_only=True)
                assert list(got) == list(state) and all(torch.equal(got[n], state[n]) for n in state), (family, t)
                continue
            save_file(state, str(tmp_path / "expected.safetensors"), metadata=metadata[t])
            assert (out / names[t]).read_bytes() == (tmp_path / "expected.safetensors").read_bytes(), (family, t)


def test_positions_apart_and_plain_safetensors_are_written_as_before(tmp_path, monkeypatch):
    """Positions far apart (a tail window, an EMA from 0), one at a time and together, and
    ``--format safetensors`` of a torch run: the same tensors as the state dicts built before."""
    monkeypatch.setattr(export_module, "BLOCK_BYTES", 8 * 7 * 30)
    mode_file, store = _dtype_run(tmp_path, "float64")
    with open_mode_file(mode_file) as modes:
        stems = [name.removesuffix(".pt") for name in modes.names]
    for family in ("tail_3", "ema", "pca_2"):
        for at in ("1,9", "9", "0"):
            positions = [int(p) for p in at.split(",")]
            out = tmp_path / f"{family}-{at}"
            export(mode_file, out, family=family, at=at, ema_decay=0.8, format="safetensors")
            before, _ = _states_before(mode_file, store, family, positions, 0.8)
            for t, state in zip(positions, before):
                got = load_file(str(out / f"{stems[t]}.safetensors"))
                assert list(got) == sorted(state) and all(torch.equal(got[n], state[n]) for n in state), (family, t)


def _huggingface_run(folder: Path, dtype: torch.dtype) -> Path:
    """``checkpoint-<t>/`` folders of two weight files, an index and a config.json, as ``save_pretrained`` writes."""
    for t, state in enumerate(plant(M=3, T=T, noise=1e-3, seed=6, shapes=BN_SHAPES).states(dtype=dtype)):
        checkpoint = folder / f"checkpoint-{t}"
        checkpoint.mkdir(parents=True)
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
        for file_name, part in shards.items():
            save_file({name: state[name] for name in part}, str(checkpoint / file_name), metadata={"format": "pt"})
        weight_map = {name: file_name for file_name, part in shards.items() for name in part}
        (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1},
                                                                             "weight_map": weight_map}))
        (checkpoint / "config.json").write_text('{"model_type": "planted"}')
    return folder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_huggingface_folders_are_written_as_before(tmp_path, monkeypatch, dtype):
    """Hugging Face folders of safetensors weight files are written tensor by tensor too: every
    file of every folder (weight files, index, config.json) is what ``write_checkpoint`` of the
    state dict built before writes, for reconstruct (in groups of 5) and the export's families."""
    monkeypatch.setattr(export_module, "BLOCK_BYTES", 8 * 7 * 30)
    monkeypatch.setattr(reconstruct_module, "GROUP_FILES", 5)
    for weights in (reconstruct_module.Reconstruction, export_module.TrajectoryFamily):
        monkeypatch.setattr(weights, "state", None)  # no state dict is built
    run = _huggingface_run(tmp_path / "run", dtype)
    mode_file, store = tmp_path / "m.cmd.h5", tmp_path / "t.h5"
    cmdtool.fit(run, mode_file, modes=3, trajectory=store)

    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    with open_mode_file(mode_file) as modes:
        assert modes.infos[0].is_folder and len(modes.infos[0].shards) == 2
        cmdtool.reconstruct_checkpoints(mode_file, tmp_path / "rec", "all")
        (tmp_path / "before").mkdir()
        for t in range(T):
            write_checkpoint(tmp_path / "before" / modes.names[t], state_dict_at(modes, t), modes.infos[t],
                             modes.attachment)
        assert files(tmp_path / "rec") == files(tmp_path / "before")
        for family in ("original", "tail_3", "ema", "pca_2"):
            export(mode_file, tmp_path / family, family=family, at="0,7,11")
            before, _ = _states_before(mode_file, store, family, [0, 7, 11], 0.9)
            (tmp_path / f"{family}-before").mkdir()
            for t, state in zip([0, 7, 11], before):
                write_checkpoint(tmp_path / f"{family}-before" / modes.names[t], state, modes.infos[t],
                                 modes.attachment)
            assert files(tmp_path / family) == files(tmp_path / f"{family}-before"), family
