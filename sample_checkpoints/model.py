"""Small CNN for the 8x8 scikit-learn digits, plus held-out evaluation on a validation and a test split.

Needs only torch and numpy; the held-out splits are read from ``heldout.npz``
next to this file (written by ``make_samples.py``).
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HELDOUT_PATH = Path(__file__).with_name("heldout.npz")
SPLITS = ("val", "test")


class DigitsCNN(nn.Module):
    """Three conv+BatchNorm layers and a two-layer head: 1x8x8 image -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, kernel_size=3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(images)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 8x8 -> 4x4
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)  # 4x4 -> 2x2
        return self.fc2(F.relu(self.fc1(x.flatten(start_dim=1))))


def load_heldout(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return one held-out split (``"val"`` or ``"test"``): images (n, 1, 8, 8) float32, normalised,
    and labels (n,) int64."""
    with np.load(HELDOUT_PATH) as data:
        return torch.from_numpy(data[f"X_{split}"]), torch.from_numpy(data[f"y_{split}"])


def accuracy_and_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy and mean cross-entropy of ``model`` in eval mode, without gradients, and the number of
    examples scored (``count``: ``cmd report`` uses it to tell differences from sampling noise)."""
    model.eval()
    with torch.no_grad():
        logits = model(images)
    return {
        "accuracy": (logits.argmax(dim=1) == labels).float().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "count": len(labels),  # examples scored: the report's sampling error of the accuracy
    }


def evaluate(state_dict: dict[str, torch.Tensor]) -> dict:
    """Load ``state_dict`` (strictly) into a DigitsCNN and score it on both held-out splits.

    Accepts e.g. ``safetensors.torch.load_file(path)``; returns
    ``{"val": {"accuracy", "loss", "count"}, "test": {"accuracy", "loss", "count"}}``: choose on ``val``,
    report ``test``.
    """
    model = DigitsCNN()
    model.load_state_dict(state_dict, strict=True)
    return {split: accuracy_and_loss(model, *load_heldout(split)) for split in SPLITS}
