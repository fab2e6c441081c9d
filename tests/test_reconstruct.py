"""cmdtool/reconstruct.py: mode file -> state dicts and checkpoint files in the source format.

Driven through the CLI (``cmd fit`` / ``cmd reconstruct``) and the library (``cmdtool.fit``,
``cmdtool.reconstruct``, ``cmdtool.reconstruct.parse_at``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import cmdtool
from cmdtool.cli import app
from cmdtool.errors import CmdError
from cmdtool.modefile import open_mode_file
from cmdtool.reconstruct import parse_at, state_dict_at
from helpers import SHAPES, write_run

EPS32 = 2.0 ** -23  # float32 machine epsilon


# --------------------------------------------------------------------------- helpers


def fit_cli(runner, run: Path, tmp_path: Path, *extra: str, name: str = "m.cmd.h5") -> Path:
    mode_file = tmp_path / name
    result = runner.invoke(app, ["fit", str(run), "-o", str(mode_file), "--trajectory",
                                 str(tmp_path / f"{name}.traj.h5"), "-m", "3", *extra])
    assert result.exit_code == 0, result.output
    assert mode_file.is_file()
    return mode_file


def reconstruct_cli(runner, mode_file: Path, out: Path, at: str = "all", *extra: str):
    return runner.invoke(app, ["reconstruct", str(mode_file), "-o", str(out), "--at", at, *extra])


def written_paths(result) -> list[Path]:
    return [Path(line) for line in result.stdout.splitlines() if line.strip()]


def source_files(run: Path) -> list[Path]:
    return sorted((p for p in run.iterdir() if p.is_file()), key=lambda p: int(p.stem.split("_")[-1]))


def load_checkpoint(path: Path):
    """(state dict, the whole loaded object or None for safetensors, safetensors metadata)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        return load_file(str(path)), None, metadata
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, obj, None
    return obj["state_dict"], obj, None


def no_tmp_files(folder: Path) -> bool:
    return not [n for n in os.listdir(folder) if n.endswith(".tmp") or ".tmp" in n]


def assert_same_structure(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].shape == tensor.shape, name
        assert actual[name].dtype == tensor.dtype, name


def max_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max())


# --------------------------------------------------------------------------- parse_at


def test_parse_at_words_and_positions():
    assert parse_at("0,-1", 5) == [0, 4]
    assert parse_at("first", 5) == [0]
    assert parse_at("last", 5) == [4]
    assert parse_at(" last ", 5) == [4]
    assert parse_at("all", 5) == [0, 1, 2, 3, 4]
    assert parse_at("0,5,-1", 20) == [0, 5, 19]
    assert parse_at("-1,0", 20) == [0, 19]           # sorted
    assert parse_at("3,3,-17", 20) == [3]             # duplicates (also via negatives) collapse
    assert parse_at("-5", 5) == [0]
    assert parse_at("4", 5) == [4]


@pytest.mark.parametrize("at", ["5", "-6", "0,5", "latest", "", "1.5", "0;1"])
def test_parse_at_refuses(at):
    """The library names its parameter (``at``); the CLI says ``--at`` (tests/test_errors.py)."""
    with pytest.raises(CmdError, match=f"^at {at!r}: ") as raised:
        parse_at(at, 5)
    assert raised.value.parameter == "at"


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt,wrapper", [("safetensors", None), ("torch", None), ("torch", "state_dict")])
def test_reconstruct_all_round_trip(runner, tmp_path, planted, fmt, wrapper):
    states = planted.states()
    run = write_run(tmp_path / "run", states, fmt=fmt, wrapper=wrapper)
    mode_file = fit_cli(runner, run, tmp_path)
    out = tmp_path / "out"
    result = reconstruct_cli(runner, mode_file, out, "all")
    assert result.exit_code == 0, result.output

    sources = source_files(run)
    assert len(sources) == 20
    assert written_paths(result) == [out / p.name for p in sources]
    assert sorted(os.listdir(out)) == sorted(p.name for p in sources)
    assert no_tmp_files(out)

    for t, source_path in enumerate(sources):
        rec, rec_obj, rec_meta = load_checkpoint(out / source_path.name)
        src, src_obj, src_meta = load_checkpoint(source_path)
        assert_same_structure(rec, src)
        assert torch.equal(rec["bn.num_batches_tracked"], src["bn.num_batches_tracked"])
        assert int(rec["bn.num_batches_tracked"]) == 100 * t
        for name in SHAPES:
            # the planted run is a·r + b + 1e-4 noise: the model must be close, not just well-shaped
            assert max_abs_error(rec[name], src[name]) < 2e-3, (name, t)
        if fmt == "safetensors":
            assert rec_meta == {"epoch": str(t)}
        elif wrapper:
            assert set(rec_obj) == {"state_dict", "epoch"}        # optimizer dropped
            assert rec_obj["epoch"] == t and isinstance(rec_obj["epoch"], int)
        else:
            assert set(rec_obj) == set(src)                       # plain state dict, no wrapper
    if fmt == "torch" and wrapper:
        assert "optimizer" in result.stderr
    else:
        assert "not restored" not in result.stderr


def test_reconstruct_matches_library_state_dict(runner, tmp_path, run_dir):
    mode_file = fit_cli(runner, run_dir, tmp_path)
    out = tmp_path / "out"
    assert reconstruct_cli(runner, mode_file, out, "0,7,-1").exit_code == 0
    for t in (0, 7, 19):
        from_file = load_file(str(out / f"epoch_{t}.safetensors"))
        from_api = cmdtool.reconstruct(mode_file, at=t)
        assert set(from_file) == set(from_api)
        for name in from_api:
            assert torch.equal(from_file[name], from_api[name]), (name, t)
    last = cmdtool.reconstruct(mode_file, at="last")
    for name, tensor in cmdtool.reconstruct(mode_file, at=-1).items():
        assert torch.equal(tensor, last[name])
    first = cmdtool.reconstruct(mode_file, at="first")
    assert torch.equal(first["conv.weight"], cmdtool.reconstruct(mode_file, at=0)["conv.weight"])
    assert not torch.equal(first["conv.weight"], last["conv.weight"])


def test_library_reconstruct_refuses_several_positions(tmp_path, run_dir):
    mode_file = tmp_path / "m.cmd.h5"
    cmdtool.fit(run_dir, mode_file, modes=3, trajectory=tmp_path / "traj.h5")
    with pytest.raises(CmdError):
        cmdtool.reconstruct(mode_file, at="all")
    with pytest.raises(CmdError):
        cmdtool.reconstruct(mode_file, at="0,1")
    with pytest.raises(CmdError, match="out of range"):
        cmdtool.reconstruct(mode_file, at=20)


# --------------------------------------------------------------------------- dtypes


def mixed(states: list[dict]) -> list[dict]:
    out = []
    for state in states:
        s = dict(state)
        s["conv.weight"] = s["conv.weight"].to(torch.float16)
        s["fc.weight"] = s["fc.weight"].to(torch.bfloat16)
        s["bn.weight"] = s["bn.weight"].to(torch.float64)
        out.append(s)
    return out


def bf16_mixed(planted) -> list[dict]:
    out = []
    for state in planted.states(dtype=torch.bfloat16):
        s = dict(state)
        s["conv.bias"] = s["conv.bias"].to(torch.float16)
        s["fc.bias"] = s["fc.bias"].to(torch.float64)
        out.append(s)
    return out


# worst representation step of a value |w| < ~5 in each dtype, plus the planted noise
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 6e-2, torch.float32: 2e-3, torch.float64: 2e-3}


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("make", [mixed, "bf16"])
def test_mixed_dtypes_written_back_in_source_dtype(runner, tmp_path, planted, fmt, make):
    states = bf16_mixed(planted) if make == "bf16" else make(planted.states())
    run = write_run(tmp_path / "run", states, fmt=fmt)
    mode_file = fit_cli(runner, run, tmp_path)
    out = tmp_path / "out"
    result = reconstruct_cli(runner, mode_file, out, "all")
    assert result.exit_code == 0, result.output
    sources = source_files(run)
    dtypes_seen = set()
    for t, source_path in enumerate(sources):
        rec, _, _ = load_checkpoint(out / source_path.name)
        src = states[t]
        assert_same_structure(rec, src)
        for name, tensor in src.items():
            dtypes_seen.add(tensor.dtype)
            assert rec[name].dtype == tensor.dtype, name
            if tensor.dtype.is_floating_point:
                # in the bf16 run every value went through bfloat16 first, whatever its dtype now
                tolerance = TOLERANCE[torch.bfloat16] if make == "bf16" else TOLERANCE[tensor.dtype]
                assert max_abs_error(rec[name], tensor) < tolerance, (name, t, tensor.dtype)
            else:
                assert torch.equal(rec[name], tensor)
    assert {torch.float16, torch.bfloat16, torch.float64, torch.int64} <= dtypes_seen


def test_library_state_dict_dtypes(tmp_path, planted):
    states = mixed(planted.states())
    run = write_run(tmp_path / "run", states)
    mode_file = tmp_path / "m.cmd.h5"
    cmdtool.fit(run, mode_file, modes=3, trajectory=tmp_path / "traj.h5")
    state = cmdtool.reconstruct(mode_file, at=3)
    assert {name: (tuple(t.shape), t.dtype) for name, t in state.items()} == \
        {name: (tuple(t.shape), t.dtype) for name, t in states[3].items()}


# --------------------------------------------------------------------------- include / exclude


@pytest.mark.parametrize("options,carried", [
    (["--exclude", "fc.*"], {"fc.weight", "fc.bias"}),
    (["--include", "conv.*"], {"fc.weight", "fc.bias", "bn.weight", "bn.running_mean"}),
    (["--include", "*weight", "--exclude", "bn.*"], {"conv.bias", "fc.bias", "bn.weight", "bn.running_mean"}),
])
def test_excluded_tensors_are_carried_verbatim(runner, tmp_path, planted, options, carried):
    states = planted.states()
    states = [dict(s, **{"fc.bias": s["fc.bias"].to(torch.bfloat16)}) for s in states]  # a carried bf16 too
    run = write_run(tmp_path / "run", states)
    mode_file = fit_cli(runner, run, tmp_path, *options)
    with open_mode_file(mode_file) as modes:
        assert {spec.name for spec in modes.layout.carried} == carried | {"bn.num_batches_tracked"}
        assert modes.N == sum(int(np.prod(shape)) for name, shape in SHAPES.items() if name not in carried)
    out = tmp_path / "out"
    assert reconstruct_cli(runner, mode_file, out, "all").exit_code == 0
    for t, state in enumerate(states):
        rec = load_file(str(out / f"epoch_{t}.safetensors"))
        assert_same_structure(rec, state)
        for name in carried | {"bn.num_batches_tracked"}:
            assert torch.equal(rec[name], state[name]), (name, t)
        for name in set(SHAPES) - carried:
            # modelled: close to the source, and (noise) not bit-identical — so the check above means something
            assert max_abs_error(rec[name], state[name]) < 2e-3, (name, t)
    modelled = sorted(set(SHAPES) - carried)
    assert any(not torch.equal(load_file(str(out / f"epoch_{t}.safetensors"))[name], states[t][name])
               for t in range(len(states)) for name in modelled)


# --------------------------------------------------------------------------- --at on the command line


@pytest.mark.parametrize("at,expected", [("first", [0]), ("last", [19]), ("0,5,-1", [0, 5, 19]),
                                         ("-2,3", [3, 18])])
def test_at_selects_exactly_those_files(runner, tmp_path, run_dir, at, expected):
    mode_file = fit_cli(runner, run_dir, tmp_path)
    out = tmp_path / "out"
    result = reconstruct_cli(runner, mode_file, out, at)
    assert result.exit_code == 0, result.output
    names = [f"epoch_{t}.safetensors" for t in expected]
    assert written_paths(result) == [out / n for n in names]
    assert sorted(os.listdir(out)) == sorted(names)


def test_default_at_is_last(runner, tmp_path, run_dir):
    mode_file = fit_cli(runner, run_dir, tmp_path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["reconstruct", str(mode_file), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert os.listdir(out) == ["epoch_19.safetensors"]


@pytest.mark.parametrize("at", ["20", "-21", "latest", "1,x"])
def test_bad_at_exits_2_and_writes_nothing(runner, tmp_path, run_dir, at):
    mode_file = fit_cli(runner, run_dir, tmp_path)
    out = tmp_path / "out"
    result = reconstruct_cli(runner, mode_file, out, at)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "--at" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
    assert not out.exists()


# --------------------------------------------------------------------------- exactness


def constant_run(planted) -> list[dict]:
    """The planted run with ``bn.running_mean`` (float32) and ``fc.bias`` (float64) frozen."""
    states = planted.states()
    frozen_mean = states[0]["bn.running_mean"].clone()
    frozen_bias = (states[0]["fc.bias"].double() + 1e-9 * torch.arange(10)).clone()  # not float32-representable
    return [dict(s, **{"bn.running_mean": frozen_mean.clone(), "fc.bias": frozen_bias.clone()}) for s in states]


def test_constant_tensors_reconstruct_exactly(runner, tmp_path, planted):
    states = constant_run(planted)
    run = write_run(tmp_path / "run", states)
    mode_file = fit_cli(runner, run, tmp_path)
    with open_mode_file(mode_file) as modes:
        spec = next(s for s in modes.layout.tensors if s.name == "bn.running_mean")
        assert spec.modelled                                   # modelled, not carried, and still exact
        _, a, _ = modes.parameters(spec.columns)
        assert np.all(a == 0)
    out = tmp_path / "out"
    assert reconstruct_cli(runner, mode_file, out, "all").exit_code == 0
    for t, state in enumerate(states):
        rec = load_file(str(out / f"epoch_{t}.safetensors"))
        assert rec["bn.running_mean"].dtype == torch.float32
        assert torch.equal(rec["bn.running_mean"], state["bn.running_mean"]), t     # bit for bit
        # float64 source: exact up to the float32 rounding of the trajectory store
        assert rec["fc.bias"].dtype == torch.float64
        assert torch.equal(rec["fc.bias"], state["fc.bias"].to(torch.float32).to(torch.float64)), t
        api = cmdtool.reconstruct(mode_file, at=t)
        assert torch.equal(api["bn.running_mean"], state["bn.running_mean"])


def test_reference_parameters_reconstruct_to_float32_rounding(tmp_path, planted):
    states = planted.states()
    run = write_run(tmp_path / "run", states)
    mode_file = tmp_path / "m.cmd.h5"
    cmdtool.fit(run, mode_file, modes=3, trajectory=tmp_path / "traj.h5")
    with open_mode_file(mode_file) as modes:
        assert modes.M == 3
        reference_index = [int(c) for c in modes.reference_index]
        located = [modes.layout.locate(c) for c in reference_index]
        labels, a, b = modes.parameters()[0], modes.parameters()[1], modes.parameters()[2]
        references = modes.references.astype(np.float64)
        reconstructions = [state_dict_at(modes, t) for t in range(modes.T)]
    assert len(set(reference_index)) == 3
    for m, (column, (name, index)) in enumerate(zip(reference_index, located)):
        assert labels[column] == m, "a reference parameter belongs to its own mode"
        # float32 rounding of a, b, the reference and the result: a few ulps of the terms summed
        atol = 4 * EPS32 * (abs(float(a[column])) * np.abs(references[m]).max() + abs(float(b[column])))
        assert atol < 1e-5  # far below the planted noise (1e-4): a fitted, non-exact value would fail
        for t in range(len(states)):
            source = float(states[t][name][index])
            rebuilt = float(reconstructions[t][name][index])
            assert abs(rebuilt - source) <= atol, (m, name, index, t, rebuilt, source)
        # ... whereas an ordinary member of the same mode carries the noise
    errors = [
        max(
            abs(float(reconstructions[t]["fc.weight"].reshape(-1)[i]) - float(states[t]["fc.weight"].reshape(-1)[i]))
            for t in range(len(states))
        )
        for i in range(50)
    ]
    assert max(errors) > 1e-5


# --------------------------------------------------------------------------- load_state_dict


class Tiny(nn.Module):
    """A model whose state-dict names and shapes match the planted run."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.Module()
        self.bn.weight = nn.Parameter(torch.ones(8))
        self.bn.register_buffer("running_mean", torch.zeros(8))
        self.bn.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.fc = nn.Linear(72, 10)


@pytest.mark.parametrize("fmt,wrapper", [("safetensors", None), ("torch", "state_dict")])
def test_reconstructed_state_dict_loads_strict(tmp_path, planted, fmt, wrapper):
    states = planted.states()
    run = write_run(tmp_path / "run", states, fmt=fmt, wrapper=wrapper)
    mode_file = tmp_path / "m.cmd.h5"
    cmdtool.fit(run, mode_file, modes=3, trajectory=tmp_path / "traj.h5")
    state = cmdtool.reconstruct(mode_file, at=-1)
    model = Tiny()
    assert set(model.state_dict()) == set(state)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.fc.weight.detach(), state["fc.weight"])
    assert int(model.bn.num_batches_tracked) == 100 * 19
    assert max_abs_error(model.conv.weight.detach(), states[-1]["conv.weight"]) < 2e-3


# --------------------------------------------------------------------------- overwriting


def test_refuses_to_overwrite_without_force(runner, tmp_path, run_dir):
    mode_file = fit_cli(runner, run_dir, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    sentinel = out / "epoch_5.safetensors"
    sentinel.write_bytes(b"sentinel")
    (out / "unrelated.txt").write_text("keep me")

    result = reconstruct_cli(runner, mode_file, out, "all")
    assert result.exit_code == 2
    assert "epoch_5.safetensors" in result.stderr and "--force" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sentinel.read_bytes() == b"sentinel"
    assert sorted(os.listdir(out)) == ["epoch_5.safetensors", "unrelated.txt"]  # nothing partial

    # positions that do not collide are fine
    ok = reconstruct_cli(runner, mode_file, out, "0,-1")
    assert ok.exit_code == 0, ok.output
    assert sentinel.read_bytes() == b"sentinel"

    forced = reconstruct_cli(runner, mode_file, out, "all", "--force")
    assert forced.exit_code == 0, forced.output
    assert sorted(os.listdir(out)) == sorted([f"epoch_{t}.safetensors" for t in range(20)] + ["unrelated.txt"])
    assert no_tmp_files(out)
    assert (out / "unrelated.txt").read_text() == "keep me"
    rebuilt = load_file(str(sentinel))
    assert torch.equal(rebuilt["conv.weight"], cmdtool.reconstruct(mode_file, at=5)["conv.weight"])

    again = reconstruct_cli(runner, mode_file, out, "last")
    assert again.exit_code == 2
    assert no_tmp_files(out)


def test_output_is_a_file_or_target_is_a_directory(runner, tmp_path, run_dir):
    mode_file = fit_cli(runner, run_dir, tmp_path)
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    result = reconstruct_cli(runner, mode_file, not_a_folder, "last")
    assert result.exit_code == 2 and "file.txt" in result.stderr
    assert not_a_folder.read_text() == "x"
    out = tmp_path / "out"
    (out / "epoch_19.safetensors").mkdir(parents=True)
    result = reconstruct_cli(runner, mode_file, out, "last", "--force")
    assert result.exit_code == 2 and "is a directory" in result.stderr
    assert no_tmp_files(out)


def test_missing_mode_file_exits_2(runner, tmp_path):
    out = tmp_path / "out"
    result = reconstruct_cli(runner, tmp_path / "nope.cmd.h5", out, "last")
    assert result.exit_code == 2
    assert "nope.cmd.h5" in result.stderr
    assert not out.exists()


def test_reconstruct_leaves_source_untouched_into_same_names(runner, tmp_path, planted):
    """Written under the source names, but in another folder: the source run is never touched."""
    states = planted.states()
    run = write_run(tmp_path / "run", states, fmt="torch", wrapper="state_dict")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    mode_file = fit_cli(runner, run, tmp_path)
    refused = reconstruct_cli(runner, mode_file, run, "last")
    assert refused.exit_code == 2
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_failure_mid_write_leaves_nothing(tmp_path, run_dir, monkeypatch):
    """A write that fails on the third file leaves neither finished targets nor temporary files."""
    import sys

    reconstruct_module = sys.modules["cmdtool.reconstruct"]  # the package attribute is the function
    mode_file = tmp_path / "m.cmd.h5"
    cmdtool.fit(run_dir, mode_file, modes=3, trajectory=tmp_path / "traj.h5")
    real_write, calls = reconstruct_module.write_checkpoint, []

    def failing_write(path, state, info, *attachments, **shown):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(path))
        real_write(path, state, info, *attachments, **shown)

    monkeypatch.setattr(reconstruct_module, "write_checkpoint", failing_write)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        cmdtool.reconstruct_checkpoints(mode_file, out, "all")
    assert len(calls) == 3
    assert all(p.parent == out and p.name.startswith(".") for p in calls)  # temporary names
    assert not out.exists()  # the run created the folder, and removes it with the rest


@pytest.mark.parametrize("dtypes", ["float16", "bfloat16", "float32", "mixed"])
def test_safetensors_written_without_torch_are_the_same_bytes(tmp_path, planted, dtypes):
    """A safetensors run is written tensor by tensor from numpy arrays (no torch import, no state
    dict): the files must be byte for byte what ``save_file`` of the torch state dict gives (what
    was written before, bfloat16 and float32; float16 was rounded once by numpy, see
    ``safetensors_writer.cast``), carried int64 included, in runs of one dtype and mixed ones."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    if dtypes == "mixed":
        states = [dict(s, **{"conv.weight": s["conv.weight"].to(torch.float16),
                             "fc.weight": s["fc.weight"].to(torch.bfloat16)}) for s in planted.states()]
    else:
        states = planted.states(dtype=getattr(torch, dtypes))
    run = write_run(tmp_path / "run", states)
    cmdtool.fit(run, tmp_path / "m.cmd.h5", modes=3, trajectory=tmp_path / "t.h5")
    code = (
        "import sys, cmdtool; cmdtool.reconstruct_checkpoints(sys.argv[1], sys.argv[2], at='0,-1'); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m.cmd.h5"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["False"]
    with open_mode_file(tmp_path / "m.cmd.h5") as modes:
        assert {spec.dtype for spec in modes.layout.tensors} >= ({dtypes} if dtypes != "mixed" else
                                                                 {"float16", "bfloat16", "float32"})
        for index in (0, modes.T - 1):
            expected = tmp_path / f"expected_{index}.safetensors"
            save_file(state_dict_at(modes, index), str(expected), metadata=modes.infos[index].metadata)
            assert (tmp_path / "out" / modes.names[index]).read_bytes() == expected.read_bytes()
