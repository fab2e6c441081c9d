"""Lightning ``WeightAveraging`` checkpoints (Lightning >= 2.5), written by the real callback: the
trained weights (``current_model_state``) are modelled, ``--ema`` models the average (``state_dict``),
and write-back puts the reconstruction under both keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cmdtool
from helpers import cmd, ok
from test_dcp import assert_same_fit

pl = pytest.importorskip("lightning.pytorch")
WeightAveraging = pytest.importorskip("lightning.pytorch.callbacks").WeightAveraging
torch.set_num_threads(1)


class Regression(pl.LightningModule):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory) -> Path:
    """Six epochs of four steps, an EMA of the weights kept by WeightAveraging, a checkpoint every epoch."""
    from torch.optim.swa_utils import get_ema_avg_fn

    root = tmp_path_factory.mktemp("wa")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    y = x @ torch.randn(4, 1, generator=generator) + 0.1 * torch.randn(64, 1, generator=generator)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    torch.manual_seed(0)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(max_epochs=6, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root,
                         callbacks=[WeightAveraging(avg_fn=get_ema_avg_fn(0.7)), checkpoints])
    trainer.fit(Regression(), loader)
    return root / "checkpoints"


def control_run(folder: Path, run: Path, key: str) -> Path:
    """The weights stored under ``key`` of each checkpoint, as plain torch files with the same steps."""
    folder.mkdir()
    for path in sorted(run.iterdir()):
        saved = torch.load(path, weights_only=True)
        torch.save({"state_dict": saved[key], "global_step": saved["global_step"]},
                   folder / f"step_{saved['global_step']}.pt")
    return folder


def fit(runner, tmp_path, run, out, *extra):
    return ok(cmd(runner, "fit", run, "-o", out, "-m", "3", "--trajectory", tmp_path / f"{out.stem}.h5", *extra))


def test_the_trained_weights_are_modelled_and_ema_models_the_average(runner, tmp_path, averaged_run):
    first = torch.load(sorted(averaged_run.iterdir())[1], weights_only=True)
    assert first["current_model_state"].keys() == first["state_dict"].keys()
    assert not torch.equal(first["current_model_state"]["net.0.weight"], first["state_dict"]["net.0.weight"])

    listing = ok(cmd(runner, "ls", averaged_run)).stdout
    assert ("epoch=5-step=24.ckpt  lightning torch, WeightAveraging: the trained weights (current_model_state) are "
            "modelled, --ema the average") in listing
    result = fit(runner, tmp_path, averaged_run, tmp_path / "trained.cmd.h5")
    assert ("note: Lightning WeightAveraging checkpoints: modelled the trained weights (current_model_state); --ema "
            "models the average (state_dict)") in result.stderr
    fit(runner, tmp_path, control_run(tmp_path / "trained", averaged_run, "current_model_state"),
        tmp_path / "trained-control.cmd.h5")
    assert_same_fit(tmp_path / "trained.cmd.h5", tmp_path / "trained-control.cmd.h5")

    result = fit(runner, tmp_path, averaged_run, tmp_path / "average.cmd.h5", "--ema")
    assert "modelled the average (state_dict), as --ema asks" in result.stderr
    fit(runner, tmp_path, control_run(tmp_path / "average", averaged_run, "state_dict"),
        tmp_path / "average-control.cmd.h5")
    assert_same_fit(tmp_path / "average.cmd.h5", tmp_path / "average-control.cmd.h5")


@pytest.mark.parametrize("ema", [False, True], ids=["trained", "average"])
def test_write_back_puts_the_reconstruction_under_both_keys(runner, tmp_path, averaged_run, ema):
    mode_file = tmp_path / "m.cmd.h5"
    fit(runner, tmp_path, averaged_run, mode_file, *(["--ema"] if ema else []))
    result = ok(cmd(runner, "reconstruct", mode_file, "-o", tmp_path / "out", "--at", "2"))
    [written] = result.stdout.split()
    assert Path(written).name == "epoch=2-step=12.ckpt"
    assert "averaging_state" in result.stderr and "optimizer_states" in result.stderr  # not restored, said so
    saved = torch.load(written, weights_only=True)
    expected = cmdtool.reconstruct(mode_file, at=2)
    for key in ("state_dict", "current_model_state"):
        assert saved[key].keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(saved[key][name], value), (key, name)
    assert "averaging_state" not in saved and saved["global_step"] == 12
    loaded = Regression.load_from_checkpoint(written)  # Lightning's own loader takes it
    assert torch.equal(loaded.net[0].weight.detach(), expected["net.0.weight"])
