"""The jobs behind the commands, as library calls: ``fit`` and ``reconstruct``.

Wires discovery -> trajectory store (``stores``) -> decomposition (``fitting``, or the online
warm-up) -> mode file (``modefile``), with progress reported through an optional callback so that
the CLI can draw bars and a notebook can stay quiet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .checkpoints import Discovery
from .errors import CmdError
from .fitting import fit_to_file
from .modefile import check_output_path, open_mode_file, summarize, write_mode_file
from .modes import REFINE, FitSettings, parse_modes
from .online import fit_warmup
from .progress import Progress, no_progress
from .reconstruct import output_plan, parse_at, state_dict_at, write_checkpoints
from .statistics import Clamped
from .stores import prepare_store

if TYPE_CHECKING:
    import torch


@dataclass
class FitResult:
    """What ``fit`` returns.

    Attributes:
        mode_file: The mode file written.
        trajectory: The trajectory store the checkpoints were stacked into (kept for refits and reports).
        trajectory_reused: Whether that store already held these checkpoints.
        summary: What ``cmd info --json`` prints about the mode file (``rel_error``, ``modes``, ...).
        discovery: Every checkpoint found, what was skipped and why, and the warnings.
    """

    mode_file: Path
    trajectory: Path
    trajectory_reused: bool
    summary: dict
    discovery: Discovery  # every checkpoint found, what was skipped and why, warnings


def fit(checkpoint_dir: str | Path, output: str | Path, *, modes: int | str = 10, samples: int = 1000,
        seed: int = 0, start: int | None = None, stop: int | None = None, every: int = 1,
        include: Sequence[str] = (), exclude: Sequence[str] = (), ema: bool = False,
        trajectory: str | Path | None = None, force: bool = False, tile_columns: int | None = None,
        progress: Progress = no_progress, warmup: int | None = None, refine: int = REFINE,
        drop_unmodelled: bool = False, workers: int | None = None, scheduler: str | None = None,
        shard_columns: int | None = None) -> FitResult:
    """Post-hoc CMD of a folder of checkpoints; writes the mode file ``output``.

    ``modes`` (M) is the most modes to find, ``samples`` (K) the parameters sampled to find them,
    ``start/stop/every`` slice the checkpoint sequence like Python's ``[start:stop:every]``,
    ``ema`` models timm's ``state_dict_ema`` instead of the model's weights.
    ``warmup`` (F) makes it online CMD (paper §3.3): modes and references from the first ``F``
    selected checkpoints, then an exact update of ``a, b`` per later one (``online.fit_warmup``).
    ``modes="auto"`` (or ``"auto:MAX"``) chooses M from an error-vs-M curve measured on a second,
    independent sample (``auto_modes.error_curve``); ``refine`` Lloyd-style passes re-pick the
    references (``decompose.refine_references``). ``drop_unmodelled`` leaves the floating-point
    tensors that are not modelled (``include``/``exclude``) out of the mode file.
    ``workers`` (a Dask ``LocalCluster``) or ``scheduler`` (an existing cluster's address) build a
    sharded store and run the fit's pass on Dask (``cmdtool.distributed``): the same mode file.

    Args:
        checkpoint_dir: The folder a training stack wrote its checkpoints into (``cmd fit CKPT_DIR``).
        output: The mode file to write (conventionally ``*.cmd.h5``).
        modes: Most modes (M) to find, or ``"auto"`` / ``"auto:MAX"``.
        samples: Parameters sampled (K), layer-balanced, to find the modes and their references.
        seed: Seed of that sample: the same seed gives the same fit.
        start: First checkpoint position to use (``checkpoints[start:stop:every]``).
        stop: Position to stop before.
        every: Use every n-th checkpoint.
        include: Model only tensors whose name matches one of these globs.
        exclude: Do not model tensors matching these globs; they are carried verbatim.
        ema: Model timm's EMA weights (``state_dict_ema``).
        trajectory: Where to keep the trajectory store (default: the cache folder).
        force: Overwrite an existing mode file.
        tile_columns: Columns per tile of the streaming pass (default: chosen from T).
        progress: Progress callback.
        warmup: Online CMD: find the modes on the first F checkpoints, then update with the rest.
        refine: Lloyd-style passes over the references (0: the paper's references).
        drop_unmodelled: Leave floating-point tensors that are not modelled out of the mode file.
        workers: Run on a Dask ``LocalCluster`` of this many worker processes.
        scheduler: Run on the existing Dask cluster at this address (``tcp://host:8786``).
        shard_columns: Columns per shard of the sharded store (Dask only).

    Returns:
        The mode file's path, the store's path, whether the store was reused, the summary and the discovery.

    Raises:
        CmdError: Bad input (a folder without checkpoints, mismatched tensors, NaN weights, an
            existing output without ``force``, ...); nothing partial is left.
    """
    checkpoint_dir, output = Path(checkpoint_dir), Path(output)
    modes, auto_modes = parse_modes(modes)
    settings = FitSettings(modes=modes, samples=samples, seed=seed, start=start, stop=stop, every=every,
                           include=include, exclude=exclude, ema=ema,
                           source=str(checkpoint_dir.resolve()), warmup=warmup, auto_modes=auto_modes,
                           refine=refine, drop_unmodelled=drop_unmodelled)
    check_output_path(output, force)
    if workers is not None or scheduler is not None:
        if warmup is not None:
            raise CmdError("warmup runs on one machine: leave out `workers` and `scheduler`", parameter="warmup",
                           mentions=("workers", "scheduler"))
        from .distributed import Engine, prepare_sharded_store
        with Engine.start(workers, scheduler) as engine:
            prepared = prepare_sharded_store(engine, checkpoint_dir, start=start, stop=stop, every=every,
                                             include=include, exclude=exclude, ema=ema, trajectory=trajectory,
                                             force=force, shard_columns=shard_columns, progress=progress)
            settings = settings.replace(trajectory=str(prepared.path.resolve()),
                                        trajectory_fingerprint=prepared.store.fingerprint)
            fit_to_file(prepared.store, settings, output, tile_columns=tile_columns, progress=progress,
                        map_tiles=engine.map_tiles(prepared.store, shard_columns))
        return FitResult(output, prepared.path, prepared.reused, summarize(output), prepared.discovery)
    prepared = prepare_store(checkpoint_dir, start=start, stop=stop, every=every, include=include,
                             exclude=exclude, ema=ema, trajectory=trajectory, force=force, progress=progress)
    settings = settings.replace(trajectory=str(prepared.path.resolve()),
                                trajectory_fingerprint=prepared.store.fingerprint)
    if warmup is not None:  # online CMD holds its state (a, b, the first checkpoint) in memory
        write_mode_file(output, fit_warmup(prepared.store, settings, tile_columns, progress))
    else:
        fit_to_file(prepared.store, settings, output, tile_columns=tile_columns, progress=progress)
    return FitResult(output, prepared.path, prepared.reused, summarize(output), prepared.discovery)


def reconstruct(mode_file: str | Path, at: int | str = "last") -> dict[str, torch.Tensor]:
    """The CMD state dict at one checkpoint.

    Args:
        mode_file: The mode file.
        at: A position in the fitted sequence (0-based, negative from the end), ``"first"`` or ``"last"``.

    Returns:
        The state dict (tensors in their source dtypes, carried tensors bit for bit); load it with
        ``model.load_state_dict(state, strict=True)``.

    Raises:
        CmdError: An unreadable mode file, a position out of range, or a file fitted with
            ``drop_unmodelled``.
    """
    with open_mode_file(Path(mode_file)) as modes:
        indices = parse_at(str(at), modes.T)
        if len(indices) != 1:
            raise CmdError(f"at {at!r}: reconstruct returns one state dict: pass one position, 'first' or 'last'",
                           parameter="at")
        return state_dict_at(modes, indices[0])


def reconstruct_checkpoints(mode_file: str | Path, out_dir: str | Path, at: str = "last",
                            force: bool = False, progress: Progress = no_progress,
                            format: str = "source") -> list[Path]:
    """Write checkpoints rebuilt from the mode file into a folder, as ``cmd reconstruct`` does.

    Args:
        mode_file: The mode file.
        out_dir: The folder to write into (created if missing).
        at: ``"last"``, ``"first"``, ``"all"`` or comma-separated positions (``"0,5,-1"``).
        force: Replace existing files and folders of the same names.
        progress: Progress callback.
        format: ``"source"`` (each checkpoint's own format and file names) or ``"safetensors"``.

    Returns:
        The files (or Hugging Face folders) written, in order.
    """
    return reconstruct_noting(mode_file, out_dir, at, force, progress, format)[0]


def reconstruct_noting(mode_file: str | Path, out_dir: str | Path, at: str = "last", force: bool = False,
                       progress: Progress = no_progress, format: str = "source",
                       clamped: Clamped | None = None) -> tuple[list[Path], list[str]]:
    """``reconstruct_checkpoints`` and ``not_restored`` with one opening of the mode file (``cmd reconstruct``);
    running variances clamped at 0 are counted in ``clamped``."""
    with open_mode_file(Path(mode_file)) as modes:
        modes.require_whole("reconstructing a checkpoint")  # before any folder is made
        indices = parse_at(at, modes.T)
        with progress("writing checkpoints", len(indices)) as advance:
            paths = write_checkpoints(modes, Path(out_dir), indices, force, advance, format, clamped)
        return paths, _lost(modes, indices, format)


def _lost(modes, indices: list[int], format: str) -> list[str]:
    plans = [output_plan(modes.names[i], modes.infos[i], format) for i in indices]
    return sorted({name for _, _, lost in plans for name in lost})


def not_restored(mode_file: str | Path, at: str = "last", format: str = "source") -> list[str]:
    """What ``reconstruct_checkpoints`` leaves out of the checkpoints it writes (optimizer states,
    training-state files; with ``format="safetensors"`` also wrapper values and copied files)."""
    with open_mode_file(Path(mode_file)) as modes:
        return _lost(modes, parse_at(at, modes.T), format)
