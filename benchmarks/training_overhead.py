"""Overhead of cmdtool.training per epoch on the ResNet-18 layout (11.2 M floats), CPU.

Trains torchvision's ``resnet18(num_classes=10)`` (``train.resnet18_model``, with the state-dict names
and shapes of ``benchmarks/resnet18.py``; torchvision is not needed) on the sample task, the digits of
``sample_checkpoints/`` (1,437 training images of 8×8, grey replicated to 3 channels, batch 64,
SGD with momentum), with ``EmbeddedCMD`` attached, and times inside the training loop: the epoch's
training steps, ``observe()`` at the epoch's end, and ``step()`` after every optimizer step (setting
the embedded parameters). Warm-up F = 3, then embedding windows every L = 2 epochs of P = 10 %.

    python benchmarks/training_overhead.py [--epochs 8] [--threads 1] [--size 8] [--embed-percent 10] [--json out.json]

Besides the ratios to the epoch it times, right after each observation (the same load), the floor
unit of this machine: one in-place ``a.add_(b)`` over N float64 values (median of 3), and states the
online update in those units.

``--size 32`` upsamples the images to CIFAR's 32×32 (the paper's ResNet-18 setting): the same
CMD cost against an epoch about 10× longer.

Needs scikit-learn for the digits. Prints one row per epoch and the ratios the README quotes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resnet18 import resnet18_layout  # noqa: E402
from train import resnet18_model  # noqa: E402

from cmdtool.online.least_squares import BLOCK  # noqa: E402
from cmdtool.training import EmbeddedCMD  # noqa: E402


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The sample task's training split (as sample_checkpoints/make_samples.py makes it)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    images = (data.images / 16.0)[:, None, :, :]
    x, _, y, _ = train_test_split(images, data.target, test_size=0.2, random_state=0, stratify=data.target)
    x = ((x - x.mean()) / x.std()).astype(np.float32)
    return torch.from_numpy(x).repeat(1, 3, 1, 1), torch.from_numpy(y.astype(np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=8, help="image side: 8 (the digits as they are) or e.g. 32")
    parser.add_argument("--embed-percent", type=float, default=10.0, help="P; 0 = online CMD only (no windows)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    update = f"update_parameters on torch tensors (blocks of {BLOCK} columns)"
    model = resnet18_model(nn)
    layout = [(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in model.state_dict().items()]
    assert layout == resnet18_layout(), "not torchvision's ResNet-18 layout"
    x, y = digits()
    if args.size != 8:
        x = F.interpolate(x, size=(args.size, args.size), mode="bilinear", align_corners=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    cmd = EmbeddedCMD(model, modes=10, warmup=3, embed_window=2, embed_percent=args.embed_percent)
    step_time = [0.0]
    n_floats = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    floor_buffers = (torch.rand(n_floats, dtype=torch.float64), torch.rand(n_floats, dtype=torch.float64))

    def timed_step(*_):
        start = time.perf_counter()
        cmd.step()
        step_time[0] += time.perf_counter() - start

    optimizer.register_step_post_hook(timed_step)
    generator = torch.Generator().manual_seed(0)
    rows = []
    print("epoch  train_s  observe_s  step_s  embedded  note")
    for epoch in range(args.epochs):
        step_time[0] = 0.0
        start = time.perf_counter()
        model.train()
        for batch in torch.randperm(len(y), generator=generator).split(64):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train = time.perf_counter() - start - step_time[0]
        before = cmd.T
        start = time.perf_counter()
        cmd.observe(f"epoch_{epoch}.safetensors", epoch)
        observe = time.perf_counter() - start
        T = cmd.T
        note = ("warm-up (kept on the CPU)" if T < 3 else "warm-up fit" if T == 3 else
                "window" if args.embed_percent > 0 and (T - 3) % 2 == 0 else "online update")
        floor = floor_unit(floor_buffers, repeat=3)  # right after the observation, under the same load
        rows.append(dict(epoch=epoch, train_s=train, observe_s=observe, step_s=step_time[0], floor_s=floor,
                         embedded=cmd.embedded_fraction, note=note, observations=before + 1))
        print(f"{epoch:5d}  {train:7.2f}  {observe:9.3f}  {step_time[0]:6.3f}  {cmd.embedded_fraction:8.3f}  {note}")
    epoch_s = statistics.median(r["train_s"] for r in rows)
    # Once parameters are embedded their gradients are masked inside backward: part of train_s.
    plain = [r["train_s"] for r in rows if r["embedded"] == 0 and r["note"] != "window"]
    hooked = [r["train_s"] for r in rows[1:] if rows[r["epoch"] - 1]["embedded"] > 0]
    online = [r["observe_s"] for r in rows if r["note"] == "online update"]
    windows = [r["observe_s"] for r in rows if r["note"] == "window"]
    steps = [r["step_s"] for r in rows if r["embedded"] > 0][1:] or [0.0]
    floats = n_floats
    floor_s = statistics.median(r["floor_s"] for r in rows)
    shares = [r["observe_s"] / r["train_s"] for r in rows if r["note"] == "online update"]
    units = [r["observe_s"] / r["floor_s"] for r in rows if r["note"] == "online update"]
    summary = dict(size=args.size, parameters=floats, threads=args.threads, embed_percent=args.embed_percent,
                   update=update, epoch_s=epoch_s, floor_add_s=floor_s,
                   epoch_before_embedding_s=statistics.median(plain) if plain else None,
                   epoch_with_embedded_s=statistics.median(hooked) if hooked else None,
                   online_share_per_epoch_median=statistics.median(shares) if shares else None,
                   online_floor_units_median=statistics.median(units) if units else None,
                   online_observe_s=statistics.median(online) if online else None,
                   window_observe_s=statistics.median(windows) if windows else None,
                   warmup_fit_s=next((r["observe_s"] for r in rows if r["note"] == "warm-up fit"), None),
                   warmup_keep_s=statistics.median(r["observe_s"] for r in rows if r["note"].startswith("warm-up (")),
                   embedded_step_s_per_epoch=statistics.median(steps), rows=rows)
    print(f"\nResNet-18 layout, {summary['parameters']:,} floats, {args.threads} thread(s), {args.size}×{args.size} "
          f"images; "
          f"training epoch (median) {epoch_s:.2f} s; the update: {update}")
    if hooked and plain:
        print(f"training epoch before any embedding {summary['epoch_before_embedding_s']:.2f} s, with embedded "
              f"parameters (their gradients masked in backward) {summary['epoch_with_embedded_s']:.2f} s (medians)")
    if online:
        print(f"online CMD, one observe per epoch: {summary['online_observe_s']:.3f} s = "
              f"{100 * summary['online_observe_s'] / epoch_s:.1f} % of an epoch (median of the per-epoch "
              f"ratios {100 * summary['online_share_per_epoch_median']:.1f} %), "
              f"{summary['online_floor_units_median']:.1f} floor units (median of the per-epoch ratios)")
    print(f"floor unit: one a.add_(b) over {floats:,} float64 values, {1000 * floor_s:.1f} ms (epochs median)")
    if windows:
        print(f"an observe with an embedding window: {summary['window_observe_s']:.3f} s = "
              f"{100 * summary['window_observe_s'] / epoch_s:.1f} % of an epoch")
    step_s = summary["embedded_step_s_per_epoch"]
    print(f"step() after every optimizer step once parameters are embedded: {step_s:.3f} s per epoch = "
          f"{100 * step_s / epoch_s:.1f} %")
    fit = "not reached (fewer epochs than F = 3)" if summary["warmup_fit_s"] is None else \
        f"{summary['warmup_fit_s']:.2f} s"
    print(f"warm-up: keeping an observation {summary['warmup_keep_s']:.3f} s, the fit {fit} "
          f"(once)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


def floor_unit(buffers: tuple[torch.Tensor, torch.Tensor], repeat: int = 7) -> float:
    """Seconds of one in-place ``a.add_(b)`` over N float64 values (median of ``repeat``): the cost of
    one pass over the parameters' float64 state, against which the online update is measured."""
    a, b = buffers
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        a.add_(b)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
