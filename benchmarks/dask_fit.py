"""The fit on Dask (README "Running on a cluster"): wall time and bytes moved with 1 and 2 workers
against the single-process fit, on the run of ``make bench`` (``--width 2``: the 4× run), and the
option of reading the columns straight from the safetensors checkpoints instead of building a store.

Timings are in-process (no interpreter start-up), from a warm page cache (the checkpoints were just
written or read), one repeat each unless ``--repeats``. Bytes moved are counted by the tasks:
checkpoint bytes the ingest tasks read, store bytes the fit tasks read, result bytes sent back to
the client (labels, a, b and the per-tile sums); with a shared filesystem the first two cross the
network once each, the last always does.

    python benchmarks/dask_fit.py [--width 1] [--workers 1 2] [--data DIR] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from generate import generate  # noqa: E402

import cmdtool  # noqa: E402
from cmdtool.checkpoints import discover  # noqa: E402
from cmdtool.distributed import Engine, prepare_sharded_store  # noqa: E402
from cmdtool.fitting import fit_trajectory  # noqa: E402
from cmdtool.modefile import open_mode_file, write_mode_file  # noqa: E402
from cmdtool.modes import FitSettings  # noqa: E402
from cmdtool.shards import ColumnReader  # noqa: E402
from cmdtool.trajectory import Trajectory, read_signatures  # noqa: E402


class CheckpointColumns:
    """``W[:, start:stop]`` read straight from the checkpoints (no store): T slices per tile."""

    def __init__(self, checkpoints, layout):
        self.checkpoints, self.layout = checkpoints, layout
        self.shape = (len(checkpoints), layout.n_parameters)
        self.bytes_read = 0

    def __getitem__(self, key):
        rows, columns = key
        readers = [ColumnReader(c, self.layout) for c in self.checkpoints]
        try:
            if isinstance(columns, slice):
                stop = min(columns.stop or self.shape[1], self.shape[1])
                out = np.stack([r.read(columns.start or 0, stop) for r in readers])
            else:  # the sample: one small range per column (slow, but K columns only)
                out = np.stack([np.array([r.read(int(i), int(i) + 1)[0] for i in columns]) for r in readers])
        finally:
            for r in readers:
                r.close()
        self.bytes_read += sum(r.bytes_read for r in readers)
        return out[rows]


def direct_fit(folder: Path, settings: FitSettings, width: int) -> dict:
    """The fit with its columns read from the safetensors files: one pass for ``varies``, one to fit."""
    started = time.perf_counter()
    checkpoints = discover(folder).checkpoints
    layout, infos = read_signatures(checkpoints, (), ())
    W = CheckpointColumns(checkpoints, layout)
    varies = np.zeros(layout.n_parameters, dtype=bool)
    for start in range(0, layout.n_parameters, width):
        block = W[:, start:start + width]
        varies[start:start + width] = (block[1:] != block[0]).any(axis=0)
    source = Trajectory(layout, np.array([c.time for c in checkpoints]), [c.name for c in checkpoints], infos,
                        varies, W)
    source.carried = lambda name: np.zeros((len(checkpoints), 0), dtype=np.uint8)
    source.attachments = lambda: {}
    modes = fit_trajectory(source, settings)
    return {"seconds": round(time.perf_counter() - started, 2), "checkpoint_bytes_read": W.bytes_read,
            "labels": modes.labels, "a": modes.a, "b": modes.b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1, help="1: the make bench run; 2: its 4x run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--data", type=Path, default=HERE / ".data")
    parser.add_argument("--output", type=Path, default=HERE / "dask_fit.json")
    parser.add_argument("--skip-direct", action="store_true")
    args = parser.parse_args()
    name = "resnet18-T30" if args.width == 1 else "resnet18x4-T30"
    folder = generate(args.data / name, width=args.width)
    work = args.data / f"out-distributed-{name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    checkpoint_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    results = {"run": name, "checkpoint_bytes": checkpoint_bytes, "load_average_before": os.getloadavg(),
               "cpus": os.cpu_count()}

    started = time.perf_counter()
    cmdtool.fit(folder, work / "single.cmd.h5", trajectory=work / "single.h5")
    built = time.perf_counter() - started
    started = time.perf_counter()
    cmdtool.fit(folder, work / "single.cmd.h5", trajectory=work / "single.h5", force=True)
    results["single_process"] = {"fit_from_scratch_s": round(built, 2),
                                 "fit_store_reused_s": round(time.perf_counter() - started, 2)}
    with open_mode_file(work / "single.cmd.h5") as m:
        expected = m.parameters(slice(None))
        N, T = m.N, m.T
    results.update(N=N, T=T)

    settings = FitSettings(source=str(folder))
    for workers in args.workers:
        started = time.perf_counter()
        with Engine.start(workers=workers) as engine:
            cluster_s = time.perf_counter() - started
            started = time.perf_counter()
            prepared = prepare_sharded_store(engine, folder, trajectory=work / f"sharded-{workers}")
            ingest_s = time.perf_counter() - started
            started = time.perf_counter()
            modes = fit_trajectory(prepared.store, settings.replace(trajectory=str(prepared.path)),
                                   map_tiles=engine.map_tiles(prepared.store))
            write_mode_file(work / f"dask-{workers}.cmd.h5", modes)
            fit_s = time.perf_counter() - started
            same = all(np.array_equal(x, y) for x, y in zip(expected, (modes.labels, modes.a, modes.b)))
            results[f"workers_{workers}"] = {
                "cluster_start_s": round(cluster_s, 2), "ingest_s": round(ingest_s, 2), "fit_s": round(fit_s, 2),
                "shards": len(prepared.store.bounds) - 1, **engine.stats, "labels_a_b_equal_single": same}
        shutil.rmtree(work / f"sharded-{workers}")
        print(workers, results[f"workers_{workers}"], flush=True)

    if not args.skip_direct:
        direct = direct_fit(folder, settings, cmdtool.fitting.tile_width(T))
        same = all(np.array_equal(x, y) for x, y in zip(expected, (direct.pop("labels"), direct.pop("a"),
                                                                     direct.pop("b"))))
        results["direct_from_safetensors"] = {**direct, "labels_a_b_equal_single": same}
    results["load_average_after"] = os.getloadavg()
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
