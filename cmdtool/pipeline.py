"""The jobs behind the commands, as library calls: ``fit`` and ``reconstruct``.

Wires discovery -> trajectory store -> decomposition -> mode file, with progress reported through
an optional callback so that the CLI can draw bars and a notebook can stay quiet.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

from . import __version__
from .checkpoints import Checkpoint, Discovery, discover
from .decompose import (choose_references, cluster, correlation_matrix, fit_tile, label_dtype,
                        normalise_references, sample_parameters)
from .errors import CmdError
from .modefile import ModeFileWriter, check_output_path, open_mode_file
from .reconstruct import output_plan, parse_at, state_dict_at, write_checkpoints
from .trajectory import TrajectoryStore, build_store, fingerprint, open_store, read_signatures, store_fingerprint

Progress = Callable[[str, int], ContextManager[Callable[[int], None]]]
TILE_BYTES = 32 * 2**20  # float64 bytes of one (T, tile) block in the streaming pass


@contextmanager
def no_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n: None


def default_store_path(checkpoint_dir: Path) -> Path:
    """Where a folder's trajectory store lives unless ``--trajectory`` says otherwise:
    ``$CMDTOOL_CACHE`` (default ``$XDG_CACHE_HOME/cmdtool`` or ``~/.cache/cmdtool``), one file per folder."""
    cache = os.environ.get("CMDTOOL_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cmdtool"
    key = hashlib.sha256(str(Path(checkpoint_dir).resolve()).encode()).hexdigest()[:16]
    return Path(cache) / f"trajectory-{Path(checkpoint_dir).resolve().name}-{key}.h5"


@dataclass
class FitResult:
    mode_file: Path
    trajectory: Path
    trajectory_reused: bool
    summary: dict
    discovery: Discovery  # every checkpoint found, what was skipped and why, warnings


def fit(checkpoint_dir: str | Path, output: str | Path, *, modes: int = 10, samples: int = 1000,
        seed: int = 0, start: int | None = None, stop: int | None = None, every: int = 1,
        include: Sequence[str] = (), exclude: Sequence[str] = (), ema: bool = False,
        trajectory: str | Path | None = None, force: bool = False, tile_columns: int | None = None,
        progress: Progress = no_progress, warmup: int | None = None) -> FitResult:
    """Post-hoc CMD of a folder of checkpoints; writes the mode file ``output``.

    ``modes`` (M) is the most modes to find, ``samples`` (K) the parameters sampled to find them,
    ``start/stop/every`` slice the checkpoint sequence like Python's ``[start:stop:every]``,
    ``ema`` models timm's ``state_dict_ema`` instead of the model's weights.
    ``warmup`` (F) makes it online CMD (paper §3.3): modes and references from the first ``F``
    selected checkpoints, then an exact update of ``a, b`` per later one (``online.fit_warmup``).
    """
    if modes < 1 or samples < 1 or every < 1:
        raise CmdError("--modes, --samples and --every must be at least 1")
    checkpoint_dir, output = Path(checkpoint_dir), Path(output)
    check_output_path(output, force)
    prepared = prepare_store(checkpoint_dir, start=start, stop=stop, every=every, include=include,
                             exclude=exclude, ema=ema, trajectory=trajectory, force=force, progress=progress)
    settings = dict(modes=modes, samples=samples, seed=seed, start=start, stop=stop, every=every,
                    include=list(include), exclude=list(exclude), ema=ema, sampling="layer-balanced",
                    source=str(checkpoint_dir.resolve()), trajectory=str(prepared.path.resolve()))
    if warmup is not None:
        from .online import fit_warmup
        fit_warmup(prepared.store, output, {**settings, "warmup": warmup}, warmup, tile_columns, progress)
    else:
        _decompose_store(prepared.store, output, settings, tile_columns, progress)
    return FitResult(output, prepared.path, prepared.reused, summarize(output), prepared.discovery)


class PreparedStore(NamedTuple):
    store: TrajectoryStore
    path: Path
    reused: bool
    discovery: Discovery


def prepare_store(checkpoint_dir: Path, *, start: int | None = None, stop: int | None = None, every: int = 1,
                  include: Sequence[str] = (), exclude: Sequence[str] = (), ema: bool = False,
                  trajectory: str | Path | None = None, force: bool = False,
                  progress: Progress = no_progress) -> PreparedStore:
    """The trajectory store of the checkpoints ``[start:stop:every]`` of a folder: reused when its
    fingerprint matches, built otherwise."""
    checkpoint_dir = Path(checkpoint_dir)
    discovery = discover(checkpoint_dir)
    checkpoints = discovery.checkpoints[start:stop:every]
    if len(checkpoints) < 2:
        raise CmdError(f"{checkpoint_dir}: CMD needs at least 2 checkpoints, "
                       f"{'found' if start is None and stop is None and every == 1 else 'selected'} {len(checkpoints)}")
    store, store_path, reused = store_of(checkpoints, checkpoint_dir, include=include, exclude=exclude, ema=ema,
                                         trajectory=trajectory, force=force, progress=progress)
    return PreparedStore(store, store_path, reused, discovery)


def store_of(checkpoints: Sequence[Checkpoint], checkpoint_dir: Path, *, include: Sequence[str] = (),
             exclude: Sequence[str] = (), ema: bool = False, trajectory: str | Path | None = None,
             force: bool = False, progress: Progress = no_progress) -> tuple[TrajectoryStore, Path, bool]:
    """The trajectory store of these checkpoints of ``checkpoint_dir`` (e.g. the complete ones of a
    folder still being written): reused when its fingerprint matches. Returns ``(store, path, reused)``."""
    store_path = Path(trajectory) if trajectory else default_store_path(checkpoint_dir)
    if store_path.is_dir():
        raise CmdError(f"{store_path}: is a directory, expected a trajectory-store file path")
    key = fingerprint(checkpoints, include, exclude, ema)
    existing = store_fingerprint(store_path)
    if existing == key:
        return open_store(store_path), store_path, True
    if store_path.exists() and existing is None and not force:
        raise CmdError(f"{store_path}: exists and is not a cmdtool trajectory store (use --force to replace it)")
    store_path.parent.mkdir(parents=True, exist_ok=True)
    with progress("checking checkpoints", len(checkpoints)) as advance:
        layout, infos = read_signatures(checkpoints, include, exclude, ema, advance)
    with progress("building trajectory store", len(checkpoints)) as advance:
        store = build_store(checkpoints, layout, infos, store_path, key, ema, advance)
    return store, store_path, False


def _decompose_store(store, output: Path, settings: dict, tile_columns: int | None, progress: Progress) -> None:
    """Steps 1–6 of CMD over a trajectory store, streaming the mode file out tile by tile, with
    BLAS on one thread: its products are too skinny to share (see pyproject.toml)."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        _decompose(store, output, settings, tile_columns, progress)


def _decompose(store, output: Path, settings: dict, tile_columns: int | None, progress: Progress) -> None:
    layout = store.layout
    sample = sample_parameters([s.size for s in layout.modelled], store.varies, settings["samples"], settings["seed"])
    if len(sample) == 0:
        raise CmdError(f"every modelled parameter is constant over the {store.T} checkpoints: nothing to decompose")
    trajectories = store.columns(sample)                       # (T, K)
    C = correlation_matrix(trajectories)
    sample_labels = cluster(C, settings["modes"])
    reference_positions = choose_references(C, sample_labels)
    normalised = normalise_references(trajectories[:, reference_positions].T)
    references = normalised.references
    M = len(reference_positions)

    writer = ModeFileWriter(
        output, layout=layout, time=store.time, names=store.names, infos=store.infos,
        references=references, reference_offset=normalised.offset, reference_scale=normalised.scale,
        reference_index=sample[reference_positions], label_dtype=label_dtype(M))
    try:
        tile = tile_columns or max(1, TILE_BYTES // (8 * store.T))
        totals = dict.fromkeys(("sse", "sq_norm", "sq_displacement", "sq_centred"), 0.0)
        mode_sizes = np.zeros(M, dtype=np.int64)
        mode_sse = np.zeros(M)
        with progress("fitting modes", store.N) as advance:
            for start, stop, block in store.tiles(tile):
                result = fit_tile(block, references, store.varies[start:stop])  # constants skipped
                a32, b32 = result.a.astype(np.float32), result.b.astype(np.float32)
                # The error of what the mode file stores: the float32 rounding of a and b adds
                # (a − a32)² + T (b − b32)² to the least-squares residual.
                sse = result.sse + (result.a - a32) ** 2 + store.T * (result.b - b32) ** 2
                writer.write_tile(start, result.labels.astype(label_dtype(M)), a32, b32)
                mode_sizes += np.bincount(result.labels, minlength=M)
                mode_sse += np.bincount(result.labels, weights=sse, minlength=M)
                totals["sse"] += float(sse.sum())
                for name in ("sq_norm", "sq_displacement", "sq_centred"):
                    totals[name] += float(getattr(result, name).sum())
                advance(stop - start)
        for spec in layout.carried:
            writer.write_carried(spec.name, store.carried(spec.name))
        for digest, data in store.attachments().items():
            writer.write_attachment(digest, data)
        metrics = dict(
            rel_error=_ratio(totals["sse"], totals["sq_norm"]),
            rel_error_displacement=_ratio(totals["sse"], totals["sq_displacement"]),
            rel_error_centred=_ratio(totals["sse"], totals["sq_centred"]),
            mode_sse=mode_sse.tolist(), **totals)
        writer.finish(mode_sizes=mode_sizes, settings=settings, metrics=metrics, tool_version=__version__)
    except BaseException:
        writer.abort()
        raise


def _ratio(error_sq: float, reference_sq: float) -> float:
    """sqrt(error² / reference²); 0 when both vanish."""
    return float(np.sqrt(error_sq / reference_sq)) if reference_sq > 0 else 0.0


def summarize(path: str | Path) -> dict:
    """The facts ``cmd info`` and ``cmd fit --json`` report about a mode file."""
    path = Path(path)
    with open_mode_file(path) as modes:
        file_bytes = path.stat().st_size
        checkpoint_bytes = 4 * modes.N * modes.T
        return {
            "format_version": modes.format_version,
            "tool_version": modes.tool_version,
            "mode_file": str(path),
            "mode_file_bytes": file_bytes,
            "checkpoints": modes.T,
            "parameters": modes.N,
            "modes": modes.M,
            "mode_sizes": [int(n) for n in modes.mode_sizes],
            "tensors_modelled": len(modes.layout.modelled),
            "tensors_carried": len(modes.layout.carried),
            "checkpoint_bytes_float32": checkpoint_bytes,
            "compression_ratio": checkpoint_bytes / file_bytes,
            "rel_error": modes.metrics["rel_error"],
            "rel_error_displacement": modes.metrics["rel_error_displacement"],
            "time": [int(t) for t in modes.time],
            "checkpoint_names": list(modes.names),
            "settings": modes.settings,
            "online": None if modes.online is None else {
                "warmup": modes.online["warmup"], "updates": modes.T - modes.online["warmup"]},
        }


def reconstruct(mode_file: str | Path, at: int | str = "last") -> dict[str, torch.Tensor]:
    """The CMD state dict at one checkpoint: a position (0-based, negative from the end),
    ``"first"`` or ``"last"``. Load it with ``model.load_state_dict(state, strict=True)``."""
    with open_mode_file(Path(mode_file)) as modes:
        indices = parse_at(str(at), modes.T)
        if len(indices) != 1:
            raise CmdError(f"reconstruct(at={at!r}) returns one state dict: pass one position, 'first' or 'last'")
        return state_dict_at(modes, indices[0])


def reconstruct_checkpoints(mode_file: str | Path, out_dir: str | Path, at: str = "last",
                            force: bool = False, progress: Progress = no_progress,
                            format: str = "source") -> list[Path]:
    """Write the checkpoints selected by ``at`` (see ``parse_at``) into ``out_dir``, in the source
    format or (``format="safetensors"``) as plain safetensors state dicts."""
    with open_mode_file(Path(mode_file)) as modes:
        indices = parse_at(at, modes.T)
        with progress("writing checkpoints", len(indices)) as advance:
            return write_checkpoints(modes, Path(out_dir), indices, force, advance, format)


def not_restored(mode_file: str | Path, at: str = "last", format: str = "source") -> list[str]:
    """What ``reconstruct_checkpoints`` leaves out of the checkpoints it writes (optimizer states,
    training-state files; with ``format="safetensors"`` also wrapper values and copied files)."""
    with open_mode_file(Path(mode_file)) as modes:
        plans = [output_plan(modes.names[i], modes.infos[i], format) for i in parse_at(at, modes.T)]
    return sorted({name for _, _, lost in plans for name in lost})
