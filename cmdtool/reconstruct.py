"""Mode file + checkpoint index -> state dict, and writing checkpoints back in the source format."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ._files import plain_name, remove_path, replace_path, temporary_sibling
from ._lazy import torch  # imported on first use
from .checkpoints import CHECKPOINT_SUFFIXES, CheckpointInfo, write_checkpoint
from .checkpoints.formats import NUMPY_DTYPES
from .checkpoints.safetensors_writer import WRITTEN_DTYPES, DeferredFiles, SafetensorsWriter, cast, stored
from .errors import CmdError
from .layout import Layout, TensorSpec
from .modefile import ModeFile
from .modes import model_values
from .statistics import Clamped, must_stay_nonnegative


def parse_at(at: str, T: int) -> list[int]:
    """``last``, ``first``, ``all`` or comma-separated positions (0-based, negative from the end)."""
    words = {"last": [T - 1], "first": [0], "all": list(range(T))}
    if at.strip() in words:
        return words[at.strip()]
    try:
        positions = [int(part) for part in at.split(",")]
    except ValueError:
        raise CmdError(f"at {at!r}: expected last, first, all or positions like 0,5,-1", parameter="at") from None
    for p in positions:
        if not -T <= p < T:
            raise CmdError(f"at {at!r}: position {p} is out of range (the mode file has {T} checkpoints, 0..{T - 1})",
                           parameter="at")
    return sorted({p % T for p in positions})


def _carried_tensor(raw: np.ndarray, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    return torch.from_numpy(raw.copy()).view(getattr(torch, dtype)).reshape(shape)


def assemble_state_dict(layout: Layout, modelled: Callable[[TensorSpec], np.ndarray],
                        carried: Callable[[TensorSpec], np.ndarray]) -> dict[str, torch.Tensor]:
    """A state dict in the layout's order: ``modelled(spec)`` gives a modelled tensor's flat values
    (cast to its source dtype), ``carried(spec)`` a carried tensor's raw bytes."""
    state = {}
    for spec in layout.tensors:
        if spec.modelled:
            values = np.ascontiguousarray(modelled(spec)).reshape(spec.shape)
            state[spec.name] = torch.from_numpy(values).to(getattr(torch, spec.dtype))
        else:
            state[spec.name] = _carried_tensor(carried(spec), spec.shape, spec.dtype)
    return state


def _written_directly(modes: ModeFile) -> bool:
    """Whether every tensor has a dtype ``SafetensorsWriter`` writes (then no torch is imported, which
    takes longer than the work, and no state dict is built)."""
    return all(spec.dtype in WRITTEN_DTYPES for spec in modes.layout.tensors)


Parameters = tuple[np.ndarray, np.ndarray, np.ndarray]


def _values_at(modes: ModeFile, index: int, parameters: Parameters | None = None, clamped: Clamped | None = None
               ) -> Iterator[tuple[TensorSpec, np.ndarray]]:
    """Per tensor at checkpoint ``index``: a modelled tensor's ``a · r[label, t] + b`` in float64
    (shaped; a running variance clamped at 0, counted in ``clamped``), a carried tensor's raw bytes.
    ``parameters``: every ``labels, a, b`` read once for many checkpoints; else each tensor's are
    read from the file (memory: one tensor at a time)."""
    clamped = Clamped() if clamped is None else clamped
    modes.require_whole("reconstructing a checkpoint")
    reference_values = modes.references[:, index].astype(np.float64)
    for spec in modes.layout.tensors:
        if spec.modelled:
            labels, a, b = ((v[spec.columns] for v in parameters) if parameters is not None
                            else modes.parameters(spec.columns))
            yield spec, clamped.array(spec.name, model_values(labels, a, b, reference_values).reshape(spec.shape))
        else:
            yield spec, modes.carried_row(spec.name, index)


def arrays_at(modes: ModeFile, index: int, parameters: Parameters | None = None, clamped: Clamped | None = None
              ) -> dict[str, np.ndarray]:
    """``state_dict_at`` as numpy arrays (every tensor's dtype must be in ``NUMPY_DTYPES``);
    the values are the same, rounded from float64 the same way (``safetensors_writer.cast``)."""
    if not all(spec.dtype in NUMPY_DTYPES for spec in modes.layout.tensors):
        raise ValueError("arrays_at: a tensor's dtype is not one numpy holds")
    return {spec.name: cast(values, spec.dtype) if spec.modelled else values.view(spec.dtype).reshape(spec.shape)
            for spec, values in _values_at(modes, index, parameters, clamped)}


def state_dict_at(modes: ModeFile, index: int, parameters: Parameters | None = None, clamped: Clamped | None = None
                  ) -> dict[str, torch.Tensor]:
    """The CMD state dict at checkpoint ``index``: ``a · r[label, t] + b`` in float64, then cast to
    each tensor's source dtype; carried tensors as they were; a running variance never negative
    (clamped at 0, counted in ``clamped``). Memory: one tensor at a time."""
    return {spec.name: torch.from_numpy(values).to(getattr(torch, spec.dtype)) if spec.modelled
            else _carried_tensor(values, spec.shape, spec.dtype)
            for spec, values in _values_at(modes, index, parameters, clamped)}


CHUNK_BYTES = 2 * 2**20   # float64 values of one slice of columns (all checkpoints of a group): stays in the CPU cache
STAGE_BYTES = 16 * 2**20  # one tensor's cast values, all checkpoints of a group, gathered for fewer, larger writes
SPAN_COLUMNS = 1 << 18    # columns whose labels, a, b are read at a time: memory does not grow with the largest tensor
GROUP_FILES = 64          # checkpoints written together (open files; each tensor's labels, a, b read once per group)

ParameterSpans = Callable[[int, int], Sequence[np.ndarray]]  # columns start:stop of a tensor -> its labels, a, b there


def _write_modelled(writers: Sequence[SafetensorsWriter], spec: TensorSpec, R: np.ndarray, parameters: ParameterSpans,
                    clamped: Clamped | None = None) -> None:
    """Tensor ``spec`` at the group's checkpoints, ``R`` their ``(g, M)`` float64 reference values:
    ``a · r[label] + b`` in float64 and cast to the tensor's dtype (``cast``), as ``model_values`` and
    ``state_dict_at`` compute it (the same operations on the same operands, so the same bits), column
    slice by column slice, ``parameters(start, stop)`` giving ``labels, a, b`` of the tensor's
    columns ``start:stop``. A slice whose every ``a`` is 0 and ``b`` is not is ``b`` at every
    checkpoint, exactly (``0 · r`` is ±0, and ``b + ±0`` is ``b`` for ``b ≠ 0``). A running
    variance is clamped at 0 (``clamped``), as ``_values_at`` does."""
    g, dtype = len(writers), stored(spec.dtype)
    nonnegative, clamped = must_stay_nonnegative(spec.name), Clamped() if clamped is None else clamped
    step = max(1, min(CHUNK_BYTES // (8 * g), SPAN_COLUMNS))
    span = step * max(1, min(STAGE_BYTES // (dtype.itemsize * g * step), SPAN_COLUMNS // step))
    work = np.empty(g * min(step, spec.size))
    staged = np.empty(g * min(span, spec.size) * dtype.itemsize, dtype=np.uint8)
    for start in range(0, spec.size, span):
        stop = min(start + span, spec.size)
        labels, a, b = parameters(start, stop)
        if not a.any() and b.all():  # frozen columns: the same bytes at every checkpoint
            values = cast(clamped.array(spec.name, b.astype(np.float64), times=g), spec.dtype)
            for writer in writers:
                writer.write(spec.name, values, start * dtype.itemsize)
            continue
        stage = staged[:g * (stop - start) * dtype.itemsize].view(dtype).reshape(g, stop - start)
        for first in range(0, stop - start, step):
            last = min(first + step, stop - start)
            into = stage[:, first:last]
            a_slice, b_slice = a[first:last], b[first:last].astype(np.float64)
            if not a_slice.any() and b_slice.all() and not (nonnegative and (b_slice < 0).any()):
                cast(b_slice, spec.dtype, into)
                continue
            values = work[:g * (last - first)].reshape(g, last - first)
            np.take(R, labels[first:last], axis=1, out=values, mode="clip")  # labels checked < M when read
            values *= a_slice.astype(np.float64)
            values += b_slice
            cast(clamped.array(spec.name, values) if nonnegative else values, spec.dtype, into)
        for row, writer in zip(stage, writers):
            writer.write(spec.name, row, start * dtype.itemsize)


TensorWriter = Callable[[Sequence[SafetensorsWriter], TensorSpec], None]


class Reconstruction:
    """The weights ``write_checkpoints`` writes unless told others (``cmd export``'s families are
    the others): the CMD reconstruction of each checkpoint. Such an object gives a checkpoint's
    ``state`` dict (for torch's writers) and a ``writer`` that writes one tensor at many checkpoints
    into their safetensors files (``SafetensorsWriter``, one per checkpoint), in bounded memory."""

    def __init__(self, modes: ModeFile):
        self.modes = modes

    def state(self, index: int, clamped: Clamped) -> dict[str, torch.Tensor]:
        return state_dict_at(self.modes, index, clamped=clamped)

    def writer(self, indices: Sequence[int], clamped: Clamped) -> TensorWriter:
        """Each tensor's ``labels, a, b`` read once for all ``indices``, a span at a time (``_write_modelled``)."""
        modes = self.modes
        R = np.ascontiguousarray(modes.references[:, indices].T, dtype=np.float64)  # (g, M)
        read = modes.parameter_reader(min(SPAN_COLUMNS, max((spec.size for spec in modes.layout.modelled), default=0)))

        def write(writers: Sequence[SafetensorsWriter], spec: TensorSpec) -> None:
            if spec.modelled:
                columns = spec.offset
                _write_modelled(writers, spec, R, lambda start, stop: read(slice(columns + start, columns + stop)),
                                clamped)
            else:
                for writer, i in zip(writers, indices):
                    writer.write(spec.name, np.ascontiguousarray(modes.carried_row(spec.name, i)))

        return write


def _write_safetensors(modes: ModeFile, group: Sequence[tuple[int, Path, CheckpointInfo, Path]],
                       weights: Reconstruction, clamped: Clamped) -> None:
    """Checkpoints ``(index, path, info, shown)`` as safetensors files (or Hugging Face folders of
    them) written directly (every dtype ``SafetensorsWriter`` writes): the same bytes as
    ``save_file`` of ``weights.state``, tensor by tensor, each tensor computed once for the group."""
    files = DeferredFiles([(spec.name, spec.dtype, spec.shape) for spec in modes.layout.tensors])
    try:
        for _, path, info, shown in group:
            write_checkpoint(path, files, info, modes.attachment, shown=shown)  # the files and their headers
        write = weights.writer([i for i, *_ in group], clamped)
        for spec in modes.layout.tensors:
            write(files.writers, spec)
    finally:
        files.close()


WRITE_FORMATS = ("source", "safetensors")


def output_plan(name: str, info: CheckpointInfo, fmt: str = "source") -> tuple[str, CheckpointInfo, list[str]]:
    """The name and write-back info of a reconstructed checkpoint, and what it does not restore.

    ``fmt="source"`` writes what the source was; ``"safetensors"`` a plain safetensors state dict
    (``epoch_3.pt`` -> ``epoch_3.safetensors``, ``checkpoint-500/`` -> ``checkpoint-500.safetensors``).
    """
    if fmt == "source":
        return name, info, list(info.dropped)
    if fmt != "safetensors":
        raise CmdError(f"format {fmt!r}: expected one of {', '.join(WRITE_FORMATS)}", parameter="format")
    stem = next((name[: -len(s)] for s in CHECKPOINT_SUFFIXES if name.endswith(s)), name)
    metadata = {**(info.metadata or {}), "format": "pt"} if info.format == "safetensors" else {"format": "pt"}
    lost = [*info.dropped, *info.extras, *info.files, *([info.index["name"]] if info.index else [])]
    return stem + ".safetensors", CheckpointInfo("safetensors", metadata=metadata), lost


def write_checkpoints(modes: ModeFile, out_dir: Path, indices: Sequence[int], force: bool = False,
                      advance: Callable[[int], None] = lambda n: None, fmt: str = "source",
                      clamped: Clamped | None = None,
                      states: Callable[[int], dict[str, torch.Tensor]] | None = None,
                      weights: Reconstruction | None = None) -> list[Path]:
    """Write the checkpoints ``indices`` into ``out_dir`` under their source names and format
    (``fmt="safetensors"``: as plain safetensors files, see ``output_plan``). Running variances
    clamped at 0 are counted in ``clamped``. ``weights``: what to write under checkpoint ``i``'s
    name instead of its CMD reconstruction (``cmd export``'s families, see ``Reconstruction``);
    ``states(i)``: a state dict to write instead (``--recalibrate``: the user's function made it).

    Safetensors files and Hugging Face folders of them, of dtypes ``SafetensorsWriter`` writes, are
    written tensor by tensor, many checkpoints at once: memory does not grow with the number of
    parameters. Other formats are written from a whole state dict, one checkpoint at a time:
    torch's writers (``torch.save``, ``torch.distributed.checkpoint``) need it whole.

    All files (and Hugging Face folders) go to temporary names first and are renamed into place
    only when every one is written; nothing existing is overwritten without ``force``, and nothing
    outside ``out_dir`` is ever created, replaced or deleted: every name is one plain file name
    (``open_mode_file`` checks that too), two checkpoints never share one, links are not replaced.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CmdError(f"{out_dir}: is a file, expected an output folder")
    plans = [output_plan(modes.names[i], modes.infos[i], fmt) for i in indices]
    targets = []
    for name, _, _ in plans:
        try:
            targets.append(out_dir / plain_name(name, "checkpoint name"))
        except ValueError as e:
            raise CmdError(f"{modes.path}: {e}; refusing to write outside {out_dir}") from None
    for target, (_, info, _) in zip(targets, plans):
        if targets.count(target) > 1:
            raise CmdError(f"{target}: two checkpoints would be written under this name")
        if target.is_symlink():
            raise CmdError(f"{target}: is a symbolic link; cmdtool does not replace links (remove it first)")
        if target.is_dir() and not info.is_folder:
            raise CmdError(f"{target}: is a directory")
        if target.exists() and not force:
            raise CmdError(f"{target}: already exists (use --force to overwrite)")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    clamped = Clamped() if clamped is None else clamped
    weights = Reconstruction(modes) if weights is None else weights
    direct = [states is None and info.format == "safetensors" and _written_directly(modes) for _, info, _ in plans]
    written: list[tuple[Path, Path]] = []
    done = False
    try:
        group: list[tuple[int, Path, CheckpointInfo, Path]] = []
        for n, (i, target, (_, info, _)) in enumerate(zip(indices, targets, plans)):
            tmp = temporary_sibling(target)
            written.append((tmp, target))
            if direct[n]:  # safetensors files: written by ``_write_safetensors``, in groups
                group.append((i, tmp, info, target))
                if len(group) == GROUP_FILES or n + 1 == len(indices) or not direct[n + 1]:
                    _write_safetensors(modes, group, weights, clamped)
                    advance(len(group))
                    group = []
                continue
            # the checkpoint's state dict, built tensor by tensor: memory is the checkpoint, not N more
            state = states(i) if states is not None else weights.state(i, clamped)
            write_checkpoint(tmp, state, info, modes.attachment, shown=target)
            advance(1)
        for tmp, target in written:
            replace_path(tmp, target)
        done = True
    finally:
        for tmp, _ in written:
            remove_path(tmp)
        if created and not done:
            shutil.rmtree(out_dir, ignore_errors=True)  # it was made for this run, and holds nothing of it
    return targets
