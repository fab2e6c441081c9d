"""``cmd update``: absorb checkpoints that come after a mode file's last one (online CMD, paper §3.3).

The update streams: the new checkpoints' reference values move the frame (``M`` values each), then
one pass over column tiles reads each tile's ``labels, a, b`` from the mode file and the new
checkpoints' values of those columns, updates ``a, b`` (``least_squares.update_parameters``) and
writes the tile into the new mode file (``modefile.ModeFileWriter``). At most ``OPEN_AT_ONCE`` new
checkpoints are open together: more take one pass per group, the float64 ``a, b`` waiting between
passes in a scratch file beside the mode file. Memory is a few tiles, whatever N is, and the file
is the one ``OnlineState`` (which holds every parameter in memory, as ``OnlineCMD``, ``cmd fit
--warmup`` and the estimator must) writes after the same update, bit for bit.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, Sequence

import h5py
import numpy as np

from .._files import exclusive, temporary_sibling
from .._hdf5 import check_space
from ..checkpoints import Checkpoint, checkpoint_at, discover, name_number, natural_key, times_from_names
from ..checkpoints.schema import CheckpointInfo
from ..errors import CmdError
from ..layout import Layout, check_same_tensors
from ..modefile import ModeFile, ModeFileWriter, open_mode_file, summarize
from ..modes import FitMetrics, Modes, OnlineInfo
from ..progress import Progress, no_progress
from ..trajectory import TrajectoryStore, open_store, read_columns
from .least_squares import (
    BLOCK,
    FrameUpdate,
    ObservationSums,
    RunningSums,
    observation_sums,
    running_sums,
    update_frame,
    update_parameters,
)
from .state import appended_rows

if TYPE_CHECKING:
    from ..checkpoints.formats import Reader

TILE_COLUMNS = 4 * BLOCK  # columns of one tile: whole blocks of update_parameters, whose sums then run as in one call
OPEN_AT_ONCE = 32         # new checkpoints open together during one pass over the tiles (file handles)
DCP_AT_ONCE = 2           # the same for DCP folders: each holds the tensor it read last, whole


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
    from_names = times_from_names(modes.names) == [int(t) for t in modes.time]
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


class _Columns:
    """Columns ``start:stop`` of one open checkpoint's trajectory row as ``flatten`` gives them
    (flat float32, NaN and Inf refused), read span by span of the tensors they cover: from a
    safetensors file only those bytes (a torch file's tensors are memory-mapped and cut), so memory
    is one tile whatever the tensors' sizes."""

    def __init__(self, reader: Reader, path: Path, layout: Layout):
        self.reader, self.path, self.specs = reader, path, layout.modelled
        self.offsets = [spec.offset for spec in self.specs]

    def __call__(self, start: int, stop: int) -> np.ndarray:
        return read_columns(self.reader, self.path, self.specs, self.offsets, start, stop)[0]


def _open_checked(checkpoint: Checkpoint, modes: ModeFile, expected_name: str, opened: ExitStack) -> _Columns:
    """Open ``checkpoint`` until ``opened`` closes (which checks that no file changed meanwhile), and
    check that it holds the mode file's tensors (``expected_name`` in the message)."""
    reader = opened.enter_context(checkpoint.open(modes.settings.ema))
    check_same_tensors(checkpoint.path, reader.signature, modes.layout.signature, expected_name)
    return _Columns(reader, checkpoint.path, modes.layout)


def _fit_store(modes: ModeFile) -> TrajectoryStore | None:
    """The trajectory store of a plain ``cmd fit``, open, if it is still there, unchanged, and starts
    with the fit's first checkpoint; else None."""
    settings = modes.settings
    if not settings.trajectory or not Path(settings.trajectory).is_file():
        return None
    try:
        store = open_store(Path(settings.trajectory))
    except CmdError:
        return None
    fresh = not settings.trajectory_fingerprint or store.fingerprint == settings.trajectory_fingerprint
    if fresh and store.names[0] == modes.names[0] and store.layout.to_json() == modes.layout.to_json():
        return store
    store.handle.close()
    return None


@contextmanager
def _first_values(modes: ModeFile, candidates: Sequence[Checkpoint]) -> Iterator[Callable[[int, int], np.ndarray]]:
    """The first checkpoint's values of columns ``start:stop``, for the displacement error: the mode
    file's own (online state), or for a mode file without online state (a plain ``cmd fit``) from a
    given checkpoint of that name, the fit's trajectory store, or the fit's folder, in that order."""
    if modes.warmup is not None:
        yield modes.first_reader(TILE_COLUMNS)
        return
    name, settings = modes.names[0], modes.settings
    checkpoint = next((c for c in candidates if c.name == name), None)
    store = None if checkpoint is not None else _fit_store(modes)
    if store is not None:
        try:
            yield lambda start, stop: np.asarray(store.W[0, start:stop])
        finally:
            store.handle.close()
        return
    source = Path(settings.source) / name
    if checkpoint is None and settings.source and source.exists():
        checkpoint = checkpoint_at(source)
    if checkpoint is None:
        raise CmdError(f"{modes.path}: the first update of a mode file needs its first checkpoint ({name}) "
                       f"for the displacement error, and neither the fit's trajectory store nor "
                       f"{source} is there; pass {name} along with the new checkpoints")
    with ExitStack() as opened:
        yield _open_checked(checkpoint, modes, name, opened)


@dataclass
class _Appended:
    """What the new checkpoints add besides every parameter's ``a, b``, kept in memory: the frame
    (references, offset, scale) after each, and their names, times, infos, carried rows and
    attachments; ``O(M · T)`` and the carried tensors, nothing of size N."""
    references: np.ndarray  # (M, T) float64, normalised, after the last checkpoint observed
    offset: np.ndarray
    scale: np.ndarray
    time: list[int]
    names: list[str]
    infos: list[CheckpointInfo]
    carried: dict[str, list[np.ndarray]]
    attachments: dict[str, bytes]

    @classmethod
    def start(cls, modes: ModeFile) -> "_Appended":
        return cls(modes.references.astype(np.float64), modes.reference_offset.astype(np.float64),
                   modes.reference_scale.astype(np.float64), [], [], [],
                   {spec.name: [] for spec in modes.layout.carried}, modes.attachments())

    def observe(self, checkpoint: Checkpoint, columns: _Columns, reference_index: np.ndarray) -> FrameUpdate:
        """One new checkpoint's reference values (``M`` columns read, not its row) move the frame
        (``update_frame``); its info, carried rows and copied files are kept for the new file."""
        values = np.array([columns(i, i + 1)[0] for i in reference_index.tolist()], dtype=np.float32)
        frame = update_frame(self.references, self.offset, self.scale, values)
        self.references, self.offset, self.scale = frame.references, frame.offset, frame.scale
        reader = columns.reader
        self.time.append(int(checkpoint.time))
        self.names.append(checkpoint.name)
        self.infos.append(reader.info)
        self.attachments.update(reader.attachments)
        for name, rows in self.carried.items():
            rows.append(np.asarray(reader.raw_bytes(name).copy(), dtype=np.uint8))
        return frame

    def header(self, modes: ModeFile) -> Modes:
        """The updated mode file without what the pass over the tiles writes (``labels, a, b``,
        ``first``) or sums (the metrics, the least-squares error): a ``ModeFileWriter``'s header."""
        return Modes(
            layout=modes.layout, references=self.references.astype(np.float32), reference_offset=self.offset,
            reference_scale=self.scale, reference_index=modes.reference_index.astype(np.int64), labels=None,
            a=None, b=None, mode_sizes=modes.mode_sizes, time=np.array([*modes.time, *self.time], dtype=np.int64),
            names=[*modes.names, *self.names], infos=[*modes.infos, *self.infos], settings=modes.settings,
            metrics=None, attachments=dict(self.attachments),
            carried={name: appended_rows(modes.carried_rows(name), rows) for name, rows in self.carried.items()},
            online=OnlineInfo(modes.T if modes.warmup is None else modes.warmup, None, None))


@dataclass
class UpdateResult:
    """What ``update`` returns.

    Attributes:
        mode_file: The updated mode file.
        absorbed: Names of the checkpoints absorbed, in order.
        skipped: Names of those already in the mode file.
        summary: What ``cmd info --json`` prints about the updated file.
        notes: What the update changed besides ``a, b``.
    """

    mode_file: Path
    absorbed: list[str]
    skipped: list[str]
    summary: dict
    notes: list[str] = field(default_factory=list)  # what the update changed besides a, b (for the CLI to say)


def update(mode_file: str | Path, checkpoints: Sequence[str | Path], progress: Progress = no_progress) -> UpdateResult:
    """``cmd update``: absorb the checkpoints (files or folders) that come after the mode file's
    last one. Ones already in the file are skipped; an earlier, incompatible or unreadable one is a
    CmdError and the mode file is left untouched (all are opened and their tensors checked before
    anything is written, their values as they are read, and the new file replaces the old one only
    when complete). Memory does not grow with the number of parameters: see the module docstring.

    Args:
        mode_file: The mode file to extend (replaced atomically, under a lock against a concurrent update).
        checkpoints: Checkpoint files, Hugging Face ``checkpoint-<step>/`` folders or run folders.
        progress: Progress callback.

    Returns:
        The names absorbed and skipped, and the updated summary.

    Raises:
        CmdError: A checkpoint earlier than the file's last one, other tensors, NaN or Inf values, an
            unreadable file; the mode file is then unchanged.
    """
    mode_file = Path(mode_file)
    candidates = _gather(checkpoints)
    if not mode_file.is_file():
        open_mode_file(mode_file).close()  # the message for a missing file or a folder; no lock file left
    with exclusive(mode_file), open_mode_file(mode_file) as modes:
        modes.require_whole("cmd update")  # it appends every carried tensor's rows
        skipped, new = plan_update(modes, candidates)
        notes = []
        if new and modes.embedding is not None:
            notes.append("the embedding record of embedded CMD is dropped: an update continues the file as a "
                         "plain online fit (every parameter's a, b updated)")
        if new:
            for c in new:
                with ExitStack() as opened:
                    _open_checked(c, modes, modes.names[0], opened)
            with _first_values(modes, candidates) as first:
                _absorb(mode_file, modes, new, first, progress)
    return UpdateResult(mode_file, [c.name for c in new], [c.name for c in skipped], summarize(mode_file), notes)


def _absorb(mode_file: Path, modes: ModeFile, new: Sequence[Checkpoint], first: Callable[[int, int], np.ndarray],
            progress: Progress) -> Path:
    """Online CMD (paper §3.3) of the checked checkpoints ``new`` into ``modes``, streamed. Per group
    of ``OPEN_AT_ONCE`` checkpoints (``DCP_AT_ONCE`` DCP folders: a DCP reader keeps the tensor it
    read last, whole, so that a tile does not read it again), open together: their reference values move the frame
    (``update_frame``), then one pass over the column tiles updates every parameter's ``a, b`` for
    each of them in order (``update_parameters``). The last pass writes the new mode file, which
    replaces the old one when complete. Memory is a few tiles, whatever N is; the file is the one
    ``OnlineState`` writes after the same updates in memory, bit for bit (the same sums, in the
    same order)."""
    at_once = DCP_AT_ONCE if any(c.format == "dcp" for c in new) else OPEN_AT_ONCE
    groups = [new[start:start + at_once] for start in range(0, len(new), at_once)]
    appended, sums = _Appended.start(modes), []
    with ExitStack() as files:
        scratch = files.enter_context(_Scratch(mode_file, modes.N)) if len(groups) > 1 else None
        for g, group in enumerate(groups):
            last = g == len(groups) - 1
            with ExitStack() as opened:
                columns = [_open_checked(c, modes, modes.names[0], opened) for c in group]
                frames = [appended.observe(c, read, modes.reference_index) for c, read in zip(group, columns)]
                if last:
                    header = appended.header(modes)
                    writer = files.enter_context(ModeFileWriter(mode_file, header))
                    new_file = _NewFile(writer, modes.M, header.T)
                running = [running_sums(modes.references, modes.M) for _ in group]
                with progress("updating modes", modes.N) as advance:
                    for tile in _updated_tiles(modes, columns, frames, running, first,
                                               None if g == 0 else scratch.read):
                        if last:
                            new_file.write(tile)
                        else:
                            scratch.write(tile.start, tile.a, tile.b)
                        advance(len(tile.a))
                sums += [observation_sums(r, frame) for r, frame in zip(running, frames)]
        return writer.finish(_finished(modes, header, sums, new_file.rounding), replaces=modes)


class _Tile(NamedTuple):
    """Columns ``start:start + len(a)`` after a pass's updates."""
    start: int
    labels: np.ndarray  # as the mode file stores them
    index: np.ndarray   # the labels as int64
    a: np.ndarray       # float64
    b: np.ndarray
    first: np.ndarray   # float32, the first checkpoint's values


def _updated_tiles(modes: ModeFile, columns: Sequence[_Columns], frames: Sequence[FrameUpdate],
                   running: Sequence[RunningSums], first: Callable[[int, int], np.ndarray],
                   load: Callable[[int, int], tuple[np.ndarray, np.ndarray]] | None) -> Iterator[_Tile]:
    """One pass over the column tiles for a group of new checkpoints: a tile's labels come from the
    mode file, its float64 ``a, b`` from the mode file's float32 ones (``load`` None) or from the
    previous pass (``load(start, stop)``); each checkpoint of the group, in order, updates them
    (``update_parameters``, its sums running on in ``running``)."""
    read, N = modes.parameter_reader(TILE_COLUMNS), modes.N
    for start in range(0, N, TILE_COLUMNS):
        stop = min(start + TILE_COLUMNS, N)
        labels, a, b = read(slice(start, stop))
        a, b = (a.astype(np.float64), b.astype(np.float64)) if load is None else load(start, stop)
        index, before = labels.astype(np.int64), first(start, stop)
        for values, frame, sums in zip(columns, frames, running):
            update_parameters(a, b, before, index, [values(start, stop)], frame, running=sums)
        yield _Tile(start, labels, index, a, b, before)


class _Scratch:
    """Every parameter's float64 ``a, b`` between two passes over the tiles (more new checkpoints
    than ``OPEN_AT_ONCE``), so that the passes give what one pass would, bit for bit: an HDF5 file
    beside the mode file, removed when done (or by the next update, if this one was killed)."""

    def __init__(self, mode_file: Path, N: int):
        self.path = temporary_sibling(mode_file.with_name(mode_file.name + ".scratch"))
        self.file = h5py.File(self.path, "w")
        try:
            check_space(self.path, 16 * N + 2**16, mode_file)
            self.a, self.b = (self.file.create_dataset(name, shape=(N,), dtype=np.float64) for name in ("a", "b"))
        except BaseException:
            self.close()
            raise

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self.a[start:stop], self.b[start:stop]

    def write(self, start: int, a: np.ndarray, b: np.ndarray) -> None:
        self.a[start:start + len(a)], self.b[start:start + len(b)] = a, b

    def close(self) -> None:
        try:
            if self.file.id.valid:
                self.file.close()
        finally:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "_Scratch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _add_by_mode(totals: np.ndarray, labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``totals`` plus ``values`` summed per mode, continuing each mode's running sum value by value:
    over consecutive tiles, the bits of one ``np.bincount`` over all columns (which adds in order)."""
    M = len(totals)
    return np.bincount(np.concatenate([np.arange(M), labels]), weights=np.concatenate([totals, values]), minlength=M)


class _NewFile:
    """The last pass's end of a tile: ``a, b`` rounded to float32 into the new mode file, with the
    rounding's share of each mode's error (added as ``OnlineState.to_modes`` adds it)."""

    def __init__(self, writer: ModeFileWriter, M: int, T: int):
        self.writer, self.T, self.rounding = writer, T, np.zeros(M)

    def write(self, tile: _Tile) -> None:
        a32, b32 = tile.a.astype(np.float32), tile.b.astype(np.float32)
        self.rounding = _add_by_mode(self.rounding, tile.index, (tile.a - a32) ** 2 + self.T * (tile.b - b32) ** 2)
        self.writer.parameters(tile.start, tile.labels, a32, b32, tile.first)


def _finished(modes: ModeFile, header: Modes, sums: Sequence[ObservationSums], rounding: np.ndarray) -> Modes:
    """The new mode file's metrics and least-squares error: the old file's sums plus each new
    checkpoint's, in order (as ``OnlineState.observe`` adds them), and the float32 rounding of the
    new ``a, b`` (as ``OnlineState.to_modes``)."""
    old = modes.metrics
    least_squares = np.array(old.mode_sse if modes.warmup is None else modes.least_squares_error(), dtype=np.float64)
    sq_norm, sq_displacement, sq_centred = old.sq_norm, old.sq_displacement, old.sq_centred
    for observed in sums:
        sq_norm += observed.sq_norm
        sq_displacement += observed.sq_displacement
        sq_centred += observed.sq_centred
        least_squares += observed.mode_sse
    mode_sse = least_squares + rounding
    metrics = FitMetrics.of(sse=float(mode_sse.sum()), mode_sse=mode_sse, sq_norm=sq_norm,
                            sq_displacement=sq_displacement, sq_centred=sq_centred, error_curve=old.error_curve)
    return replace(header, metrics=metrics, online=OnlineInfo(header.online.warmup, None, least_squares))


