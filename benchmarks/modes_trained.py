"""--refine and --modes auto on the benchmark layout: the trained ResNet-18 run of ``make bench``
(benchmarks/train.py: 11.2 M floats, 30 epochs of SGD on the digits data, BatchNorm, 63 % of the
floats frozen), three sampling seeds (issue 13). Trains the run first if ``make bench`` has not.

    python benchmarks/modes_trained.py    # about a minute once the run exists; writes modes_trained.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from train import train  # noqa: E402

import cmdtool  # noqa: E402

DATA = HERE / ".data"


def main() -> None:
    run = train(DATA / "resnet18-digits-T30")
    store, out = DATA / "modes-trained.trajectory.h5", DATA / "modes-trained.cmd.h5"
    rows = []
    for seed in (0, 1, 2):
        for modes in (10, "auto"):
            for refine in (0, 3):
                started = time.perf_counter()
                result = cmdtool.fit(run, out, modes=modes, seed=seed, refine=refine, trajectory=store, force=True)
                seconds = time.perf_counter() - started
                summary = result.summary
                curve = summary.get("error_curve") or {}
                rows.append({"seed": seed, "asked": modes, "refine": refine, "modes": summary["modes"],
                             "rel_error": summary["rel_error"], "seconds": seconds,
                             "store_reused": result.trajectory_reused, "curve": curve.get("rel_error")})
                print(f"seed {seed}  --modes {modes!s:4}  --refine {refine}:  M = {summary['modes']:2}  "
                      f"rel_error {summary['rel_error']:.4f}  ({seconds:.2f} s)")
    (HERE / "modes_trained.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
