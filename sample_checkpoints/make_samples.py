"""Regenerate the sample checkpoints: train DigitsCNN on a small, noisy slice of scikit-learn's digits.

Needs scikit-learn, an optional extra of the project (``pip install -e '.[samples]'``).
Writes only into this folder: ``heldout.npz`` and ``epoch_0.safetensors`` (initial
weights) through ``epoch_40.safetensors``. Deterministic on CPU.

The task is deliberately not saturated: 400 training images, a fifth of their labels replaced by
random wrong ones, so held-out accuracy stays well below 100 % and the network ends up memorising
the noise. The remaining 1,397 images are held out, split in two: ``val`` (698) to choose a
checkpoint or a candidate, ``test`` (699) to report it without bias.

    python sample_checkpoints/make_samples.py
"""

import time
from pathlib import Path

import numpy as np
import torch
from model import HELDOUT_PATH, DigitsCNN, evaluate  # sibling module when run as a script
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent

SEED = 0
TRAIN_IMAGES = 400
LABEL_NOISE = 0.2  # share of training labels replaced by a uniformly drawn wrong class
EPOCHS = 40
BATCH_SIZE = 32
LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


def noisy_split() -> dict[str, np.ndarray]:
    """Stratified split of the digits into train / val / test, images scaled to [0, 1] then
    standardised with the train-set pixel mean and std, shaped (n, 1, 8, 8) float32; a
    ``LABEL_NOISE`` share of the training labels flipped to a random other class (seeded)."""
    digits = load_digits()
    images = (digits.images / 16.0)[:, None, :, :]
    x_train, x_heldout, y_train, y_heldout = train_test_split(
        images, digits.target, train_size=TRAIN_IMAGES, random_state=SEED, stratify=digits.target)
    x_val, x_test, y_val, y_test = train_test_split(
        x_heldout, y_heldout, test_size=0.5, random_state=SEED, stratify=y_heldout)
    rng = np.random.default_rng(SEED)
    flipped = rng.choice(len(y_train), size=round(LABEL_NOISE * len(y_train)), replace=False)
    y_train = y_train.copy()
    y_train[flipped] = (y_train[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    mean, std = x_train.mean(), x_train.std()
    scaled = {name: ((x - mean) / std).astype(np.float32)
              for name, x in (("x_train", x_train), ("x_val", x_val), ("x_test", x_test))}
    return {**scaled, "y_train": y_train.astype(np.int64), "y_val": y_val.astype(np.int64),
            "y_test": y_test.astype(np.int64)}


def train_one_epoch(model, optimizer, images, labels, generator) -> float:
    """One shuffled pass of minibatch SGD; returns the mean train loss."""
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    total_loss = 0.0
    for batch in order.split(BATCH_SIZE):
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(batch)
    return total_loss / len(labels)


def save_checkpoint(model, epoch: int) -> None:
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, HERE / f"epoch_{epoch}.safetensors", metadata={"epoch": str(epoch)})


def _line(scores: dict) -> str:
    return "  ".join(f"{split} acc {s['accuracy']:.4f} loss {s['loss']:.3f}" for split, s in scores.items())


def main() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    data = noisy_split()
    np.savez(HELDOUT_PATH, X_val=data["x_val"], y_val=data["y_val"], X_test=data["x_test"], y_test=data["y_test"])
    for stale in HERE.glob("epoch_*.safetensors"):
        stale.unlink()

    images, labels = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    generator = torch.Generator().manual_seed(SEED)
    model = DigitsCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    start = time.perf_counter()
    save_checkpoint(model, 0)
    print(f"epoch  0  {_line(evaluate(model.state_dict()))}")
    for epoch in range(1, EPOCHS + 1):
        train_loss = train_one_epoch(model, optimizer, images, labels, generator)
        save_checkpoint(model, epoch)
        print(f"epoch {epoch:2d}  train loss {train_loss:.4f}  {_line(evaluate(model.state_dict()))}")
    print(f"trained {EPOCHS} epochs in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
