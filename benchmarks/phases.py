"""Where the time of one ``cmdtool.fit`` goes, phase by phase, inside one fresh process.

Wraps the functions that carry each phase (by name, in every loaded ``cmdtool`` module, so that
it works on older checkouts too: run it with ``PYTHONPATH`` set to the checkout to measure) and
prints one JSON object of seconds. ``--cold`` removes the store first, so that it is built.

    PYTHONPATH=CHECKOUT python benchmarks/phases.py CKPT_DIR STORE OUT.cmd.h5 [--cold] [--repeats 3]

Phases: ``imports`` (``import cmdtool.cli``, what ``cmd`` imports before it works), ``discover``
(finding the checkpoints, reading each header, the fingerprint), ``ingest`` (building the store;
of it ``ingest_read`` reading tensors, ``ingest_write`` writing rows, ``ingest_finite`` the NaN/Inf
check), ``sample``, ``cluster`` (correlation, clustering with its imports, references), ``fit_pass``
(``fit_tile`` over all tiles), ``write`` (the mode file) and ``other`` (the rest of the call).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

PHASES = {  # function or method name -> phase
    "discover": "discover", "read_signatures": "discover", "fingerprint": "discover",
    "build_store": "ingest", "float32_values": "ingest_read", "read_float32": "ingest_read",
    "raw_bytes": "ingest_read", "write": "ingest_write", "_check_finite": "ingest_finite",
    "check_finite": "ingest_finite", "sample_parameters": "sample", "correlation_matrix": "cluster",
    "cluster": "cluster", "choose_references": "cluster", "fit_tile": "fit_pass",
    "write_mode_file": "write", "write_tile": "write", "finish": "write", "write_carried": "write",
}
CLASSES = ("CheckpointReader", "FolderReader", "_RowWriter", "ModeFileWriter")


def instrument(spent: dict) -> None:
    """Wrap every function of ``PHASES`` found in a loaded cmdtool module (and the methods of
    ``CLASSES``); time spent inside a wrapped call is not counted again in an enclosing one."""
    stack: list[str] = []

    def wrap(function, phase):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            if stack and stack[-1] == phase:
                return function(*args, **kwargs)
            stack.append(phase)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                stack.pop()
                spent[phase] += elapsed
                if stack:
                    spent[f"-{stack[-1]}"] += elapsed  # to subtract from the enclosing phase
        return timed

    for name, module in list(sys.modules.items()):
        if not name.startswith("cmdtool") or module is None:
            continue
        for attribute, phase in PHASES.items():
            value = getattr(module, attribute, None)
            if callable(value) and not isinstance(value, type) and attribute != "write":
                setattr(module, attribute, wrap(value, phase))
        for cls_name in CLASSES:
            cls = getattr(module, cls_name, None)
            if isinstance(cls, type) and not getattr(cls, "_instrumented", False):
                cls._instrumented = True
                for attribute, phase in PHASES.items():
                    if attribute in vars(cls):
                        setattr(cls, attribute, wrap(vars(cls)[attribute], phase))


def one(folder: str, store: str, out: str, cold: bool) -> dict:
    start = time.perf_counter()
    import cmdtool.cli  # noqa: F401  (what `cmd` imports before it starts working)
    import cmdtool.pipeline  # noqa: F401
    spent = defaultdict(float)
    spent["imports"] = time.perf_counter() - start
    import cmdtool
    for name in ("trajectory", "stores", "fitting", "decompose", "modefile", "checkpoints", "checkpoints.formats",
                 "checkpoints.discover"):
        try:
            __import__(f"cmdtool.{name}")
        except ImportError:
            pass
    instrument(spent)
    if cold:
        Path(store).unlink(missing_ok=True)
    start = time.perf_counter()
    cmdtool.fit(folder, out, trajectory=store, force=True)
    total = time.perf_counter() - start
    for phase in [p for p in spent if p.startswith("-")]:
        spent[phase[1:]] -= spent.pop(phase)
    spent["other"] = total - sum(v for k, v in spent.items() if k not in ("imports",))
    spent["total_in_process"] = total + spent["imports"]
    return dict(spent)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("store")
    parser.add_argument("out")
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--repeats", type=int, default=0, help="run N fresh processes, print the medians")
    args = parser.parse_args()
    if not args.repeats:
        print(json.dumps(one(args.folder, args.store, args.out, args.cold)))
        sys.exit()
    runs = [json.loads(subprocess.run([sys.executable, __file__, args.folder, args.store, args.out]
                                      + (["--cold"] if args.cold else []), check=True, capture_output=True,
                                      text=True).stdout) for _ in range(args.repeats)]
    print(json.dumps({k: round(statistics.median(r.get(k, 0.0) for r in runs), 3) for k in runs[0]}))
