"""Regenerate the sample checkpoints: train DigitsCNN on scikit-learn's digits.

Needs scikit-learn, an optional extra of the project (``pip install -e '.[samples]'``).
Writes only into this folder: ``heldout.npz`` and ``epoch_0.safetensors`` (initial
weights) through ``epoch_40.safetensors``. Deterministic on CPU.

    python sample_checkpoints/make_samples.py
"""

import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional as F

from model import HELDOUT_PATH, DigitsCNN, evaluate  # sibling module when run as a script

HERE = Path(__file__).resolve().parent

SEED = 0
EPOCHS = 40
BATCH_SIZE = 64
LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


def standardised_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 80/20 split of the digits, scaled to [0, 1] then standardised
    with the train-set pixel mean and std; images shaped (n, 1, 8, 8) float32."""
    digits = load_digits()
    images = (digits.images / 16.0)[:, None, :, :]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    mean, std = x_train.mean(), x_train.std()
    return (
        ((x_train - mean) / std).astype(np.float32),
        ((x_test - mean) / std).astype(np.float32),
        y_train.astype(np.int64),
        y_test.astype(np.int64),
    )


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


def main() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    x_train, x_test, y_train, y_test = standardised_split()
    np.savez(HELDOUT_PATH, X=x_test, y=y_test)
    for stale in HERE.glob("epoch_*.safetensors"):
        stale.unlink()

    images, labels = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(SEED)
    model = DigitsCNN()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )

    start = time.perf_counter()
    save_checkpoint(model, 0)
    print(f"epoch  0  heldout acc {evaluate(model.state_dict())['accuracy']:.4f}")
    for epoch in range(1, EPOCHS + 1):
        train_loss = train_one_epoch(model, optimizer, images, labels, generator)
        save_checkpoint(model, epoch)
        print(f"epoch {epoch:2d}  train loss {train_loss:.4f}  "
              f"heldout acc {evaluate(model.state_dict())['accuracy']:.4f}")
    print(f"trained {EPOCHS} epochs in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
