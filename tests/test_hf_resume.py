"""The Hugging Face CMDCallback resumes from the state of the checkpoint the Trainer resumes, with
the real Trainer: another run's state in ``output_dir`` is never used (the right one is read, or a
wrong one refused), and the state file is replaced only whole."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

from cmdtool import CmdError
from helpers import TokenRun, assert_same_mode_files

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


def train(out: Path, epochs: int = 6, resume=None, model_seed: int = 0, **options):
    """A tiny GPT-2 for ``epochs`` epochs of 4 steps, a checkpoint every epoch; ``model_seed`` makes another run."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from cmdtool.integrations.transformers import CMDCallback

    torch.manual_seed(model_seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(output_dir=str(out), num_train_epochs=epochs, save_strategy="epoch",
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                             logging_steps=100, disable_tqdm=True, seed=0)
    callback = CMDCallback(**{**dict(modes=3, warmup=3, embed_window=2, embed_percent=30, samples=200), **options})
    trainer = Trainer(model=model, args=args, train_dataset=TokenRun(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return callback


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, the same run stopped after epoch 4, and another run (other initial weights)."""
    root = tmp_path_factory.mktemp("hf")
    train(root / "whole", mode_file=root / "whole.cmd.h5")
    train(root / "part")
    for step in (20, 24):
        shutil.rmtree(root / "part" / f"checkpoint-{step}")
    train(root / "other", model_seed=1)
    return root


def foreign_output_dir(runs: Path, tmp_path: Path) -> Path:
    """An output_dir holding another run's checkpoints, at the same steps as the run resumed."""
    folder = tmp_path / "foreign"
    shutil.copytree(runs / "other", folder)
    return folder


def test_resumes_from_the_state_of_the_checkpoint_resumed_not_output_dir(runs, tmp_path):
    foreign = foreign_output_dir(runs, tmp_path)
    train(foreign, resume=str(runs / "part" / "checkpoint-16"), mode_file=tmp_path / "resumed.cmd.h5")
    assert_same_mode_files(tmp_path / "resumed.cmd.h5", runs / "whole.cmd.h5")


def test_another_runs_state_is_refused(runs, tmp_path, monkeypatch):
    """Where the Trainer's resume_from_checkpoint cannot be seen, output_dir/checkpoint-<step> is tried,
    and another run's state there is refused: its weights are not those the Trainer loaded."""
    import cmdtool.integrations.transformers as integration

    foreign = foreign_output_dir(runs, tmp_path)
    monkeypatch.setattr(integration.inspect, "currentframe", lambda: None)
    with pytest.raises(CmdError) as refused:
        train(foreign, resume=str(runs / "part" / "checkpoint-16"), mode_file=tmp_path / "x.cmd.h5")
    assert str(refused.value) == (
        f"{foreign / 'checkpoint-16' / 'cmdtool_state.pt'}: saved with other weights than those of the checkpoint "
        f"being resumed at step 16 (another run's state?); resume from the checkpoint folder this state was saved "
        f"in, or leave it out of output_dir")
    assert not (tmp_path / "x.cmd.h5").exists()


def test_a_state_saved_at_another_step_is_refused(runs, tmp_path):
    part = tmp_path / "part"
    shutil.copytree(runs / "part", part)
    shutil.copy(part / "checkpoint-12" / "cmdtool_state.pt", part / "checkpoint-16" / "cmdtool_state.pt")
    with pytest.raises(CmdError, match=r"cmdtool_state.pt: saved at step 12, but the Trainer resumes at step 16; "
                                       r"this state belongs to another checkpoint"):
        train(part, resume=str(part / "checkpoint-16"))


def test_other_settings_are_refused_naming_the_file(runs, tmp_path):
    part = tmp_path / "part"
    shutil.copytree(runs / "part", part)
    with pytest.raises(CmdError, match=r"checkpoint-16/cmdtool_state.pt: resuming with other CMD settings: modes is 3 "
                                       r"in the saved state, 4 now"):
        train(part, resume=str(part / "checkpoint-16"), modes=4)


def test_the_state_file_is_replaced_only_whole(runs, tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous state file as it was, and no temporary file."""
    import cmdtool.integrations.transformers as integration

    part = tmp_path / "part"
    shutil.copytree(runs / "part", part)
    target = part / "checkpoint-16" / "cmdtool_state.pt"
    before = target.read_bytes()

    def failing_save(obj, path):
        Path(path).write_bytes(b"half a state")
        raise OSError("No space left on device")

    callback = integration.CMDCallback(modes=3, warmup=3, embed_window=2, embed_percent=30, samples=200)
    callback.cmd = integration.EmbeddedCMD(torch.nn.Linear(2, 2))
    callback._run = "run"
    monkeypatch.setattr(integration.torch, "save", failing_save)
    args = type("Args", (), {"output_dir": str(part)})()
    state = type("State", (), {"is_world_process_zero": True, "global_step": 16})()
    with pytest.raises(OSError, match="No space left"):
        callback.on_save(args, state, None)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".")) == []
