"""Online CMD (paper §3.3): keep a mode file up to date while training runs.

Modes and references are found once, on the first ``F`` checkpoints (the warm-up, post-hoc CMD as
in ``cmd fit``); after that they stay fixed, every new checkpoint appends ``r_m(t) = w_ref_m(t)`` to
the references and updates every parameter's ``a, b`` exactly through the normal equations
(``decompose.update_fit``). An update needs one checkpoint plus ``O(N)`` per-parameter state, all of
it in the mode file: ``a, b, labels`` and, in the ``online`` group, the first checkpoint's values
(for ``rel_error_displacement``) and the least-squares error per mode. Nothing here grows with the
number of checkpoints already absorbed, except the ``M × T`` references and the ``T`` names, times
and carried rows, which the mode file holds anyway.

The jobs: ``fit_warmup`` (``cmd fit --warmup``), ``update`` (``cmd update``), ``watch``
(``cmd watch``) and ``OnlineCMD`` (the same in a training loop).
"""

from __future__ import annotations

import os
import tempfile
import time as clock
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from . import __version__
from ._lazy import torch  # imported on first use
from .checkpoints import (CHECKPOINT_SUFFIXES, Checkpoint, CheckpointInfo, CheckpointReader, checkpoint_at,
                          discover, dtype_name, name_number, natural_key, skip_reason, sniff_format)
from .decompose import label_dtype, update_fit
from .errors import CmdError
from .layout import Layout, build_layout, dataset_key
from .modefile import ModeFile, ModeFileWriter, check_output_path, open_mode_file
from .pipeline import Progress, _decompose_store, _ratio, no_progress, store_of, summarize
from .trajectory import TrajectoryStore, open_store

ONLINECMD_SOURCE = "an OnlineCMD training loop"  # settings.source of a mode file OnlineCMD wrote
CARRIED_CHUNK_BYTES = 32 * 2**20  # carried rows are copied between mode files in blocks of this size


# ---------------------------------------------------------------------------------------------
# Reading one new checkpoint against a mode file's layout


def check_layout(path: Path | str, signature: Mapping[str, tuple], layout: Layout, first_name: str) -> None:
    """The checkpoint must have exactly the mode file's tensor names, shapes and dtypes."""
    expected = {spec.name: (tuple(spec.shape), spec.dtype) for spec in layout.tensors}
    for name, (shape, dtype) in expected.items():
        if name not in signature:
            raise CmdError(f"{path}: tensor {name!r} is missing (present in {first_name})")
        got_shape, got_dtype = tuple(signature[name][0]), signature[name][1]
        if (got_shape, got_dtype) != (shape, dtype):
            raise CmdError(f"{path}: tensor {name!r} is {got_dtype} {list(got_shape)}, "
                           f"but {dtype} {list(shape)} in {first_name}")
    for name in signature:
        if name not in expected:
            raise CmdError(f"{path}: tensor {name!r} is not in {first_name}")


def flatten(source: str, values: Callable[[str], np.ndarray], raw_bytes: Callable[[str], np.ndarray],
            layout: Layout) -> tuple[np.ndarray, dict]:
    """One checkpoint as the trajectory store would hold it: the modelled values as one float32
    row ``(N,)`` (``values(name)``, flat float32) and each carried tensor's raw bytes
    (``raw_bytes(name)``). Non-finite values are an error naming ``source``."""
    w = np.empty(layout.n_parameters, dtype=np.float32)
    carried = {}
    for spec in layout.tensors:
        if spec.modelled:
            row = values(spec.name)
            if not np.isfinite(row).all():
                bad = "NaN" if np.isnan(row).any() else "Inf"
                raise CmdError(f"{source}: tensor {spec.name!r} contains {bad} values")
            w[spec.columns] = row
        else:
            carried[spec.name] = raw_bytes(spec.name).copy()
    return w, carried


def read_checkpoint(checkpoint: Checkpoint, layout: Layout, first_name: str,
                    ema: bool = False) -> tuple[np.ndarray, dict, CheckpointInfo, dict[str, bytes]]:
    """One checkpoint (file or Hugging Face folder; timm's EMA weights with ``ema``): its row,
    carried tensors, write-back info and the files its folder copies back (by SHA-256)."""
    with checkpoint.open(ema) as reader:
        check_layout(checkpoint.path, reader.signature, layout, first_name)
        w, carried = flatten(str(checkpoint.path), reader.float32_values, reader.raw_bytes, layout)
        return w, carried, reader.info, reader.attachments


# ---------------------------------------------------------------------------------------------
# The state of an online fit


@dataclass
class OnlineState:
    """Everything an update needs: ``O(N)`` per parameter plus the ``M × T`` references.

    ``a, b`` are float64 while in memory; the mode file stores them as float32 (one rounding per
    save, which the reported error includes as in ``cmd fit``).
    """
    layout: Layout
    labels: np.ndarray            # (N,) int64, fixed after the warm-up
    a: np.ndarray                 # (N,) float64, against the normalised references
    b: np.ndarray                 # (N,) float64
    first: np.ndarray             # (N,) float32, the first checkpoint's values
    references: np.ndarray        # (M, T) float64, normalised
    offset: np.ndarray            # (M,)
    scale: np.ndarray             # (M,)
    reference_index: np.ndarray   # (M,)
    time: list[int]
    names: list[str]
    infos: list[CheckpointInfo]
    mode_sizes: np.ndarray
    settings: dict
    warmup: int
    mode_sse_least_squares: np.ndarray  # (M,) least-squares error of each mode over the T checkpoints
    sq_norm: float                # Σ w², Σ (w − w(0))², Σ (w − mean w)² over all parameters and checkpoints
    sq_displacement: float
    sq_centred: float
    carried_source: ModeFile | None = None  # the first rows of every carried tensor, read in blocks
    carried_rows: dict = field(default_factory=dict)  # name -> rows not in carried_source
    attachments: dict = field(default_factory=dict)   # SHA-256 -> bytes of files copied back (HF configs)

    @property
    def T(self) -> int:
        return self.references.shape[1]

    @property
    def M(self) -> int:
        return self.references.shape[0]

    @classmethod
    def from_mode_file(cls, modes: ModeFile, first: np.ndarray | None = None, *,
                       carried_in_memory: bool = False) -> "OnlineState":
        """The state of an open mode file. A plain ``cmd fit`` file has no ``online`` group, so the
        first checkpoint's values must be given; its warm-up is all its checkpoints."""
        h = modes.handle
        if modes.online is not None:
            first = h["online"]["first"][()]
            mode_sse = h["online"]["mode_sse_least_squares"][()]
            warmup = modes.online["warmup"]
        else:
            if first is None:
                raise ValueError("the first checkpoint's values are needed for a mode file without online state")
            # The fit's per-mode error includes the float32 rounding of its a, b (relative size 1e-14).
            mode_sse, warmup = np.asarray(modes.metrics["mode_sse"], dtype=np.float64), modes.T
        state = cls(
            layout=modes.layout, labels=h["labels"][()].astype(np.int64), a=h["a"][()].astype(np.float64),
            b=h["b"][()].astype(np.float64), first=np.asarray(first, dtype=np.float32),
            references=modes.references.astype(np.float64), offset=modes.reference_offset.astype(np.float64),
            scale=modes.reference_scale.astype(np.float64), reference_index=modes.reference_index.astype(np.int64),
            time=[int(t) for t in modes.time], names=list(modes.names), infos=list(modes.infos),
            mode_sizes=modes.mode_sizes.copy(), settings=dict(modes.settings), warmup=warmup,
            mode_sse_least_squares=mode_sse.copy(), sq_norm=float(modes.metrics["sq_norm"]),
            sq_displacement=float(modes.metrics["sq_displacement"]), sq_centred=float(modes.metrics["sq_centred"]))
        state.attachments = {digest: modes.attachment(digest) for digest in h.get("attachments", {})}
        if carried_in_memory:
            state.carried_rows = {spec.name: list(modes.carried(spec.name)) for spec in modes.layout.carried}
        else:
            state.carried_source = modes
            state.carried_rows = {spec.name: [] for spec in modes.layout.carried}
        return state

    def observe(self, w: np.ndarray, name: str, time: int, info: CheckpointInfo, carried: Mapping[str, np.ndarray],
                attachments: Mapping[str, bytes] = {}) -> None:
        """Absorb one checkpoint: ``w`` (N,) float32 as ``flatten`` returns it."""
        T = self.T
        w64 = w.astype(np.float64)
        step = update_fit(self.a, self.b, self.labels, w64, self.references, self.offset, self.scale,
                          w64[self.reference_index])
        displacement = w64 - self.first
        centred = w64 - self.b                      # b is each parameter's mean over the T checkpoints
        self.sq_norm += float(w64 @ w64)
        self.sq_displacement += float(displacement @ displacement)
        self.sq_centred += float(centred @ centred) * T / (T + 1)   # Welford
        self.mode_sse_least_squares += np.bincount(self.labels, weights=step.sse, minlength=self.M)
        self.a, self.b = step.a, step.b
        self.references, self.offset, self.scale = step.references, step.offset, step.scale
        self.time.append(int(time))
        self.names.append(name)
        self.infos.append(info)
        self.attachments.update(attachments)
        for key, rows in self.carried_rows.items():
            rows.append(np.asarray(carried[key], dtype=np.uint8))

    def _carried_chunks(self, name: str) -> Iterator[np.ndarray]:
        if self.carried_source is not None:
            dataset = self.carried_source.handle["carried"][dataset_key(name)]
            step = max(1, CARRIED_CHUNK_BYTES // max(1, dataset.shape[1]))
            for start in range(0, dataset.shape[0], step):
                yield dataset[start:start + step]
        if self.carried_rows[name]:
            yield np.stack(self.carried_rows[name])

    def metrics(self) -> tuple[dict, np.ndarray, np.ndarray]:
        """The mode file's metrics (the stored float32 model's error, as ``cmd fit`` reports it)
        and the float32 ``a, b``."""
        a32, b32 = self.a.astype(np.float32), self.b.astype(np.float32)
        rounding = (self.a - a32) ** 2 + self.T * (self.b - b32) ** 2
        mode_sse = self.mode_sse_least_squares + np.bincount(self.labels, weights=rounding, minlength=self.M)
        sse = float(mode_sse.sum())
        metrics = dict(rel_error=_ratio(sse, self.sq_norm), rel_error_displacement=_ratio(sse, self.sq_displacement),
                       rel_error_centred=_ratio(sse, self.sq_centred), mode_sse=mode_sse.tolist(), sse=sse,
                       sq_norm=self.sq_norm, sq_displacement=self.sq_displacement, sq_centred=self.sq_centred)
        return metrics, a32, b32

    def save(self, path: Path) -> Path:
        """Write the mode file: to a temporary name beside ``path``, renamed over it when complete,
        so a reader (or a kill) never sees a partial file."""
        metrics, a32, b32 = self.metrics()
        M = self.M
        writer = ModeFileWriter(
            path, layout=self.layout, time=np.asarray(self.time, dtype=np.int64), names=self.names,
            infos=self.infos, references=self.references, reference_offset=self.offset,
            reference_scale=self.scale, reference_index=self.reference_index, label_dtype=label_dtype(M))
        try:
            writer.write_tile(0, self.labels.astype(label_dtype(M)), a32, b32)
            for spec in self.layout.carried:
                writer.write_carried_rows(spec.name, (self.T, spec.nbytes), self._carried_chunks(spec.name))
            for digest, data in self.attachments.items():
                writer.write_attachment(digest, data)
            writer.write_online(warmup=self.warmup, first=self.first,
                                mode_sse_least_squares=self.mode_sse_least_squares)
            return writer.finish(mode_sizes=self.mode_sizes, settings=self.settings, metrics=metrics,
                                 tool_version=__version__)
        except BaseException:
            writer.abort()
            raise

    def state_dict(self, carried: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The CMD state dict at the latest checkpoint (float64 ``a·r + b``, cast per tensor)."""
        from .reconstruct import assemble_state_dict
        r = self.references[:, -1]
        return assemble_state_dict(self.layout, lambda spec: self.a[spec.columns] * r[self.labels[spec.columns]]
                                   + self.b[spec.columns], lambda spec: carried[spec.name])


# ---------------------------------------------------------------------------------------------
# The warm-up: post-hoc CMD on the first F rows of a trajectory


@dataclass
class _TrajectoryView(TrajectoryStore):
    """A trajectory store restricted to some rows (or held in memory), for the warm-up fit."""
    carried_rows: dict | None = None

    def carried(self, name: str) -> np.ndarray:
        return self.carried_rows[name]

    def attachments(self) -> dict[str, bytes]:
        return {} if self.path is None else super().attachments()


def moving_parameters(W, tile_columns: int = 1 << 20) -> np.ndarray:
    """Which columns of the rows ``W`` (e.g. a warm-up's) are not constant, read in column tiles."""
    varies = np.zeros(W.shape[1], dtype=bool)
    for start in range(0, W.shape[1], tile_columns):
        block = np.asarray(W[:, start:start + tile_columns])
        varies[start:start + tile_columns] = (block[1:] != block[0]).any(axis=0)
    return varies


def _warmup_state(view: _TrajectoryView, settings: dict, tile_columns: int | None, progress: Progress,
                  folder: Path) -> OnlineState:
    """Post-hoc CMD of the warm-up rows (the very code of ``cmd fit``), as an online state."""
    tmp = folder / f".warmup.{os.getpid()}.{id(view)}.cmd.h5"
    try:
        _decompose_store(view, tmp, settings, tile_columns, progress)
        with open_mode_file(tmp) as modes:
            return OnlineState.from_mode_file(modes, np.asarray(view.W[0]), carried_in_memory=True)
    finally:
        tmp.unlink(missing_ok=True)


def fit_warmup(store: TrajectoryStore, output: Path, settings: dict, warmup: int,
               tile_columns: int | None = None, progress: Progress = no_progress) -> None:
    """``cmd fit --warmup F``: modes and references from the first ``F`` checkpoints of the store,
    then one exact update per later checkpoint. Writes ``output`` (atomically)."""
    if not 2 <= warmup <= store.T:
        raise CmdError(f"--warmup {warmup}: the warm-up needs at least 2 checkpoints and at most the "
                       f"{store.T} selected")
    output = Path(output)
    F = warmup
    carried_all = {spec.name: store.carried(spec.name) for spec in store.layout.carried}
    view = _TrajectoryView(store.path, store.layout, store.time[:F], store.names[:F], store.infos[:F],
                           moving_parameters(store.W[:F]), store.W[:F],
                           carried_rows={name: rows[:F] for name, rows in carried_all.items()})
    state = _warmup_state(view, settings, tile_columns, progress, output.parent)
    with progress("updating modes", store.T - F) as advance:
        for t in range(F, store.T):
            state.observe(np.asarray(store.W[t]), store.names[t], int(store.time[t]), store.infos[t],
                          {name: rows[t] for name, rows in carried_all.items()})
            advance(1)
    state.save(output)


# ---------------------------------------------------------------------------------------------
# cmd update


def _gather(paths: Sequence[str | Path]) -> list[Checkpoint]:
    """Files, and the checkpoints directly in folders, in training order (time filled in later)."""
    found: dict[Path, Checkpoint] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise CmdError(f"{p}: no such file or folder")
        single = checkpoint_at(p)  # a file, or one Hugging Face checkpoint-<step>/ folder
        for c in [single] if single is not None else discover(p).checkpoints:
            found.setdefault(c.path.resolve(), c)
    checkpoints = sorted(found.values(), key=lambda c: natural_key(c.name))
    for before, after in zip(checkpoints, checkpoints[1:]):
        if before.name == after.name:
            raise CmdError(f"{after.path}: a second checkpoint named {after.name} (also {before.path})")
    return checkpoints


def plan_update(modes: ModeFile, checkpoints: Sequence[Checkpoint]) -> tuple[list[Checkpoint], list[Checkpoint]]:
    """Split into ``(skipped, new)``: checkpoints already in the mode file, and later ones with
    their times. A checkpoint that sorts before the mode file's last one is an error."""
    names, last = set(modes.names), modes.names[-1]
    from_names = all(name_number(n) == int(t) for n, t in zip(modes.names, modes.time))
    skipped = [c for c in checkpoints if c.name in names]
    new, previous = [], int(modes.time[-1])
    for c in (c for c in checkpoints if c.name not in names):
        if natural_key(c.name) <= natural_key(last):
            raise CmdError(f"{c.path}: comes before {last}, the last checkpoint in {modes.path}; "
                           f"online CMD only appends later checkpoints")
        if from_names:
            t = name_number(c.name)
            if t is None or t <= previous:
                raise CmdError(f"{c.path}: its step number ({t}) does not come after {previous}, the time of "
                               f"the last checkpoint in the mode file ({last})" if t is not None else
                               f"{c.path}: no step number in the name, but the mode file's times come from "
                               f"checkpoint names")
        else:
            t = previous + 1
        new.append(replace(c, time=t))
        previous = t
    return skipped, new


def _first_checkpoint(modes: ModeFile, candidates: Sequence[Checkpoint]) -> np.ndarray:
    """The first checkpoint's values, for a mode file without online state (a plain ``cmd fit``):
    from a given checkpoint of that name, the fit's trajectory store, or the fit's folder."""
    name, ema = modes.names[0], bool(modes.settings.get("ema", False))
    for c in candidates:
        if c.name == name:
            return read_checkpoint(c, modes.layout, name, ema)[0]
    store_path = Path(modes.settings.get("trajectory") or "")
    if modes.settings.get("trajectory") and store_path.is_file():
        try:
            store = open_store(store_path)
            if store.names[0] == name and store.layout.to_json() == modes.layout.to_json():
                return np.array(store.W[0])
        except CmdError:
            pass
    source = Path(modes.settings.get("source") or "") / name
    if modes.settings.get("source") and source.exists():
        checkpoint = checkpoint_at(source)
        if checkpoint is not None:
            return read_checkpoint(checkpoint, modes.layout, name, ema)[0]
    raise CmdError(f"{modes.path}: the first update of a mode file needs its first checkpoint ({name}) "
                   f"for the displacement error, and neither the fit's trajectory store nor "
                   f"{source} is there; pass {name} along with the new checkpoints")


@dataclass
class UpdateResult:
    mode_file: Path
    absorbed: list[str]
    skipped: list[str]
    summary: dict


def update(mode_file: str | Path, checkpoints: Sequence[str | Path], progress: Progress = no_progress) -> UpdateResult:
    """``cmd update``: absorb the checkpoints (files or folders) that come after the mode file's
    last one. Ones already in the file are skipped; an earlier, incompatible or unreadable one is a
    CmdError and the mode file is left untouched (all are checked before anything is written, and
    the new file replaces the old one only when complete)."""
    mode_file = Path(mode_file)
    candidates = _gather(checkpoints)
    with open_mode_file(mode_file) as modes:
        skipped, new = plan_update(modes, candidates)
        if new:
            first_name, ema = modes.names[0], bool(modes.settings.get("ema", False))
            for c in new:
                with c.open(ema) as reader:
                    check_layout(c.path, reader.signature, modes.layout, first_name)
            first = None if modes.online is not None else _first_checkpoint(modes, candidates)
            state = OnlineState.from_mode_file(modes, first)
            with progress("updating modes", len(new)) as advance:
                for c in new:
                    w, carried, info, attachments = read_checkpoint(c, modes.layout, first_name, ema)
                    state.observe(w, c.name, c.time, info, carried, attachments)
                    advance(1)
            state.save(mode_file)
    return UpdateResult(mode_file, [c.name for c in new], [c.name for c in skipped], summarize(mode_file))


# ---------------------------------------------------------------------------------------------
# cmd watch


def _times_like_discover(names: Sequence[str]) -> list[int]:
    numbers = [name_number(n) for n in names]
    if None in numbers or len(set(numbers)) != len(numbers):
        return list(range(len(names)))
    return numbers


class _Folder:
    """Complete checkpoints of a folder that is being written to: a file counts once its size and
    modification time are the same at two polls in a row and it opens as a checkpoint."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.seen: dict[Path, tuple[int, int]] = {}
        self.parsed: dict[Path, tuple[int, int]] = {}
        self.waiting: set = set()

    def poll(self, say: Callable[[str], None]) -> list[tuple[Checkpoint, bool]]:
        """Every checkpoint file in training order, with whether it is complete."""
        current, out = {}, []
        paths = sorted((p for p in self.folder.iterdir() if p.name.endswith(CHECKPOINT_SUFFIXES)
                        and not p.name.startswith(".")), key=lambda p: natural_key(p.name))
        for p in paths:
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if not p.is_file() or skip_reason(p.name):  # last.ckpt, optimizer.pt, …: never checkpoints
                continue
            current[p] = (st.st_size, st.st_mtime_ns)
            ready = st.st_size > 0 and self.seen.get(p) == current[p]
            fmt = sniff_format(p) if ready else None
            if ready and self.parsed.get(p) != current[p]:
                try:
                    if fmt is None:
                        raise CmdError(f"{p}: not a checkpoint yet")
                    with CheckpointReader(p, fmt):
                        pass
                    self.parsed[p] = current[p]
                except CmdError as e:
                    ready = False
                    if (p, current[p]) not in self.waiting:
                        self.waiting.add((p, current[p]))
                        say(f"waiting: {e}")
            out.append((Checkpoint(p, fmt or "", 0), ready))
        self.seen = current
        return out


def watch(folder: str | Path, output: str | Path, *, warmup: int, until: int | None = None, interval: float = 10.0,
          modes: int = 10, samples: int = 1000, seed: int = 0, include: Sequence[str] = (),
          exclude: Sequence[str] = (), trajectory: str | Path | None = None, force: bool = False,
          progress: Progress = no_progress, say: Callable[[str], None] = lambda s: None,
          sleep: Callable[[float], None] = clock.sleep) -> Path:
    """``cmd watch``: follow a training folder. Once ``warmup`` complete checkpoints exist, fit on
    them (``fit_warmup``), then ``update`` with each new complete checkpoint, in training order.
    An existing ``output`` is resumed (``force`` refits it). Returns when the mode file holds
    ``until`` checkpoints; Ctrl-C raises KeyboardInterrupt. The mode file is replaced atomically at
    every change, so it is valid at every moment."""
    folder, output = Path(folder), Path(output)
    if not folder.is_dir():
        raise CmdError(f"{folder}: no such folder" if not folder.exists() else f"{folder}: is a file, expected a folder of checkpoints")
    if warmup < 2:
        raise CmdError(f"--warmup {warmup}: the warm-up needs at least 2 checkpoints")
    fitted = output.exists() and not force
    if fitted:
        with open_mode_file(output) as m:
            say(f"resuming {output}: it holds {m.T} checkpoints ({m.names[0]} … {m.names[-1]})")
    else:
        check_output_path(output, force)
    files = _Folder(folder)
    while True:
        listing = files.poll(say)
        if not fitted:
            ready = []
            for c, complete in listing:
                if not complete:
                    break
                ready.append(c)
            if len(ready) >= warmup:
                times = _times_like_discover([c.name for c in ready])
                checkpoints = [Checkpoint(c.path, c.format, t) for c, t in zip(ready, times)]
                store, store_path, _ = store_of(checkpoints, folder, include=include, exclude=exclude,
                                                trajectory=trajectory, force=force, progress=progress)
                settings = dict(modes=modes, samples=samples, seed=seed, start=None, stop=None, every=1,
                                include=list(include), exclude=list(exclude), sampling="layer-balanced",
                                source=str(folder.resolve()), trajectory=str(store_path.resolve()), warmup=warmup)
                fit_warmup(store, output, settings, warmup, progress=progress)
                fitted = True
                say(f"fitted {output} on the warm-up {ready[0].name} … {ready[warmup - 1].name}"
                    + (f" and updated it with {len(ready) - warmup} more" if len(ready) > warmup else ""))
        else:
            with open_mode_file(output) as m:
                names, last = set(m.names), m.names[-1]
            new = []
            for c, complete in listing:
                if c.name in names:
                    continue
                if natural_key(c.name) <= natural_key(last):
                    if (c.path, "early") not in files.waiting:
                        files.waiting.add((c.path, "early"))
                        say(f"note: {c.path} comes before {last}, the last checkpoint absorbed; ignored")
                    continue
                if not complete:
                    break
                new.append(c.path)
            if new:
                result = update(output, new, progress)
                say(f"absorbed {', '.join(result.absorbed)}: {output} holds {result.summary['checkpoints']} checkpoints")
        if fitted and until is not None:
            with open_mode_file(output) as m:
                if m.T >= until:
                    return output
        sleep(interval)


# ---------------------------------------------------------------------------------------------
# The Python API for training loops


class OnlineCMD:
    """Online CMD inside a training loop (paper §3.3)::

        online = cmdtool.OnlineCMD(modes=10, warmup=20)
        for epoch in range(epochs):
            train_one_epoch(model)
            online.observe(model.state_dict())
        model.load_state_dict(online.reconstruct())   # the CMD weights at the latest epoch
        online.save("run.cmd.h5")                     # a mode file, as cmd fit --warmup writes

    The first ``warmup`` observations are kept (as float32, ``warmup · N · 4`` bytes) to find the
    modes, with the same sampling, clustering and references as ``cmd fit``; after that each
    observation updates ``a, b`` in place and is dropped. Observing the checkpoints of a folder gives
    the mode file ``cmd fit --warmup`` writes.
    """

    def __init__(self, modes: int = 10, warmup: int = 10, samples: int = 1000, seed: int = 0,
                 include: Sequence[str] = (), exclude: Sequence[str] = ()):
        if modes < 1 or samples < 1 or warmup < 2:
            raise CmdError("OnlineCMD needs modes >= 1, samples >= 1 and warmup >= 2")
        self.settings = dict(modes=modes, samples=samples, seed=seed, start=None, stop=None, every=1,
                             include=list(include), exclude=list(exclude), sampling="layer-balanced",
                             source=ONLINECMD_SOURCE, trajectory="none (OnlineCMD keeps no trajectory)",
                             warmup=warmup)
        self.warmup = warmup
        self.layout: Layout | None = None
        self._rows: list[np.ndarray] = []
        self._carried: dict[str, list[np.ndarray]] = {}
        self._names: list[str] = []
        self._times: list[int] = []
        self._latest_carried: dict = {}
        self.state: OnlineState | None = None

    @property
    def T(self) -> int:
        """Observations so far."""
        return self.state.T if self.state is not None else len(self._rows)

    @property
    def ready(self) -> bool:
        """Whether the warm-up is over and the modes exist."""
        return self.state is not None

    def observe(self, state_dict: Mapping[str, torch.Tensor], name: str | None = None, time: int | None = None) -> None:
        """Absorb the weights of one checkpoint (e.g. ``model.state_dict()`` once per epoch).
        ``name`` is the file name ``cmd reconstruct`` uses for it (default ``checkpoint_{t}.safetensors``),
        ``time`` its step or epoch number (default the count of observations)."""
        t = self.T
        name = name or f"checkpoint_{t}.safetensors"
        time = t if time is None else int(time)
        signature = {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in state_dict.items()}
        if self.layout is None:
            self.layout = build_layout(signature, self.settings["include"], self.settings["exclude"])
            self._carried = {spec.name: [] for spec in self.layout.carried}
        check_layout(f"observation {t} ({name})", signature, self.layout, "the first observation")
        if self._times and time <= self._times[-1]:
            raise CmdError(f"observation {t} ({name}): time {time} does not come after {self._times[-1]}")
        w, carried = flatten(f"observation {t} ({name})",
                             lambda k: state_dict[k].detach().to(torch.float32).reshape(-1).numpy(),
                             lambda k: state_dict[k].detach().contiguous().reshape(-1).view(torch.uint8).numpy(),
                             self.layout)
        self._latest_carried = carried
        self._names.append(name)
        self._times.append(time)
        if self.state is not None:
            self.state.observe(w, name, time, CheckpointInfo("safetensors"), carried)
            return
        self._rows.append(w)
        for key, rows in self._carried.items():
            rows.append(carried[key])
        if len(self._rows) == self.warmup:
            W = np.stack(self._rows)
            view = _TrajectoryView(None, self.layout, np.asarray(self._times, dtype=np.int64), list(self._names),
                                   [CheckpointInfo("safetensors") for _ in self._names], moving_parameters(W), W,
                                   carried_rows={k: np.stack(v) for k, v in self._carried.items()})
            with tempfile.TemporaryDirectory(prefix="cmdtool-online-") as folder:
                self.state = _warmup_state(view, self.settings, None, no_progress, Path(folder))
            self._rows, self._carried = [], {}

    def _require_modes(self, what: str) -> OnlineState:
        if self.state is None:
            raise CmdError(f"OnlineCMD.{what}: no modes yet; the warm-up needs {self.warmup} observations, "
                           f"{self.T} so far")
        return self.state

    def reconstruct(self) -> dict[str, torch.Tensor]:
        """The CMD state dict at the latest observation, loadable with ``load_state_dict(strict=True)``."""
        return self._require_modes("reconstruct").state_dict(self._latest_carried)

    def save(self, path: str | Path) -> Path:
        """Write (or atomically replace) a mode file: ``cmd info``, ``reconstruct`` and ``update`` read it."""
        return self._require_modes("save").save(Path(path))
