"""The Lightning and Hugging Face callbacks with the real trainers (tiny models, CPU, seconds):
mode files that ``cmd reconstruct`` turns into checkpoints each stack's own loader accepts, and a
resumed Lightning run that writes the same mode file as an uninterrupted one."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from typer.testing import CliRunner

import cmdtool
from cmdtool import CmdError
from cmdtool.cli import app
from helpers import TokenRun, assert_same_mode_files

torch.set_num_threads(1)
PACKAGES = [p for p in ("lightning", "pytorch_lightning") if importlib.util.find_spec(p)]


def cmd(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.stdout


def test_importing_cmdtool_imports_no_stack():
    code = ("import sys, cmdtool, cmdtool.integrations; "
            "print(sorted(m for m in ('torch', 'lightning', 'pytorch_lightning', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- Lightning


def lightning_stack(package: str):
    pl = importlib.import_module("lightning.pytorch" if package == "lightning" else package)
    from cmdtool.integrations.lightning import CMDCallback

    class Regression(pl.LightningModule):
        def __init__(self, hidden: int = 8):
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.BatchNorm1d(hidden),
                                           torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    y = x @ torch.randn(4, 1, generator=generator) + 0.1 * torch.randn(64, 1, generator=generator)
    data = torch.utils.data.TensorDataset(x, y)
    return pl, CMDCallback, Regression, data


def lightning_fit(package, root: Path, max_epochs: int, ckpt_path=None, **options):
    pl, CMDCallback, Regression, data = lightning_stack(package)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    module = Regression()
    callback = CMDCallback(modes=3, warmup=3, embed_window=2, embed_percent=30, samples=100, **options)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback, checkpoints], default_root_dir=root,
                         num_sanity_val_steps=0)
    trainer.fit(module, loader, loader, ckpt_path=ckpt_path)
    return trainer, module, callback, Regression


@pytest.mark.parametrize("package", PACKAGES)
def test_lightning_trainer_writes_a_mode_file_its_loader_accepts(package, tmp_path):
    mode_file = tmp_path / "run.cmd.h5"
    trainer, module, callback, Regression = lightning_fit(package, tmp_path, 7, mode_file=mode_file,
                                                           validate_with_cmd=True)
    assert trainer.callback_metrics["cmd/embedded_fraction"] == pytest.approx(callback.cmd.embedded_fraction)
    assert 0 < callback.cmd.embedded_fraction < 1
    assert 0 < float(trainer.callback_metrics["cmd/rel_error"]) < 1
    summary = cmdtool.summarize(mode_file)
    assert summary["checkpoint_names"] == [f"epoch={e}-step={4 * (e + 1)}.ckpt" for e in range(7)]
    assert summary["checkpoint_names"] == sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert summary["embedding"]["window"] == 2 and summary["embedding"]["fraction"][-1] > 0
    out = cmd("reconstruct", mode_file, "-o", tmp_path / "out")
    loaded = Regression.load_from_checkpoint(out.strip(), map_location="cpu")
    expected = cmdtool.reconstruct(mode_file)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    loaded.eval()  # validate_with_cmd: the last validation scored the CMD weights
    x, y = lightning_stack(package)[3].tensors
    with torch.no_grad():
        assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(
            float(torch.nn.functional.mse_loss(loaded.net(x), y)), rel=1e-5)
    # The module trained on: validation swapped the CMD weights in and back out.
    assert not torch.equal(module.state_dict()["net.0.weight"], expected["net.0.weight"])
    cmd("report", mode_file, "-o", tmp_path / "report", "--checkpoints", tmp_path / "checkpoints")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["embedding"]["fraction"] == summary["embedding"]["fraction"]
    assert any(note.startswith("Embedded CMD (paper §3.4)") for note in report["notes"])
    assert report["plots"]["embedded"] == "embedded_fraction.png"
    assert (tmp_path / "report" / "embedded_fraction.png").stat().st_size > 1000
    rows = [line for line in (tmp_path / "report" / "report.md").read_text().splitlines()
            if line.startswith("| 6 | epoch=6-step=28.ckpt |")]  # the per-checkpoint table's last row
    assert len(rows) == 1 and rows[0].endswith(f"| {100 * summary['embedding']['fraction'][-1]:.1f}% |")


@pytest.mark.parametrize("package", PACKAGES)
def test_lightning_resumed_run_writes_the_same_mode_file(package, tmp_path):
    lightning_fit(package, tmp_path / "whole", 8, mode_file=tmp_path / "whole.cmd.h5")
    lightning_fit(package, tmp_path / "part", 4)
    resumed = tmp_path / "part" / "checkpoints" / "epoch=3-step=16.ckpt"  # after the first embedding window
    assert torch.load(resumed, weights_only=True)["callbacks"]
    lightning_fit(package, tmp_path / "part", 8, ckpt_path=resumed, mode_file=tmp_path / "resumed.cmd.h5")
    assert_same_mode_files(tmp_path / "resumed.cmd.h5", tmp_path / "whole.cmd.h5")
    with pytest.raises(CmdError, match="other CMD settings: embed_percent is 30.0 in the saved state, 10.0 now"):
        pl, CMDCallback, Regression, data = lightning_stack(package)
        trainer = pl.Trainer(max_epochs=6, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                             callbacks=[CMDCallback(modes=3, warmup=3, embed_window=2, embed_percent=10, samples=100)])
        trainer.fit(Regression(), torch.utils.data.DataLoader(data, batch_size=16), ckpt_path=resumed)


@pytest.mark.parametrize("package", PACKAGES)
def test_lightning_observes_every_n_steps(package, tmp_path):
    """``every_n_steps=3`` over 5 epochs of 4 batches: observations at steps 3, 6, …, 18, across epoch
    boundaries, and the windows counted in observations (the first after 3 + 2)."""
    mode_file = tmp_path / "steps.cmd.h5"
    trainer, module, callback, Regression = lightning_fit(package, tmp_path, 5, mode_file=mode_file,
                                                           every_n_steps=3)
    summary = cmdtool.summarize(mode_file)
    assert summary["time"] == [3, 6, 9, 12, 15, 18]
    assert summary["checkpoint_names"] == ["epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "epoch=2-step=9.ckpt",
                                           "epoch=2-step=12.ckpt", "epoch=3-step=15.ckpt", "epoch=4-step=18.ckpt"]
    assert summary["online"] == {"warmup": 3, "updates": 3}
    assert summary["embedding"]["fraction"][-1] == pytest.approx(callback.cmd.embedded_fraction)
    assert callback.cmd.embedded_fraction > 0
    assert float(trainer.callback_metrics["cmd/rel_error"]) == pytest.approx(callback.cmd.rel_error)


@pytest.mark.parametrize("package", PACKAGES[:1])
def test_lightning_warmup_longer_than_the_run(package, tmp_path):
    with pytest.raises(CmdError, match="warm-up of 3 observations is longer than the run, which made 2"):
        lightning_fit(package, tmp_path, 2, mode_file=tmp_path / "x.cmd.h5")
    assert not (tmp_path / "x.cmd.h5").exists()


# --------------------------------------------------------------------------- Hugging Face


def hf_train(out: Path, epochs: int, resume=None, **options):
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from cmdtool.integrations.transformers import CMDCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(output_dir=str(out), num_train_epochs=epochs, save_strategy="epoch",
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                             logging_steps=100, disable_tqdm=True, seed=0, eval_strategy="epoch")
    callback = CMDCallback(modes=3, warmup=3, embed_window=2, embed_percent=30, samples=200, **options)
    trainer = Trainer(model=model, args=args, train_dataset=TokenRun(), eval_dataset=TokenRun(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def test_huggingface_trainer_writes_a_mode_file_from_pretrained_loads(tmp_path):
    GPT2LMHeadModel = pytest.importorskip("transformers").GPT2LMHeadModel

    mode_file = tmp_path / "hf.cmd.h5"
    trainer, callback = hf_train(tmp_path / "output", 6, mode_file=mode_file, validate_with_cmd=True)
    logged = [entry for entry in trainer.state.log_history if "cmd/embedded_fraction" in entry]
    assert [entry["step"] for entry in logged] == [12, 16, 20, 24]
    assert logged[-1]["cmd/embedded_fraction"] == pytest.approx(callback.cmd.embedded_fraction) and logged[-1][
        "cmd/embedded_fraction"] > 0
    assert (tmp_path / "output" / "checkpoint-24" / "cmdtool_state.pt").is_file()
    summary = cmdtool.summarize(mode_file)
    assert summary["checkpoint_names"] == [f"checkpoint-{4 * e}" for e in range(1, 7)]
    [folder] = cmd("reconstruct", mode_file, "-o", tmp_path / "out").split()
    loaded = GPT2LMHeadModel.from_pretrained(folder).state_dict()
    expected = cmdtool.reconstruct(mode_file)
    assert "lm_head.weight" not in expected  # tied, left out as save_pretrained does
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
    assert torch.equal(loaded["lm_head.weight"], loaded["transformer.wte.weight"])


def test_huggingface_resumed_run_writes_the_same_mode_file(tmp_path):
    hf_train(tmp_path / "whole", 6, mode_file=tmp_path / "whole.cmd.h5")
    part = tmp_path / "part"
    hf_train(part, 6)
    for step in (20, 24):  # as if the run had stopped after epoch 4, past the first embedding window
        shutil.rmtree(part / f"checkpoint-{step}")
    hf_train(part, 6, resume=str(part / "checkpoint-16"), mode_file=tmp_path / "resumed.cmd.h5")
    assert_same_mode_files(tmp_path / "resumed.cmd.h5", tmp_path / "whole.cmd.h5")


def test_huggingface_trainer_observes_every_n_steps(tmp_path):
    """``every_n_steps=3`` over 4 epochs of 4 steps: observations at steps 3, 6, …, 15, not at epoch ends."""
    mode_file = tmp_path / "steps.cmd.h5"
    trainer, callback = hf_train(tmp_path / "output", 4, mode_file=mode_file, every_n_steps=3)
    summary = cmdtool.summarize(mode_file)
    assert summary["time"] == [3, 6, 9, 12, 15]
    assert summary["checkpoint_names"] == [f"checkpoint-{s}" for s in (3, 6, 9, 12, 15)]
    logged = [entry["step"] for entry in trainer.state.log_history if "cmd/rel_error" in entry]
    assert logged == [9, 12, 15]  # from the end of the warm-up (3 observations)
    assert summary["embedding"]["fraction"][-1] == pytest.approx(callback.cmd.embedded_fraction)
    assert callback.cmd.embedded_fraction > 0
