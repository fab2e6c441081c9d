"""Test accuracy of plain SGD, post-hoc CMD, online CMD and embedded CMD on a digits task that does
not saturate: few training images, some of their labels wrong. Anyone can rerun it (CPU, minutes).

Data: scikit-learn's digits, the held-out 20 % of ``sample_checkpoints/`` (360 images) as the test
set; from the other 80 %, ``--train-images`` images drawn per seed, ``--noise`` of their labels
replaced by a random other class. Model: the sample run's ``DigitsCNN`` (23,274 floats, BatchNorm),
SGD (lr 0.05, momentum 0.9, weight decay 5e-4, batch 32), ``--epochs`` epochs, one observation per
epoch after the initial weights. Per seed:

- **plain SGD**: the weights after the last epoch;
- **post-hoc CMD**: CMD of the whole run (the warm-up is every observation, i.e. ``cmd fit`` of all
  epoch checkpoints), reconstructed at the last epoch;
- **online CMD**: warm-up ``F`` epochs, then exact updates of ``a, b`` (``cmd fit --warmup F``),
  reconstructed at the last epoch; the same training run as plain SGD;
- **embedded CMD**: a second run from the same initial weights and batch order, with
  ``EmbeddedCMD`` embedding ``P`` % of all parameters every ``L`` epochs after the warm-up
  (``relative=False``, the authors' default); scored on the weights the model holds at the end
  (embedded parameters at ``a·r(t) + b``, the others as SGD left them).

    python benchmarks/embedded_digits.py [--seeds 0 1 2] [--epochs 60] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_checkpoints"))
from model import DigitsCNN, accuracy_and_loss  # noqa: E402

from cmdtool.training import EmbeddedCMD  # noqa: E402

METHODS = ("plain SGD", "post-hoc CMD", "online CMD", "embedded CMD")


def split(seed: int, train_images: int, noise: float):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    images = (data.images / 16.0)[:, None, :, :]
    x_pool, x_test, y_pool, y_test = train_test_split(images, data.target, test_size=0.2, random_state=0,
                                                      stratify=data.target)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(y_pool), size=train_images, replace=False)
    x_train, y_train = x_pool[chosen], y_pool[chosen].copy()
    flipped = rng.random(train_images) < noise
    y_train[flipped] = (y_train[flipped] + rng.integers(1, 10, flipped.sum())) % 10  # a wrong class
    mean, std = x_train.mean(), x_train.std()
    tensor = lambda a: torch.from_numpy(((a - mean) / std).astype(np.float32))  # noqa: E731
    return (tensor(x_train), torch.from_numpy(y_train.astype(np.int64)), tensor(x_test),
            torch.from_numpy(y_test.astype(np.int64)))


def train(seed, data, epochs, observers, embedded: EmbeddedCMD | None = None):
    x, y = data[0], data[1]
    torch.manual_seed(seed)
    model = DigitsCNN()
    if embedded is not None:
        embedded.model = model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    cmds = [make(model) for make in observers] + ([embedded] if embedded else [])
    if embedded is not None:
        embedded.attach(optimizer)
    for cmd in cmds:
        cmd.observe("epoch_0.safetensors", 0)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in torch.randperm(len(y), generator=generator).split(32):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for cmd in cmds:
            cmd.observe(f"epoch_{epoch}.safetensors", epoch)
    return model, cmds


def score(state: dict, data) -> float:
    model = DigitsCNN()
    model.load_state_dict(state, strict=True)
    return accuracy_and_loss(model, data[2], data[3])["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--train-images", type=int, default=150)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--modes", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--percent", type=float, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rows = []
    for seed in args.seeds:
        data = split(seed, args.train_images, args.noise)
        T = args.epochs + 1
        model, (posthoc, online) = train(seed, data, args.epochs, [
            lambda m: EmbeddedCMD(m, modes=args.modes, warmup=T),
            lambda m: EmbeddedCMD(m, modes=args.modes, warmup=args.warmup)])
        embedded = EmbeddedCMD(None, modes=args.modes, warmup=args.warmup, embed_window=args.window,
                               embed_percent=args.percent, relative=False)
        embedded_model, _ = train(seed, data, args.epochs, [], embedded)
        row = {"seed": seed, "plain SGD": score(model.state_dict(), data),
               "post-hoc CMD": score(posthoc.reconstruct(), data), "online CMD": score(online.reconstruct(), data),
               "embedded CMD": score(embedded_model.state_dict(), data),
               "embedded CMD, its CMD weights": score(embedded.reconstruct(), data),
               "embedded_fraction": embedded.embedded_fraction,
               "embedded_of_all_floats": float(embedded.state.embedded.sum()) / embedded.layout.n_parameters,
               "rel_error": {"post-hoc": posthoc.rel_error, "online": online.rel_error,
                             "embedded": embedded.rel_error}}
        rows.append(row)
        print(json.dumps(row))
    print(f"\n{len(rows)} seeds, {args.train_images} training images, {100 * args.noise:.0f} % wrong labels, "
          f"{args.epochs} epochs; CMD M = {args.modes}, F = {args.warmup}, L = {args.window}, P = {args.percent:g} % "
          f"of all")
    print("| method | test accuracy, mean ± std | per seed |")
    print("| --- | ---: | --- |")
    for method in (*METHODS, "embedded CMD, its CMD weights"):
        values = [r[method] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {method} | {statistics.mean(values):.4f} ± {spread:.4f} | "
              + ", ".join(f"{v:.4f}" for v in values) + " |")
    fractions = [r["embedded_fraction"] for r in rows]
    print(f"embedded at the end: {', '.join(f'{100 * f:.1f} %' for f in fractions)} of the trainable parameters")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
