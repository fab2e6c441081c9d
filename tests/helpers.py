"""Helpers shared by the tests: planted CMD runs written as checkpoint folders, and the ``cmd`` runner
with the bad-input contract (exit 2, one ``error:`` line). Fixtures are in conftest.py."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from cmdtool.cli import app

SHAPES = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "bn.weight": (8,), "bn.running_mean": (8,),
          "fc.weight": (10, 72), "fc.bias": (10,)}


@dataclass
class Planted:
    """A run whose answer is known: ``W = a·r[labels] + b + noise`` (T, N), float64 before saving."""
    W: np.ndarray          # (T, N)
    references: np.ndarray  # (M, T) the planted reference curves
    labels: np.ndarray      # (N,) planted mode of each parameter
    a: np.ndarray
    b: np.ndarray
    shapes: dict

    def permutation(self, layout) -> np.ndarray:
        """Planted columns in the order of a fitted layout (safetensors sorts tensor names)."""
        offsets = dict(zip(self.shapes, np.cumsum([0] + [int(np.prod(s)) for s in self.shapes.values()])))
        return np.concatenate([offsets[spec.name] + np.arange(spec.size) for spec in layout.modelled])

    def states(self, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
        """One state dict per checkpoint, plus an integer buffer that counts steps."""
        out, offset = [], 0
        for t in range(self.W.shape[0]):
            state, offset = {}, 0
            for name, shape in self.shapes.items():
                size = int(np.prod(shape))
                state[name] = torch.from_numpy(self.W[t, offset:offset + size].reshape(shape).copy()).to(dtype)
                offset += size
            state["bn.num_batches_tracked"] = torch.tensor(100 * t, dtype=torch.int64)
            out.append(state)
        return out


def plant(M: int = 3, T: int = 20, noise: float = 1e-4, seed: int = 0, shapes: dict = SHAPES) -> Planted:
    """M smooth, mutually distinct reference curves; each parameter an affine copy of one, plus noise."""
    rng = np.random.default_rng(seed)
    N = sum(int(np.prod(s)) for s in shapes.values())
    t = np.linspace(0, 1, T)
    curves = [np.exp(-3 * t), np.sin(2 * np.pi * t), t ** 2, np.cos(5 * t), np.sqrt(t + 0.1), np.tanh(4 * t - 2)]
    references = np.stack([curves[m % len(curves)] * (1 + m // len(curves)) for m in range(M)])
    labels = rng.integers(0, M, size=N)
    a = rng.choice([-1, 1], size=N) * rng.uniform(0.2, 2.0, size=N)
    b = rng.normal(0, 0.5, size=N)
    W = a * references[labels].T + b + noise * rng.normal(size=(T, N))
    return Planted(W, references, labels, a, b, dict(shapes))


def write_run(folder: Path, states: list[dict], fmt: str = "safetensors", wrapper: str | None = None,
              name: str = "epoch_{}") -> Path:
    """Write one checkpoint per state dict: ``epoch_0.safetensors`` ... (or ``.pt``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for t, state in enumerate(states):
        if fmt == "safetensors":
            save_file(state, str(folder / f"{name.format(t)}.safetensors"), metadata={"epoch": str(t)})
        else:
            obj = (
                {wrapper: state, "epoch": t, "optimizer": {"lr": 0.1, "momentum": [torch.zeros(1)]}}
                if wrapper
                else state
            )
            torch.save(obj, folder / f"{name.format(t)}.pt")
    return folder


def cmd(runner, *args):
    """Run ``cmd ARGS``; Python warnings raised meanwhile are kept on ``result.warnings`` (the real
    CLI prints them to stderr, beside the one error line; the runner and pytest swallow them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.invoke(app, [str(a) for a in args])
    result.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
    return result


def ok(result):
    """Assert exit 0 and return the result."""
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def error_line(result) -> str:
    """Assert the bad-input contract and return the message after ``error: ``."""
    assert result.exit_code == 2, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught exception
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert result.warnings == [], f"warnings would reach stderr: {result.warnings}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0].removeprefix("error: ")


def snapshot(root: Path) -> dict:
    """Every file under ``root`` with its size and modification time: what a failed run must not change."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def assert_same_mode_files(first, second, skip: tuple[str, ...] = (), attributes: bool = True) -> None:
    """Every dataset (and, with ``attributes``, every attribute) of two mode files equal, except the
    datasets named in ``skip``; the files' bytes may differ in HDF5 bookkeeping."""
    import h5py

    with h5py.File(first) as f, h5py.File(second) as g:
        names = []
        f.visit(names.append)
        other = []
        g.visit(other.append)
        assert names == other
        for name in names:
            if isinstance(f[name], h5py.Dataset) and name not in skip:
                np.testing.assert_array_equal(f[name][()], g[name][()], err_msg=name)
                if attributes:
                    assert dict(f[name].attrs) == dict(g[name].attrs), name
        if attributes:
            assert dict(f.attrs) == dict(g.attrs)


class TokenRun(torch.utils.data.Dataset):
    """16 token sequences of 8 ids below 32, for the tiny GPT-2 runs of the Trainer tests."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        ids = torch.arange(8) * (i % 3 + 1) % 32
        return {"input_ids": ids, "labels": ids}
