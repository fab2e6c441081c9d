"""The shipped sample run: what the issue promises of it, and the whole tool on a real training run."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

import cmdtool
from sample_checkpoints.model import DigitsCNN, evaluate

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


def test_sample_run_is_a_small_real_training_run():
    files = sorted(SAMPLES.glob("epoch_*.safetensors"))
    assert len(files) == 41
    assert sum(p.stat().st_size for p in SAMPLES.iterdir() if p.is_file()) < 10e6
    first, last = (
        evaluate(load_file(SAMPLES / "epoch_0.safetensors")),
        evaluate(load_file(SAMPLES / "epoch_40.safetensors")),
    )
    assert set(last) == {"val", "test"}  # held-out data split to choose on one half and report the other
    for split in ("val", "test"):
        assert first[split]["accuracy"] < 0.2  # it trained ...
        assert 0.8 < last[split]["accuracy"] < 0.95  # ... on a task it does not saturate (label noise)


def test_fit_and_reconstruct_the_sample_run(tmp_path):
    result = cmdtool.fit(SAMPLES, tmp_path / "s.cmd.h5", modes=10, trajectory=tmp_path / "t.h5")
    summary = result.summary
    assert summary["checkpoints"] == 41 and summary["parameters"] == 23_274 and summary["tensors_carried"] == 3
    assert summary["time"] == list(range(41))  # natural order: epoch_2 before epoch_10
    assert summary["compression_ratio"] > 15
    assert summary["rel_error"] < 0.2  # 0.142 on this noisy run (0.076 on the saturated one before)
    paths = cmdtool.reconstruct_checkpoints(tmp_path / "s.cmd.h5", tmp_path / "out", at="last")
    assert [p.name for p in paths] == ["epoch_40.safetensors"]
    state = load_file(paths[0])
    DigitsCNN().load_state_dict(state, strict=True)
    source = load_file(SAMPLES / "epoch_40.safetensors")
    assert all(state[k].dtype == source[k].dtype and state[k].shape == source[k].shape for k in source)
    assert int(state["bn1.num_batches_tracked"]) == int(source["bn1.num_batches_tracked"]) == 520
    assert evaluate(state)["test"]["accuracy"] > 0.8
