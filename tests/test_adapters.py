"""cmdtool/checkpoints/adapters.py: PEFT (LoRA) adapter runs as ``transformers.Trainer`` and
``PeftModel.save_pretrained`` write them, read by ``cmd ls``, ``fit``, ``update``, ``watch`` and
``report --checkpoints``, and written back by ``cmd reconstruct`` as folders that
``PeftModel.from_pretrained`` loads.

The run is trained once per module (a few CPU steps of a 2-layer GPT-2 with LoRA) and shared.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # no network: models are built from configs
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import h5py
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from typer.testing import CliRunner

import cmdtool
from cmdtool.checkpoints import CheckpointInfo, checkpoint_at, discover, write_checkpoint
from cmdtool.cli import app
from cmdtool.errors import CmdError
from cmdtool.modefile import open_mode_file
from cmdtool.online import watch
from helpers import TokenRun

runner = CliRunner()
STEPS = 6


def cmd(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.stderr}\n{result.exception!r}"
    return result


def base_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def lora_config() -> LoraConfig:
    return LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_dropout=0.0)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A Trainer run of a LoRA-wrapped GPT-2 saving every step: ``checkpoint-1/`` … ``-6/``, each with
    adapter_model.safetensors, adapter_config.json, README.md, trainer_state.json and the training
    state; plus ``checkpoint-0/`` saved by ``save_pretrained`` before training, where every LoRA B
    matrix is still zero."""
    out = tmp_path_factory.mktemp("lora") / "output"
    model = get_peft_model(base_model(), lora_config())
    model.save_pretrained(out / "checkpoint-0")
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, save_steps=1, per_device_train_batch_size=4,
                             learning_rate=2e-2, report_to=[], use_cpu=True, logging_steps=100,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=TokenRun()).train()
    return out


def adapter_of(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter ``PeftModel.from_pretrained`` loads from ``folder`` onto a fresh base model, as
    PEFT names its tensors in the saved file."""
    model = PeftModel.from_pretrained(base_model(), folder)
    return get_peft_model_state_dict(model)


def test_ls_names_adapter_folders(lora_run):
    assert {p.name for p in (lora_run / "checkpoint-3").iterdir()} >= {
        "adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "optimizer.pt"}
    listing = json.loads(cmd("ls", lora_run, "--json").stdout)
    assert [(c["name"], c["time"], c["format"]) for c in listing["checkpoints"]] == [
        (f"checkpoint-{s}", s, "huggingface peft adapter safetensors") for s in range(STEPS + 1)]
    assert listing["time_source"] == "name"  # checkpoint-0 has no trainer_state.json
    found = discover(lora_run).checkpoints[2]
    assert found.stack == "peft" and found.folder.weights == ("adapter_model.safetensors",)
    assert "adapter_config.json" in found.folder.copied and "optimizer.pt" in found.folder.dropped


def test_save_pretrained_folder_is_one_checkpoint(lora_run):
    """A ``save_pretrained`` folder named itself is one adapter checkpoint, not a plain file."""
    listing = json.loads(cmd("ls", lora_run / "checkpoint-0", "--json").stdout)
    assert [(c["name"], c["format"]) for c in listing["checkpoints"]] == [
        ("checkpoint-0", "huggingface peft adapter safetensors")]
    assert listing["skipped"] == []
    assert checkpoint_at(lora_run / "checkpoint-0").stack == "peft"


def test_adapter_saved_in_the_run_folder_is_skipped(lora_run, tmp_path):
    """``Trainer.save_model`` writes the final adapter into the output folder beside the
    ``checkpoint-<step>/`` folders: the run is the folders, the adapter file is skipped with its reason."""
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        shutil.copy(lora_run / f"checkpoint-{STEPS}" / name, run)
    listing = json.loads(cmd("ls", run, "--json").stdout)
    assert [c["name"] for c in listing["checkpoints"]] == [f"checkpoint-{s}" for s in range(STEPS + 1)]
    assert listing["skipped"] == [{"name": "adapter_model.safetensors", "reason": "the adapter saved in the folder "
                                   "itself (save_model); the run is its checkpoint-<step>/ folders"}]


def test_fit_reconstruct_loads_with_peft(lora_run, tmp_path):
    """fit → reconstruct → ``PeftModel.from_pretrained``: the loaded adapter is the mode file's
    reconstruction, bit for bit; LoRA B starts at zero (a constant start) and the fit is finite."""
    first = load_file(lora_run / "checkpoint-0" / "adapter_model.safetensors")
    b_names = [n for n in first if "lora_B" in n]
    assert b_names and all(not first[n].any() for n in b_names)  # B is zero before training
    mode_file = tmp_path / "run.cmd.h5"
    fitted = json.loads(cmd("fit", lora_run, "-o", mode_file, "--modes", 3, "--samples", 200,
                            "--trajectory", tmp_path / "traj.h5", "--json").stdout)
    assert fitted["checkpoints"] == STEPS + 1
    assert 0 < fitted["rel_error"] < 0.1

    result = cmd("reconstruct", mode_file, "-o", tmp_path / "out", "--at", "0,-1")
    assert result.stdout.split() == [str(tmp_path / "out" / f"checkpoint-{s}") for s in (0, STEPS)]
    folder = tmp_path / "out" / f"checkpoint-{STEPS}"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "trainer_state.json"]
    source = lora_run / f"checkpoint-{STEPS}"
    for name in ("adapter_config.json", "README.md", "trainer_state.json"):
        assert (folder / name).read_bytes() == (source / name).read_bytes()
    assert "optimizer.pt" in result.stderr  # the note says what is not restored

    for at, step in ((-1, STEPS), (0, 0)):
        loaded, expected = adapter_of(tmp_path / "out" / f"checkpoint-{step}"), cmdtool.reconstruct(mode_file, at=at)
        assert set(loaded) == set(expected) == set(first)
        for name, tensor in expected.items():
            assert torch.equal(loaded[name], tensor), name
    peft_model = get_peft_model(base_model(), lora_config())
    set_peft_model_state_dict(peft_model, expected)  # the --eval recipe for adapters
    assert all(torch.equal(get_peft_model_state_dict(peft_model)[n], t) for n, t in expected.items())
    trained = load_file(source / "adapter_model.safetensors")
    assert any(not torch.equal(trained[n], expected[n]) for n in b_names)  # modelled, not copied
    assert all(torch.isfinite(t).all() for t in expected.values())


def test_update_and_report_read_adapter_folders(lora_run, tmp_path):
    """``cmd update`` with adapter folders equals ``fit --warmup``; ``report --checkpoints`` reads them."""
    warm = tmp_path / "warm.cmd.h5"
    cmd("fit", lora_run, "-o", warm, "--modes", 3, "--samples", 200, "--warmup", 4,
        "--trajectory", tmp_path / "warm.h5")
    partial = tmp_path / "partial.cmd.h5"
    cmd("fit", lora_run, "-o", partial, "--modes", 3, "--samples", 200, "--stop", 4,
        "--trajectory", tmp_path / "first.h5")
    cmd("update", partial, *(lora_run / f"checkpoint-{s}" for s in range(4, STEPS + 1)))
    assert cmdtool.summarize(partial)["checkpoint_names"] == [f"checkpoint-{s}" for s in range(STEPS + 1)]
    updated, warmed = cmdtool.reconstruct(partial), cmdtool.reconstruct(warm)
    assert all(torch.equal(updated[name], warmed[name]) for name in warmed)

    report = json.loads(cmd("report", warm, "-o", tmp_path / "report", "--checkpoints", lora_run,
                            "--trajectory", tmp_path / "again.h5", "--json").stdout)
    assert report["run"]["checkpoints"] == STEPS + 1
    assert report["fit"]["rel_error"] == pytest.approx(cmdtool.summarize(warm)["rel_error"], rel=1e-4)


def test_watch_absorbs_adapter_folders_as_the_trainer_writes_them(lora_run, tmp_path):
    """``watch`` on a folder the Trainer is filling: a ``checkpoint-<step>/`` with its config but
    no weights yet is waited for (and said so, once), the adapter saved in the folder itself is not a
    checkpoint; the result equals ``fit --warmup``."""
    live = tmp_path / "live"
    live.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # Trainer.save_model into the run folder
        shutil.copy(lora_run / f"checkpoint-{STEPS}" / name, live)
    arrivals = [f"checkpoint-{s}" for s in range(STEPS + 1)]
    messages, script = [], []
    for name in arrivals:
        script += [("config", name), ("hold", name), ("weights", name)]  # hold: the writer stalls a look

    def sleep(seconds):
        if not script:
            return
        action, name = script.pop(0)
        source, target = lora_run / name, live / name
        if action == "hold":
            return
        if action == "config":
            target.mkdir()
            shutil.copy(source / "adapter_config.json", target)
        else:
            for p in source.iterdir():
                if not (target / p.name).exists():
                    shutil.copy(p, target)

    out = tmp_path / "w.cmd.h5"
    watch(live, out, warmup=4, until=STEPS + 1, interval=0.0, modes=3, samples=200,
          trajectory=tmp_path / "t.h5", sleep=sleep, say=messages.append)
    with open_mode_file(out) as modes:
        assert modes.names == arrivals
    for name in arrivals:
        assert sum(m.startswith(f"waiting: {live / name}: no model weights yet") for m in messages) == 1, messages
    assert any(m.startswith("waiting for the warm-up: 2 of 4 complete checkpoints") for m in messages), messages
    assert any(m.startswith("waiting for checkpoints after checkpoint-") for m in messages), messages

    warm = tmp_path / "warm.cmd.h5"
    cmd("fit", lora_run, "-o", warm, "--modes", 3, "--samples", 200, "--warmup", 4,
        "--trajectory", tmp_path / "warm.h5")
    with open_mode_file(out) as got, open_mode_file(warm) as want:  # updates one by one: rounding apart
        assert got.names == want.names
        got_labels, got_a, got_b = got.parameters()
        want_labels, want_a, want_b = want.parameters()
        np.testing.assert_array_equal(got_labels, want_labels)
        np.testing.assert_allclose(got_a, want_a, rtol=1e-5, atol=1e-5 * np.median(np.abs(want_a)))
        np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-5 * np.median(np.abs(want_b)))


@pytest.mark.parametrize("config, problem", [
    (b'{"peft_type": "LORA", "r": ', "adapter_config.json: not readable JSON"),
    (b'["LORA"]', "adapter_config.json: not a PEFT adapter config"),
    (None, "adapter_model.safetensors without adapter_config.json"),
])
def test_malformed_adapter_config_is_one_error_line(lora_run, tmp_path, config, problem):
    run = tmp_path / "run"
    for s in (1, 2, 3):
        shutil.copytree(lora_run / f"checkpoint-{s}", run / f"checkpoint-{s}")
    bad = run / "checkpoint-2" / "adapter_config.json"
    if config is None:
        bad.unlink()
    else:
        bad.write_bytes(config)
    for args in (["ls", run], ["fit", run, "-o", tmp_path / "out.cmd.h5", "--trajectory", tmp_path / "t.h5"]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {run / 'checkpoint-2'}") and problem in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written


def test_write_back_checks_the_adapter_config(tmp_path):
    """A mode file whose stored adapter_config.json is not one: write-back refuses it."""
    info = CheckpointInfo("safetensors", shards={"adapter_model.safetensors": ["w"]},
                          files={"adapter_config.json": "0" * 64})
    shown = tmp_path / "out" / "checkpoint-1"
    with pytest.raises(CmdError, match="^" + re.escape(f"{shown / 'adapter_config.json'}: not a PEFT adapter config")):
        write_checkpoint(tmp_path / "checkpoint-1", {"w": torch.zeros(2)}, info, attachment=lambda digest: b"{}",
                         shown=shown)


def test_reconstruct_refuses_a_stored_adapter_config_that_is_not_one(lora_run, tmp_path):
    """The stored adapter_config.json is checked again before it is written: one error line, exit 2,
    no output folder."""
    mode_file = tmp_path / "run.cmd.h5"
    cmd("fit", lora_run, "-o", mode_file, "--modes", 2, "--samples", 100, "--stop", 3,
        "--trajectory", tmp_path / "traj.h5")
    with open_mode_file(mode_file) as modes:
        digest = modes.infos[-1].files["adapter_config.json"]
    with h5py.File(mode_file, "r+") as f:
        del f["attachments"][digest]
        f["attachments"].create_dataset(digest, data=np.frombuffer(b'{"r": 2', dtype=np.uint8))
    result = runner.invoke(app, ["reconstruct", str(mode_file), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'out' / 'checkpoint-2' / 'adapter_config.json'}: not readable JSON (JSONDecodeError: "
        "Expecting ',' delimiter: line 1 column 8 (char 7)); PeftModel.from_pretrained needs it to load the adapter"]
    assert not (tmp_path / "out").exists()


def test_adapter_weights_without_config_in_the_folder_named_are_a_plain_file(lora_run, tmp_path):
    """Only with its adapter_config.json is a folder an adapter; a lone weight file is a plain checkpoint."""
    shutil.copy(lora_run / "checkpoint-1" / "adapter_model.safetensors", tmp_path)
    found = discover(tmp_path).checkpoints
    assert [(c.name, c.stack, c.format) for c in found] == [("adapter_model.safetensors", "plain", "safetensors")]


def test_export_writes_adapter_folders(lora_run, tmp_path):
    """``cmd export`` writes back as ``cmd reconstruct`` does: an adapter folder with its
    adapter_config.json, which ``PeftModel.from_pretrained`` loads as the exported weights."""
    mode_file = tmp_path / "run.cmd.h5"
    cmd("fit", lora_run, "-o", mode_file, "--modes", 3, "--samples", 200, "--trajectory", tmp_path / "traj.h5")
    result = cmd("export", mode_file, "-o", tmp_path / "out", "--family", "tail_2", "--at", "-1")
    folder = tmp_path / "out" / f"checkpoint-{STEPS}"
    assert result.stdout.split() == [str(folder)]
    source = lora_run / f"checkpoint-{STEPS}"
    assert (folder / "adapter_config.json").read_bytes() == (source / "adapter_config.json").read_bytes()
    last, before = (load_file(lora_run / f"checkpoint-{s}" / "adapter_model.safetensors") for s in (STEPS, STEPS - 1))
    loaded = adapter_of(folder)
    assert set(loaded) == set(last)
    for name, value in last.items():
        mean = ((before[name].double() + value.double()) / 2).to(value.dtype)
        assert torch.equal(loaded[name], mean), name
