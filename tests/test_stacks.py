"""Checkpoint folders as real training stacks write them (issue 4): Hugging Face ``Trainer``
(single-file, sharded and ``pytorch_model.bin`` folders), Lightning ``ModelCheckpoint``, and
hand-made timm and plain-script folders. For each: ``cmd fit``, ``cmd reconstruct --at last``, load
the result with the stack's own loader, and compare with the mode file's reconstruction.

The runs are trained once per module (a few CPU steps of tiny models) and shared by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # no network: models are built from configs
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from typer.testing import CliRunner

import cmdtool
from cmdtool.checkpoints import discover
from cmdtool.cli import app
from helpers import TokenRun

runner = CliRunner()


def cmd(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.stderr}\n{result.exception!r}"
    return result


def fit_and_reconstruct(run: Path, work: Path, *fit_options, fmt: str = "source") -> tuple[Path, list[Path], str]:
    """``cmd fit`` then ``cmd reconstruct --at last``: the mode file, the written paths, stderr."""
    mode_file = work / "run.cmd.h5"
    cmd("fit", run, "-o", mode_file, "--modes", 3, "--samples", 200, "--trajectory", work / "traj.h5", *fit_options)
    result = cmd("reconstruct", mode_file, "-o", work / "out", "--at", "last", "--format", fmt)
    return mode_file, [Path(line) for line in result.stdout.splitlines()], result.stderr


def assert_loaded_equals_reconstruction(loaded: dict[str, torch.Tensor], mode_file: Path) -> None:
    """Every tensor of the mode file's last checkpoint, as the stack's loader gave it back."""
    expected = cmdtool.reconstruct(mode_file, at="last")
    assert expected
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name


# --------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory) -> Path:
    """``Trainer`` output of a tiny GPT-2 (tied embeddings): ``checkpoint-2/``, ``-4/``, ``-6/``, each
    with model.safetensors, config files, trainer_state.json, optimizer.pt, scheduler.pt,
    rng_state.pth and training_args.bin; plus a leftover ``tmp-checkpoint-8/``."""
    out = tmp_path_factory.mktemp("hf") / "output"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(output_dir=str(out), max_steps=6, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=100,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=TokenRun()).train()
    shutil.copytree(out / "checkpoint-6", out / "tmp-checkpoint-8")
    return out


def test_huggingface_trainer_folder(hf_run, tmp_path):
    assert {p.name for p in (hf_run / "checkpoint-6").iterdir()} >= {
        "model.safetensors", "config.json", "trainer_state.json", "optimizer.pt", "training_args.bin"}
    found = discover(hf_run)
    assert [(c.name, c.time, c.stack) for c in found.checkpoints] == [
        ("checkpoint-2", 2, "huggingface"), ("checkpoint-4", 4, "huggingface"), ("checkpoint-6", 6, "huggingface")]
    assert found.time_source == "global_step"  # from trainer_state.json
    assert [s.path.name for s in found.skipped] == ["tmp-checkpoint-8"]
    assert "lm_head.weight" not in found.checkpoints[0].open().signature  # tied: absent from the file

    mode_file, paths, stderr = fit_and_reconstruct(hf_run, tmp_path)
    assert paths == [tmp_path / "out" / "checkpoint-6"]
    folder = paths[0]
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "trainer_state.json"]
    for name in ("config.json", "generation_config.json", "trainer_state.json"):
        assert (folder / name).read_bytes() == (hf_run / "checkpoint-6" / name).read_bytes()
    assert safe_open(str(folder / "model.safetensors"), "pt").metadata() == {"format": "pt"}
    assert "optimizer.pt" in stderr and "training_args.bin" in stderr  # the note says what is dropped

    model = GPT2LMHeadModel.from_pretrained(folder)
    loaded = model.state_dict()
    assert_loaded_equals_reconstruction(loaded, mode_file)
    assert torch.equal(loaded["lm_head.weight"], loaded["transformer.wte.weight"])  # tied again
    source = load_file(hf_run / "checkpoint-6" / "model.safetensors")
    assert not torch.equal(loaded["transformer.h.0.mlp.c_fc.weight"], source["transformer.h.0.mlp.c_fc.weight"])


def test_huggingface_online_fit_and_update(hf_run, tmp_path):
    """Online CMD on a Trainer folder: the updated mode file keeps the copied config files, and
    `fit --warmup 2` equals fitting the first two folders and `cmd update` with the third."""
    mode_file, [folder], _ = fit_and_reconstruct(hf_run, tmp_path, "--warmup", 2)
    assert folder == tmp_path / "out" / "checkpoint-6"
    assert (folder / "config.json").read_bytes() == (hf_run / "checkpoint-6" / "config.json").read_bytes()
    assert_loaded_equals_reconstruction(GPT2LMHeadModel.from_pretrained(folder).state_dict(), mode_file)

    partial = tmp_path / "partial.cmd.h5"
    cmd("fit", hf_run, "-o", partial, "--modes", 3, "--samples", 200, "--stop", 2,
        "--trajectory", tmp_path / "first.h5")
    cmd("update", partial, hf_run / "checkpoint-6")  # one Hugging Face folder, named directly
    assert cmdtool.summarize(partial)["checkpoint_names"] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    updated, warmed = cmdtool.reconstruct(partial), cmdtool.reconstruct(mode_file)
    assert all(torch.equal(updated[name], warmed[name]) for name in warmed)
    cmd("reconstruct", partial, "-o", tmp_path / "updated", "--at", "last")
    assert_loaded_equals_reconstruction(
        GPT2LMHeadModel.from_pretrained(tmp_path / "updated" / "checkpoint-6").state_dict(), partial
    )


def test_watch_follows_trainer_checkpoint_folders(hf_run, tmp_path):
    """``cmd watch --until`` on a Trainer output folder absorbs its ``checkpoint-<step>/`` folders
    (never ``tmp-checkpoint-8/``) and writes what ``fit --warmup`` writes; the result loads with
    ``from_pretrained``."""
    live = tmp_path / "live"
    shutil.copytree(hf_run, live)
    out = tmp_path / "w.cmd.h5"
    result = cmd("watch", live, "-o", out, "--warmup", 2, "--until", 3, "--interval", 0.01, "--modes", 3,
                 "--samples", 200, "--trajectory", tmp_path / "w.h5")
    assert "fitted" in result.stderr and "waiting for the warm-up: 0 of 2" in result.stderr, result.stderr
    assert cmdtool.summarize(out)["checkpoint_names"] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    warm = tmp_path / "warm.cmd.h5"
    cmd("fit", hf_run, "-o", warm, "--modes", 3, "--samples", 200, "--warmup", 2, "--trajectory", tmp_path / "f.h5")
    watched, fitted = cmdtool.reconstruct(out), cmdtool.reconstruct(warm)
    assert all(torch.equal(watched[name], fitted[name]) for name in fitted)
    cmd("reconstruct", out, "-o", tmp_path / "out", "--at", "last")
    assert_loaded_equals_reconstruction(
        GPT2LMHeadModel.from_pretrained(tmp_path / "out" / "checkpoint-6").state_dict(), out)


HF_EVAL = """
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cmdtool.integrations.transformers import load_state_dict_into

model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained({config!r}))  # the run's config.json
model.eval()
ids = torch.stack([torch.arange(8) * k % 32 for k in (1, 2, 3)])


@torch.no_grad()
def evaluate(state):
    load_state_dict_into(model, state)  # lm_head.weight is absent: tied again, as from_pretrained does
    return {{"val": {{"loss": model(input_ids=ids, labels=ids).loss.item()}}}}
"""


def test_huggingface_eval_recipe(hf_run, tmp_path):
    """The documented ``--eval`` recipe for a Transformers model: ``cmd report`` scores the run's own
    checkpoints with it, and the original's score is the model's loss from ``from_pretrained``."""
    (tmp_path / "hf_eval.py").write_text(HF_EVAL.format(config=str(hf_run / "checkpoint-6")))
    mode_file = tmp_path / "run.cmd.h5"
    cmd("fit", hf_run, "-o", mode_file, "--modes", 3, "--samples", 200, "--trajectory", tmp_path / "traj.h5")
    report = json.loads(cmd("report", mode_file, "-o", tmp_path / "report", "--eval",
                            f"{tmp_path / 'hf_eval.py'}:evaluate", "--candidates-only", "--json").stdout)
    scores = report["evaluation"]["candidates"]
    ids = torch.stack([torch.arange(8) * k % 32 for k in (1, 2, 3)])
    with torch.no_grad():
        expected = GPT2LMHeadModel.from_pretrained(hf_run / "checkpoint-6").eval()(input_ids=ids, labels=ids).loss
    assert scores["last"]["val/loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert scores["cmd"]["val/loss"] != scores["last"]["val/loss"]


@pytest.fixture(scope="module")
def hf_sharded_run(hf_run, tmp_path_factory) -> Path:
    """The same checkpoints saved by ``save_pretrained(max_shard_size="2KB")``: several
    ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json`` per folder."""
    out = tmp_path_factory.mktemp("hf_sharded") / "output"
    for step in (2, 4, 6):
        source, target = hf_run / f"checkpoint-{step}", out / f"checkpoint-{step}"
        GPT2LMHeadModel.from_pretrained(source).save_pretrained(target, max_shard_size="2KB")
        shutil.copy(source / "trainer_state.json", target)
    return out


def test_huggingface_sharded_folder(hf_sharded_run, tmp_path):
    source = hf_sharded_run / "checkpoint-6"
    shards = sorted(p.name for p in source.glob("model-*.safetensors"))
    assert len(shards) > 1
    mode_file, [folder], _ = fit_and_reconstruct(hf_sharded_run, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in source.iterdir())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    source_index = json.loads((source / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == source_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in cmdtool.reconstruct(mode_file).values()
    )
    for shard in shards:
        assert safe_open(str(folder / shard), "pt").metadata() == {"format": "pt"}
    assert_loaded_equals_reconstruction(GPT2LMHeadModel.from_pretrained(folder).state_dict(), mode_file)


def test_huggingface_pytorch_model_bin_folder(hf_run, tmp_path):
    """Older Trainer output: ``pytorch_model.bin`` (a plain state dict) beside config.json."""
    run = tmp_path / "run"
    for step in (2, 4, 6):
        source, target = hf_run / f"checkpoint-{step}", run / f"checkpoint-{step}"
        target.mkdir(parents=True)
        for name in ("config.json", "trainer_state.json", "training_args.bin"):
            shutil.copy(source / name, target)
        torch.save(load_file(source / "model.safetensors"), target / "pytorch_model.bin")
    mode_file, [folder], _ = fit_and_reconstruct(run, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin", "trainer_state.json"]
    assert_loaded_equals_reconstruction(GPT2LMHeadModel.from_pretrained(folder).state_dict(), mode_file)


def test_huggingface_as_plain_safetensors(hf_run, tmp_path):
    mode_file, paths, stderr = fit_and_reconstruct(hf_run, tmp_path, fmt="safetensors")
    assert paths == [tmp_path / "out" / "checkpoint-6.safetensors"]
    assert safe_open(str(paths[0]), "pt").metadata() == {"format": "pt"}
    assert_loaded_equals_reconstruction(load_file(paths[0]), mode_file)
    assert "config.json" in stderr  # not written with --format safetensors, and the note says so


# --------------------------------------------------------------------------- Lightning


class TinyRegression(pl.LightningModule):
    def __init__(self, hidden: int = 4, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.Linear(hidden, 1)
        )

    def training_step(self, batch, index):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 2)]


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory) -> Path:
    """``ModelCheckpoint(save_top_k=-1, save_last=True)``: ``epoch=0-step=4.ckpt`` ...
    ``epoch=4-step=20.ckpt`` and ``last.ckpt``."""
    root = tmp_path_factory.mktemp("lightning")
    torch.manual_seed(0)
    x = torch.randn(32, 3)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=5,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_top_k=-1, save_last=True)],
    )
    trainer.fit(TinyRegression(hidden=5, lr=0.05), data)
    return root / "checkpoints"


def test_lightning_model_checkpoint_folder(lightning_run, tmp_path):
    found = discover(lightning_run)
    assert [(c.name, c.time, c.stack) for c in found.checkpoints] == [
        (f"epoch={e}-step={4 * (e + 1)}.ckpt", 4 * (e + 1), "lightning") for e in range(5)
    ]
    assert found.time_source == "global_step"
    assert [(s.path.name, s.reason) for s in found.skipped] == [
        ("last.ckpt", "Lightning's copy of the latest checkpoint (save_last)")
    ]

    mode_file, [path], stderr = fit_and_reconstruct(lightning_run, tmp_path)
    assert path.name == "epoch=4-step=20.ckpt"
    written = torch.load(path, weights_only=True)
    source = torch.load(lightning_run / path.name, weights_only=True)
    for key in ("epoch", "global_step", "pytorch-lightning_version", "hyper_parameters", "loops"):
        assert written[key] == source[key], key
    assert written["hyper_parameters"] == {"hidden": 5, "lr": 0.05}
    assert "optimizer_states" not in written and "lr_schedulers" not in written
    assert "optimizer_states" in stderr and "lr_schedulers" in stderr

    model = TinyRegression.load_from_checkpoint(path)
    assert model.hparams.hidden == 5 and model.hparams.lr == 0.05
    assert_loaded_equals_reconstruction(model.state_dict(), mode_file)
    assert int(model.state_dict()["net.1.num_batches_tracked"]) == 20  # carried verbatim


def test_ls_on_a_lightning_root_points_at_its_checkpoints(lightning_run, tmp_path):
    """``cmd ls`` on the run's root (``default_root_dir``) names the checkpoints folder, for
    ``ModelCheckpoint(dirpath=root/"checkpoints")`` and for the default logger's
    ``lightning_logs/version_0/checkpoints/``."""
    root = lightning_run.parent
    result = runner.invoke(app, ["ls", str(root)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: {root}: no checkpoint files found (looked for *.safetensors, *.pt, *.pth, *.bin, *.ckpt, *.pth.tar "
        f"and Hugging Face checkpoint-<step>/ folders, full or PEFT adapter, and torch.distributed.checkpoint "
        f"folders); this looks like a Lightning run: its "
        f"checkpoints are in {lightning_run}, try `cmd ls {lightning_run}`"]

    logged = tmp_path / "logged"
    trainer = pl.Trainer(max_epochs=2, default_root_dir=logged, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    x = torch.randn(8, 3)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    trainer.fit(TinyRegression(), torch.utils.data.DataLoader(data, batch_size=4))
    checkpoints = logged / "lightning_logs" / "version_0" / "checkpoints"
    assert [p.suffix for p in checkpoints.iterdir()] == [".ckpt"]
    result = runner.invoke(app, ["ls", str(logged)])
    assert result.exit_code == 2
    assert result.stderr.strip().endswith(f"its checkpoints are in {checkpoints}, try `cmd ls {checkpoints}`")
    cmd("ls", checkpoints)


# --------------------------------------------------------------------------- timm and plain scripts


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def train_states(epochs: int = 6) -> list[tuple[dict, dict]]:
    """Per epoch the model's state dict and an EMA of it, from a few real SGD steps."""
    torch.manual_seed(0)
    model, x, y = Small(), torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for _ in range(epochs):
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        ema = {k: (0.5 * ema[k] + 0.5 * v) if v.is_floating_point() else v.clone() for k, v in state.items()}
        out.append((state, ema))
    return out


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory) -> Path:
    """As timm's train.py writes: ``checkpoint-<epoch>.pth.tar`` with epoch, arch, state_dict,
    state_dict_ema, optimizer, version, metric; plus last.pth.tar, model_best.pth.tar and a
    recovery checkpoint."""
    run = tmp_path_factory.mktemp("timm") / "output"
    run.mkdir()
    for epoch, (state, ema) in enumerate(train_states()):
        checkpoint = {
            "epoch": epoch,
            "arch": "small",
            "state_dict": state,
            "state_dict_ema": ema,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
            "version": 2,
            "metric": 50.0 + epoch,
        }
        torch.save(checkpoint, run / f"checkpoint-{epoch}.pth.tar")
    shutil.copy(run / "checkpoint-5.pth.tar", run / "last.pth.tar")
    shutil.copy(run / "checkpoint-3.pth.tar", run / "model_best.pth.tar")
    shutil.copy(run / "checkpoint-2.pth.tar", run / "recovery-2-10.pth.tar")
    return run


@pytest.mark.parametrize("ema", [False, True], ids=["state_dict", "state_dict_ema"])
def test_timm_folder(timm_run, tmp_path, ema):
    found = discover(timm_run)
    assert [(c.name, c.time, c.stack) for c in found.checkpoints] == [
        (f"checkpoint-{e}.pth.tar", e, "timm") for e in range(6)
    ]
    assert sorted(s.path.name for s in found.skipped) == [
        "last.pth.tar",
        "model_best.pth.tar",
        "recovery-2-10.pth.tar",
    ]
    key = "state_dict_ema" if ema else "state_dict"
    mode_file, [path], stderr = fit_and_reconstruct(timm_run, tmp_path, *(["--ema"] if ema else []))
    assert path.name == "checkpoint-5.pth.tar"
    written = torch.load(path, weights_only=True)
    assert set(written) == {key, "epoch", "arch", "version", "metric"}
    assert (written["epoch"], written["arch"], written["version"], written["metric"]) == (5, "small", 2, 55.0)
    assert "optimizer" in stderr
    model = Small()
    model.load_state_dict(written[key], strict=True)
    assert_loaded_equals_reconstruction(model.state_dict(), mode_file)
    source = torch.load(timm_run / path.name, weights_only=True)[key]
    assert torch.allclose(model.fc.weight, source["fc.weight"], atol=0.05)  # a fit, not a copy


@pytest.mark.parametrize("wrap", ["ddp", "compile"])
def test_plain_folder_keeps_prefixes(tmp_path, wrap):
    """State dicts of a ``DistributedDataParallel`` (``module.``) or ``torch.compile``d
    (``_orig_mod.``) model, saved by a plain script; the written file has the same keys."""
    prefix = {"ddp": "module.", "compile": "_orig_mod."}[wrap]
    run = tmp_path / "run"
    run.mkdir()
    for epoch, (state, _) in enumerate(train_states()):
        torch.save({prefix + k: v for k, v in state.items()}, run / f"model_ep{epoch}.pt")
    torch.save({"lr": 0.1}, run / "optimizer.pt")  # training state: skipped, never loaded
    found = discover(run)
    assert [c.stack for c in found.checkpoints] == ["plain"] * 6
    assert [(s.path.name, s.reason) for s in found.skipped] == [
        ("optimizer.pt", "training state, not weights (not loaded)")
    ]
    mode_file, [path], _ = fit_and_reconstruct(run, tmp_path)
    written = torch.load(path, weights_only=True)
    assert all(k.startswith(prefix) for k in written)
    model = torch.nn.DataParallel(Small()) if wrap == "ddp" else torch.compile(Small())
    model.load_state_dict(written, strict=True)
    assert_loaded_equals_reconstruction(model.state_dict(), mode_file)
