"""Synthetic training trajectories with ResNet-18's exact state-dict layout, as safetensors files.

Dynamics (the structure CMD looks for): a few shared random-walk profiles ``p_k(t)`` with a step
size that decays like a learning-rate schedule; every float parameter follows one of them through
its own affine map plus independent noise::

    w_i(t) = w_i(0) + a_i · (p_{k_i}(t) − p_{k_i}(0)) + σ_i · ε_i(t)

``w_i(0)`` is a Kaiming-like initialisation per tensor (BatchNorm weights 1, running variances
near 1). ``num_batches_tracked`` counts steps. Generated checkpoint by checkpoint (memory: a few
bytes per parameter), seeded, and cached: a folder is reused when its ``DONE`` marker matches.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from resnet18 import n_floats, resnet18_layout
from safetensors.numpy import save_file

VERSION = 1
PROFILES = 5
STEPS_PER_EPOCH = 391  # CIFAR-10, batch 128


def _init_scale(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor's initial values."""
    if name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):
        return 1.0, 0.0
    if name.endswith(("bias", "running_mean")):
        return 0.0, 0.0 if "bn" in name or "downsample" in name else 0.01
    fan_in = math.prod(shape[1:])
    return 0.0, math.sqrt(2.0 / fan_in)


def generate(folder: Path, width: int = 1, T: int = 30, seed: int = 0) -> Path:
    """Write ``epoch_0.safetensors … epoch_{T-1}.safetensors`` into ``folder`` unless cached."""
    folder = Path(folder)
    marker = folder / "DONE"
    key = json.dumps({"version": VERSION, "width": width, "T": T, "seed": seed})
    if marker.exists() and marker.read_text() == key:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    layout = resnet18_layout(width)
    N = n_floats(layout)
    steps = rng.standard_normal((PROFILES, T)) * (0.3 + np.exp(-np.arange(T) / 8.0))
    profiles = np.cumsum(steps, axis=1)
    profiles -= profiles[:, :1]                                   # p_k(0) = 0
    start = np.empty(N, dtype=np.float32)
    slope = np.empty(N, dtype=np.float32)
    noise = np.empty(N, dtype=np.float32)
    which = rng.integers(0, PROFILES, size=N).astype(np.uint8)
    offset = 0
    for name, shape, dtype in layout:
        if not dtype.startswith("float"):
            continue
        size = math.prod(shape)
        mean, std = _init_scale(name, shape)
        scale = std if std > 0 else 0.05
        start[offset:offset + size] = mean + std * rng.standard_normal(size)
        slope[offset:offset + size] = 0.02 * scale * rng.standard_normal(size)
        noise[offset:offset + size] = 0.002 * scale * rng.exponential(1.0, size)
        offset += size
    for t in range(T):
        noisy = rng.standard_normal(N, dtype=np.float32)
        noisy *= noise
        values = start + slope * profiles[which, t].astype(np.float32) + (noisy if t else 0)
        tensors, offset = {}, 0
        for name, shape, dtype in layout:
            if dtype.startswith("float"):
                size = math.prod(shape)
                tensors[name] = values[offset:offset + size].reshape(shape)
                offset += size
            else:
                tensors[name] = np.array(t * STEPS_PER_EPOCH, dtype=np.int64)
        save_file(tensors, str(folder / f"epoch_{t}.safetensors"), metadata={"epoch": str(t)})
        del values, tensors
    marker.write_text(key)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("-T", type=int, default=30)
    args = parser.parse_args()
    print(generate(args.folder, args.width, args.T))
