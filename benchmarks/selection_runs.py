"""Selection-honest evaluation, --modes auto and --refine measured on small real runs (issue 13).

Runs: the shipped sample run (sample_checkpoints/) and a harder one of our own, three seeds: an MLP
(64 -> 256 -> 256 -> 10, 83,466 parameters, no BatchNorm) trained with SGD on 400 of scikit-learn's
digits with 20 % wrong labels, held-out data split into val / test as the sample run's. For each run:
the fit error at M = 2, 5, 10, 20 with and without refinement (and its time), the --modes auto
curve, and the selection table of `cmd report --select accuracy` at M = 10 (default refinement).
Needs scikit-learn. Writes benchmarks/selection_results.json.

    python benchmarks/selection_runs.py [--out DIR]   # a few minutes on one core
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sample_checkpoints"))

import cmdtool  # noqa: E402
from cmdtool.report import make_report  # noqa: E402

EPOCHS, BATCH, LR, MOMENTUM, WEIGHT_DECAY = 40, 32, 0.05, 0.9, 5e-4
MS = (2, 5, 10, 20)
PASSES = 3


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def train_mlp(folder: Path, seed: int) -> Path:
    """The harder run: make_samples.py's data recipe (400 images, 20 % noise) with this seed."""
    import make_samples
    make_samples.SEED = seed
    data = make_samples.noisy_split()
    np.savez(folder.parent / "heldout.npz", **{k: v for k, v in data.items() if not k.endswith("train")})
    torch.manual_seed(seed)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    x, y = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(EPOCHS + 1):
        if epoch:
            model.train()
            for batch in torch.randperm(len(y), generator=generator).split(BATCH):
                loss = F.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / f"epoch_{epoch}.safetensors")
    return folder


def mlp_evaluate(folder: Path):
    with np.load(folder.parent / "heldout.npz") as data:
        splits = {s: (torch.from_numpy(data[f"x_{s}"]), torch.from_numpy(data[f"y_{s}"])) for s in ("val", "test")}

    def evaluate(state):
        model = MLP()
        model.load_state_dict(state, strict=True)
        model.eval()
        out = {}
        with torch.no_grad():
            for split, (x, y) in splits.items():
                logits = model(x)
                out[split] = {"accuracy": (logits.argmax(1) == y).float().mean().item(),
                              "loss": F.cross_entropy(logits, y).item()}
        return out
    return evaluate


def measure(name: str, folder: Path, evaluate, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    store = work / "t.h5"
    cmdtool.fit(folder, work / "warm.cmd.h5", modes=2, trajectory=store, force=True)  # build the store once
    fits = []
    for M in MS:
        for passes in (0, PASSES):
            start = time.perf_counter()
            s = cmdtool.fit(folder, work / f"m{M}r{passes}.cmd.h5", modes=M, refine=passes, trajectory=store,
                            force=True).summary
            fits.append({"M": M, "refine": passes, "modes": s["modes"], "rel_error": s["rel_error"],
                         "rel_error_displacement": s["rel_error_displacement"],
                         "seconds": time.perf_counter() - start})
    auto = {}
    for passes in (0, PASSES):
        s = cmdtool.fit(folder, work / f"auto{passes}.cmd.h5", modes="auto", refine=passes, trajectory=store,
                        force=True).summary
        auto[passes] = {"chosen": s["modes"], "curve": s["error_curve"], "rel_error": s["rel_error"]}
    report = make_report(work / f"m10r{PASSES}.cmd.h5", work / "report", evaluate=evaluate, eval_spec=name,
                         select="accuracy", force=True).report
    evaluation = report["evaluation"]
    return {"name": name, "fits": fits, "auto": auto, "selection": evaluation["selection"],
            "last": evaluation["candidates"], "evaluations": evaluation["evaluations"],
            "pca": report["baselines"]["pca"], "cmd_fit": report["fit"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / ".selection")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from model import evaluate as sample_evaluate
    results = [measure("sample run (DigitsCNN)", ROOT / "sample_checkpoints", sample_evaluate, args.out / "sample")]
    for seed in (0, 1, 2):
        folder = args.out / f"mlp_seed{seed}" / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        train_mlp(folder, seed)
        work = args.out / f"mlp_seed{seed}" / "work"
        results.append(measure(f"MLP seed {seed}", folder, mlp_evaluate(folder), work))
    (ROOT / "benchmarks" / "selection_results.json").write_text(json.dumps(results, indent=1) + "\n")
    for r in results:
        print(f"\n## {r['name']}")
        for f in r["fits"]:
            print(f"M={f['M']:2d} refine={f['refine']}  modes {f['modes']:2d}  rel_error {f['rel_error']:.4f}  "
                  f"displacement {f['rel_error_displacement']:.4f}  {f['seconds']:.2f}s")
        for passes, a in r["auto"].items():
            print(f"auto refine={passes}: M={a['chosen']} rel_error {a['rel_error']:.4f} curve "
                  + " ".join(f"{m}:{e:.3f}" for m, e in zip(a["curve"]["modes"], a["curve"]["rel_error"])))
        s = r["selection"]
        for row in s["rows"]:
            print(f"{'*' if row['family'] == s['chosen'] else ' '} {row['family']:8s} epoch {row['epoch']:2d}  "
                  f"val {row['scores']['val/accuracy']:.4f}  test {row['scores']['test/accuracy']:.4f}")


if __name__ == "__main__":
    main()
