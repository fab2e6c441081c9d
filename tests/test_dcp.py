"""torch.distributed.checkpoint folders (cmdtool/checkpoints/dcp.py), written by the real library:
one process without a process group, and two ranks (gloo, CPU) sharding tensors over their files."""

from __future__ import annotations

import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch

import cmdtool
from cmdtool.checkpoints import discover
from helpers import assert_same_mode_files, cmd, error_line, ok, plant, write_run

dcp = pytest.importorskip("torch.distributed.checkpoint")
torch.set_num_threads(1)

HERE = Path(__file__).parent


def save_dcp(folder: Path, obj: dict) -> None:
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(obj, checkpoint_id=str(folder))


def planted_states(T: int = 6) -> list[dict]:
    """Planted states with the tensors in name order (a safetensors file's order), one in bfloat16."""
    states = plant(T=T).states()
    for state in states:
        state["fc.bias"] = state["fc.bias"].to(torch.bfloat16)
    return [dict(sorted(s.items())) for s in states]


def write_both(tmp_path: Path, states: list[dict]) -> tuple[Path, Path]:
    """The same states as safetensors files and as DCP folders (with an optimizer and the step beside them)."""
    plain = tmp_path / "safetensors"
    plain.mkdir()
    from safetensors.torch import save_file
    for t, state in enumerate(states):
        save_file(state, str(plain / f"step_{10 * t}.safetensors"), metadata={"step": str(10 * t)})
        save_dcp(tmp_path / "dcp" / f"step_{10 * t}",
                 {"model": state, "optimizer": {"state": {"0": {"exp_avg": torch.zeros(3)}}}, "step": 10 * t})
    return plain, tmp_path / "dcp"


def assert_same_fit(first: Path, second: Path) -> None:
    """Every dataset of two mode files equal except the checkpoints' names and write-back info."""
    assert_same_mode_files(first, second, skip=("checkpoints", "checkpoint_info"), attributes=False)


def fit(runner, tmp_path: Path, run: Path, out: Path, *extra):
    return cmd(runner, "fit", run, "-o", out, "-m", "3", "--trajectory", tmp_path / f"{out.stem}.traj.h5", *extra)


def test_dcp_run_fits_as_the_same_states_in_safetensors(runner, tmp_path):
    states = planted_states()
    plain, folders = write_both(tmp_path, states)
    listing = ok(cmd(runner, "ls", folders)).stdout
    assert "time from the stored step" in listing
    assert "step_50     torch.distributed.checkpoint" in listing
    ok(fit(runner, tmp_path, plain, tmp_path / "plain.cmd.h5"))
    result = ok(fit(runner, tmp_path, folders, tmp_path / "dcp.cmd.h5"))
    assert_same_fit(tmp_path / "plain.cmd.h5", tmp_path / "dcp.cmd.h5")
    assert cmdtool.summarize(tmp_path / "dcp.cmd.h5")["time"] == [0, 10, 20, 30, 40, 50]
    assert "not restored (no longer match the weights): optimizer" not in result.stderr  # said at reconstruct

    # written back as DCP folders that dcp.load reads: the reconstruction, the step, no optimizer
    out = tmp_path / "out"
    result = ok(cmd(runner, "reconstruct", tmp_path / "dcp.cmd.h5", "-o", out, "--at", "0,-1"))
    assert result.stdout.split() == [str(out / "step_0"), str(out / "step_50")]
    assert "optimizer" in result.stderr
    expected = cmdtool.reconstruct(tmp_path / "dcp.cmd.h5", at=-1)
    loaded = {"model": {name: torch.empty_like(t) for name, t in expected.items()}, "step": -1}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore")
        dcp.load(loaded, checkpoint_id=str(out / "step_50"))
    assert loaded["step"] == 50
    for name, value in expected.items():
        assert torch.equal(loaded["model"][name], value), name
    assert loaded["model"]["fc.bias"].dtype == torch.bfloat16
    # ... and read back by cmdtool as a run of its own
    assert [c.name for c in discover(out).checkpoints] == ["step_0", "step_50"]

    # --format safetensors writes plain files
    result = ok(cmd(runner, "reconstruct", tmp_path / "dcp.cmd.h5", "-o", tmp_path / "st", "--at", "-1",
                    "--format", "safetensors"))
    from safetensors.torch import load_file
    written = load_file(result.stdout.split()[0])
    assert all(torch.equal(written[n], v) for n, v in expected.items())


def test_update_absorbs_a_dcp_folder(runner, tmp_path):
    states = planted_states(T=7)
    _, folders = write_both(tmp_path, states)
    later = tmp_path / "later"
    later.mkdir()
    (folders / "step_60").rename(later / "step_60")
    ok(fit(runner, tmp_path, folders, tmp_path / "m.cmd.h5", "--warmup", "4"))
    ok(cmd(runner, "update", tmp_path / "m.cmd.h5", later / "step_60"))
    assert cmdtool.summarize(tmp_path / "m.cmd.h5")["checkpoint_names"][-1] == "step_60"


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_metadata_that_would_run_code_is_refused_unrun(runner, tmp_path):
    _, folders = write_both(tmp_path, planted_states(T=3))
    marker = tmp_path / "ran"
    metadata = pickle.loads((folders / "step_10" / ".metadata").read_bytes())
    metadata.planner_data = RunsCode(marker)  # deep inside an otherwise valid metadata object
    (folders / "step_10" / ".metadata").write_bytes(pickle.dumps(metadata))
    module = "posix" if sys.platform != "win32" else "nt"
    expected = (f"{folders / 'step_10' / '.metadata'}: refused: the metadata pickle names {module}.system, which "
                f"is not a torch.distributed.checkpoint metadata class; unpickling it could run code")
    assert error_line(cmd(runner, "ls", folders)) == expected
    assert error_line(fit(runner, tmp_path, folders, tmp_path / "m.cmd.h5")) == expected
    assert not marker.exists() and not (tmp_path / "m.cmd.h5").exists()


@pytest.mark.parametrize("change, problem", [
    (lambda info: setattr(info, "length", info.length + 10**6),
     "the stored bytes of 'model.bn.running_mean' end at byte {end} of '__0_0.distcp', which holds {size} "
     "(truncated or crafted)"),
    (lambda info: setattr(info, "relative_path", "../escape.distcp"),
     "the stored bytes of 'model.bn.running_mean': file name '../escape.distcp' is not a plain file name"),
    (lambda info: setattr(info, "transform_descriptors", ["zstd"]),
     "the stored bytes of 'model.bn.running_mean' are stored through transforms (compression or another "
     "extension), which cmdtool does not read"),
], ids=["past-the-file", "path", "transforms"])
def test_item_offsets_are_checked_before_reading(runner, tmp_path, change, problem):
    _, folders = write_both(tmp_path, planted_states(T=3))
    path = folders / "step_20" / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    [(index, info)] = [(k, v) for k, v in metadata.storage_data.items() if k.fqn == "model.bn.running_mean"]
    change(info)
    path.write_bytes(pickle.dumps(metadata))
    size = (folders / "step_20" / "__0_0.distcp").stat().st_size
    expected = f"{path}: invalid torch.distributed.checkpoint metadata: " + problem.format(
        end=info.offset + info.length, size=size)
    assert error_line(fit(runner, tmp_path, folders, tmp_path / "m.cmd.h5")) == expected


def test_a_chunk_that_is_not_its_metadata_is_refused(runner, tmp_path):
    """The bytes of one tensor's item swapped for another's: caught when the chunk is loaded."""
    _, folders = write_both(tmp_path, planted_states(T=3))
    path = folders / "step_20" / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    items = {k.fqn: v for k, v in metadata.storage_data.items()}
    items["model.conv.bias"].offset, items["model.conv.bias"].length = (items["model.fc.weight"].offset,
                                                                      items["model.fc.weight"].length)
    path.write_bytes(pickle.dumps(metadata))
    assert error_line(fit(runner, tmp_path, folders, tmp_path / "m.cmd.h5")) == (
        f"{folders / 'step_20' / '__0_0.distcp'}: tensor 'conv.bias': a chunk holds float32 [10, 72], the metadata "
        f"says float32 [8]")
    assert not (tmp_path / "m.cmd.h5").exists()


def test_one_dcp_folder_is_not_a_run(runner, tmp_path):
    _, folders = write_both(tmp_path, planted_states(T=2))
    assert error_line(cmd(runner, "ls", folders / "step_0")) == (
        f"{folders / 'step_0'}: is one torch.distributed.checkpoint checkpoint; point cmdtool at the folder that "
        f"holds the run's checkpoint folders (step_100/, step_200/, ...)")


# --------------------------------------------------------------------------- two ranks


SHARDED_SAVE = """
import sys, warnings
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
import torch.distributed.checkpoint as dcp

def work(rank, world, folder):
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/.store", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    states = torch.load(f"{folder}/states.pt", weights_only=True)
    for t, state in enumerate(states):
        sharded = {name: distribute_tensor(value, mesh, [Shard(0)]) if value.dim() else value
                   for name, value in state.items()}
        dcp.save({"model": sharded, "step": 10 * t}, checkpoint_id=f"{folder}/run/step_{10 * t}")
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(work, args=(2, sys.argv[1]), nprocs=2)
"""


def test_two_ranks_shards_fit_as_the_same_states_in_safetensors(runner, tmp_path):
    """Each tensor split over two ranks' files by the real library (DTensor, Shard(0)), reassembled."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch has no gloo backend to write a two-rank checkpoint with")
    import subprocess
    states = planted_states(T=4)
    torch.save(states, tmp_path / "states.pt")
    (tmp_path / "save.py").write_text(SHARDED_SAVE)
    done = subprocess.run([sys.executable, str(tmp_path / "save.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0 and any(s in done.stderr for s in ("connectFullMesh", "Connection refused",
                                                                "Address family not supported")):
        pytest.skip("gloo cannot connect two local processes on this machine (no loopback network)")
    assert done.returncode == 0, done.stderr[-2000:]
    folders = tmp_path / "run"
    assert sorted(p.name for p in (folders / "step_0").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    metadata = pickle.loads((folders / "step_0" / ".metadata").read_bytes())
    chunks = metadata.state_dict_metadata["model.fc.weight"].chunks
    assert [list(c.offsets) for c in chunks] == [[0, 0], [5, 0]]  # really split between the ranks
    listing = ok(cmd(runner, "ls", folders)).stdout
    assert "step_30     torch.distributed.checkpoint, 2 shards" in listing
    plain = write_run(tmp_path / "plain", [], fmt="safetensors")
    from safetensors.torch import save_file
    for t, state in enumerate(states):
        save_file(state, str(plain / f"step_{10 * t}.safetensors"), metadata={"step": str(10 * t)})
    ok(fit(runner, tmp_path, plain, tmp_path / "plain.cmd.h5"))
    ok(fit(runner, tmp_path, folders, tmp_path / "dcp.cmd.h5"))
    assert_same_fit(tmp_path / "plain.cmd.h5", tmp_path / "dcp.cmd.h5")


def test_raw_chunks_are_refused_by_name(runner, tmp_path):
    """``serialization_format=SAFETENSORS`` keeps the chunks in a safetensors blob that the metadata's
    offsets do not point at: refused in one line, not read as wrong values."""
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    for t, state in enumerate(planted_states(T=3)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            writer = dcp.FileSystemWriter(str(tmp_path / "run" / f"step_{t}"),
                                          serialization_format=SerializationFormat.SAFETENSORS)
            dcp.save({"model": state}, storage_writer=writer, no_dist=True)
    assert error_line(fit(runner, tmp_path, tmp_path / "run", tmp_path / "m.cmd.h5")) == (
        f"{tmp_path / 'run' / 'step_0' / '__0_0.distcp'}: tensor 'bn.running_mean' is stored as raw bytes "
        f"(serialization_format=SAFETENSORS), which cmdtool does not read; save with the default format (torch_save)")


def test_export_writes_a_dcp_folder(runner, tmp_path):
    """``cmd export`` writes back as ``cmd reconstruct`` does: a tail mean of DCP checkpoints is a DCP
    folder that ``dcp.load`` reads, with the step beside it and the mean of the last two in the model
    (integer buffers: the last's)."""
    states = planted_states()
    _, folders = write_both(tmp_path, states)
    ok(fit(runner, tmp_path, folders, tmp_path / "dcp.cmd.h5"))
    result = ok(cmd(runner, "export", tmp_path / "dcp.cmd.h5", "-o", tmp_path / "out", "--family", "tail_2",
                    "--at", "-1"))
    assert result.stdout.split() == [str(tmp_path / "out" / "step_50")]
    loaded = {"model": {name: torch.empty_like(t) for name, t in states[-1].items()}, "step": -1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(loaded, checkpoint_id=str(tmp_path / "out" / "step_50"))
    assert loaded["step"] == 50
    for name, value in states[-1].items():
        if value.is_floating_point():  # integer buffers are the last checkpoint's
            value = ((states[-2][name].double() + value.double()) / 2).to(value.dtype)
        assert torch.equal(loaded["model"][name], value), name


def test_a_tensor_read_span_by_span_is_read_from_the_folder_once(tmp_path):
    """Ingest and `cmd update` read a large tensor a span at a time; a DCP item is read whole, so the
    reader keeps the tensor it read last instead of reading it again for every span."""
    import numpy as np

    state = planted_states(T=1)[0]
    save_dcp(tmp_path / "step_0", {"model": state})
    (checkpoint,) = discover(tmp_path).checkpoints
    with checkpoint.open() as reader:
        reads = []
        original = reader._read
        reader._read = lambda item, what: reads.append(what) or original(item, what)
        flat = state["conv.weight"].reshape(-1).float().numpy()
        spans = [(lo, min(lo + 7, flat.size)) for lo in range(0, flat.size, 7)]
        got = np.concatenate([np.empty(hi - lo, dtype=np.float32) for lo, hi in spans])
        for lo, hi in spans:
            reader.read_float32("conv.weight", got[lo:hi], span=(lo, hi))
        np.testing.assert_array_equal(got, flat)
        assert reads == ["tensor 'conv.weight'"] and len(spans) > 3
        reader.read_float32("fc.bias", np.empty(state["fc.bias"].numel(), dtype=np.float32))
        reader.read_float32("conv.weight", got[:7], span=(0, 7))  # read again once another came between
        assert reads == ["tensor 'conv.weight'", "tensor 'fc.bias'", "tensor 'conv.weight'"]


def test_dcp_folders_are_absorbed_two_at_a_time_into_the_file_one_pass_gives(runner, tmp_path, monkeypatch):
    """Each DCP reader keeps a whole tensor, so `cmd update` absorbs DCP folders in passes of
    DCP_AT_ONCE; the file equals the update of the same states from safetensors files in one pass."""
    import importlib

    update = importlib.import_module("cmdtool.online.update")
    states = planted_states(T=9)
    plain, folders = write_both(tmp_path, states)
    for kind, run in (("plain", plain), ("dcp", folders)):
        later = tmp_path / f"later-{kind}"
        later.mkdir()
        for p in list(run.iterdir()):
            if int(p.name.split(".")[0].removeprefix("step_")) >= 40:  # the last 5
                p.rename(later / p.name)
        ok(fit(runner, tmp_path, run, tmp_path / f"{kind}.cmd.h5", "--warmup", "4"))
    passes = []
    original = update._updated_tiles
    monkeypatch.setattr(update, "_updated_tiles", lambda *a, **k: passes.append(1) or original(*a, **k))
    ok(cmd(runner, "update", tmp_path / "plain.cmd.h5", tmp_path / "later-plain"))
    assert len(passes) == 1
    ok(cmd(runner, "update", tmp_path / "dcp.cmd.h5", tmp_path / "later-dcp"))
    assert len(passes) == 1 + 3  # 5 folders, 2 at a time
    assert_same_fit(tmp_path / "plain.cmd.h5", tmp_path / "dcp.cmd.h5")
