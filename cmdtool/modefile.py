"""The mode file (``*.cmd.h5``), format version 1: everything needed to regenerate the checkpoints.

Root datasets (documented for h5py users in docs/formats/mode-file.md):

=====================  ==========  ==========================================================
``references``         (M, T) f4   normalised reference trajectories (zero mean, unit norm)
``reference_offset``   (M,) f8     raw reference = references · reference_scale + reference_offset
``reference_scale``    (M,) f8
``reference_index``    (M,) i8     which parameter (column of the trajectory) each reference is
``labels``             (N,) u1     mode of every parameter (u2/u4 beyond 256 modes)
``a``, ``b``           (N,) f4     w_i(t) ≈ a_i · references[labels_i, t] + b_i
``time``               (T,) i8     step or epoch number of each checkpoint
``mode_sizes``         (M,) i8     parameters per mode
``checkpoints``        (T,) str    source file names
``checkpoint_info``    (T,) str    JSON per checkpoint: format, wrapper key, kept values, metadata
``layout``             str         JSON list of [name, shape, dtype, modelled, offset]
``carried/<name>``     (T, bytes)  tensors carried verbatim (integer buffers, excluded tensors)
``attachments/<sha>``  (bytes,) u1 files a Hugging Face folder copies back (config.json, ...),
                                   once each, named by the SHA-256 of their content
=====================  ==========  ==========================================================

``checkpoint_info`` and ``attachments`` grew with Hugging Face folders (``shards``, ``index``,
``files``); the new fields have defaults and the group may be absent, so older version-1 files read
as before.

Online fits (``cmd fit --warmup``, ``cmd update``, ``cmd watch``, ``OnlineCMD.save``) add a group
``online`` that version-1 readers ignore: attribute ``warmup`` (F, the checkpoints the modes were
found on), ``first`` (N,) f4 (the first checkpoint's values, for the displacement metric) and
``mode_sse_least_squares`` (M,) f8 (the least-squares error per mode, without float32 rounding).

Embedded CMD (``cmdtool.training``, paper §3.4) adds a group ``embedding`` that version-1 readers
ignore (the embedded parameters' ``a, b`` are ordinary fitted values, so older readers reconstruct
them correctly): attributes ``warmup`` (F), ``window`` (L), ``percent`` (P), ``relative`` and
``embeddable`` (how many parameters could be embedded: trainable, not references), and dataset
``embedded_at`` (N,) i4 (the checkpoint position after which each parameter was embedded, -1 never).

Root attributes: ``format = "cmdtool-modes"``, ``format_version``, ``tool_version``, ``settings``
(JSON) and ``metrics`` (JSON). Writers go to a temporary file renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

from . import modefile_checks as checks
from ._files import require_regular, temporary_sibling
from ._hdf5 import SliceReader, check_links, check_space, read_strings, read_text, write_text
from .checkpoints.schema import CheckpointInfo
from .decompose import label_dtype
from .errors import CmdError
from .layout import Layout, dataset_key
from .modes import CarriedRows, FitMetrics, FitSettings, Modes, ModesShape, OnlineInfo, dropped
from .version import __version__

FORMAT = "cmdtool-modes"
FORMAT_VERSION = 1


def check_output_path(path: Path, force: bool) -> None:
    """Refuse to write over a folder, or over an existing file without ``--force``."""
    path = Path(path)
    if path.is_dir():
        raise CmdError(f"{path}: is a directory, expected a mode-file path")
    if path.exists() and not force:
        raise CmdError(f"{path}: already exists (use --force to overwrite)")
    if not path.parent.exists():
        raise CmdError(f"{path.parent}: no such folder for the output")


CARRIED_BLOCK_BYTES = 32 * 2**20  # carried rows are read from a mode file in blocks of this size


def write_mode_file(path: Path, modes: Modes, replaces: ModeFile | None = None) -> Path:
    """Write ``modes`` as the mode file ``path``: to a temporary name beside it, renamed over it
    only when complete, so that a reader (or a kill) never sees a partial file. ``replaces``: the
    mode file at ``path``, open because ``modes`` reads from it (``cmd update``): closed before the
    rename where the platform renames no file over an open one (Windows)."""
    with ModeFileWriter(path, modes) as writer:
        writer.parameters(0, modes.labels, modes.a, modes.b, None if modes.online is None else modes.online.first)
        return writer.finish(modes, replaces)


class ModeFileWriter:
    """A mode file written while a fit streams: the references when it is made (the fit has found
    them), ``labels, a, b`` (and an online fit's ``first``) slice by slice in column order
    (``parameters``), everything else and the rename into place at ``finish``; memory is one slice,
    whatever N is. The datasets are created once, in the order ``write_mode_file`` of a whole
    ``Modes`` gives (it is this writer, with one slice), so a streamed fit's file holds the same
    bytes. Until ``finish`` the file has a temporary name beside ``path``; leaving the ``with``
    block without it removes the file.

    ``header`` is a ``Modes`` whose per-parameter arrays and metrics may still be missing: its
    layout, references, time, checkpoints, settings, carried tensors and attachments are used, and
    whether it has ``online`` state (then ``parameters`` takes ``first``; ``cmd update`` streams it)."""

    def __init__(self, path: Path, header: Modes):
        self.path, self.N, self.written = Path(path), header.layout.n_parameters, 0
        self.online = header.online is not None
        self.tmp = temporary_sibling(self.path)
        self.file = h5py.File(self.tmp, "w")
        try:
            check_space(self.tmp, checks.expected_bytes(header), self.path)
            f = self.file
            f.create_dataset("references", data=np.asarray(header.references, dtype=np.float32))
            f.create_dataset("reference_offset", data=np.asarray(header.reference_offset, dtype=np.float64))
            f.create_dataset("reference_scale", data=np.asarray(header.reference_scale, dtype=np.float64))
            f.create_dataset("reference_index", data=np.asarray(header.reference_index, dtype=np.int64))
            self.columns = [f.create_dataset(name, shape=(self.N,), dtype=dtype) for name, dtype in
                            (("labels", label_dtype(header.M)), ("a", np.float32), ("b", np.float32))]
            if self.online:
                self.columns.append(f.create_group("online").create_dataset("first", shape=(self.N,),
                                                                            dtype=np.float32))
        except BaseException:
            self.close()
            raise

    def parameters(self, start: int, labels: np.ndarray, a: np.ndarray, b: np.ndarray,
                   first: np.ndarray | None = None) -> None:
        """``labels, a, b`` of the columns from ``start`` on, which must follow the last ones written;
        ``first`` (the first checkpoint's values) exactly when the header has online state."""
        if start != self.written:
            raise RuntimeError(f"mode file {self.path}: columns from {start} written after {self.written}")
        stop = start + len(labels)
        if (first is not None) != self.online:
            raise ValueError(f"mode file {self.path}: the first checkpoint's values must be given exactly when "
                             f"the header has online state")
        if any(len(values) != stop - start for values in (a, b, first) if values is not None) or stop > self.N:
            raise ValueError(f"mode file {self.path}: columns {start}:{stop} do not fit N = {self.N}")
        if stop > start:
            for dataset, values in zip(self.columns, (labels, a, b, first)):
                dataset.write_direct(np.ascontiguousarray(values, dtype=dataset.dtype), dest_sel=np.s_[start:stop])
        self.written = stop

    def finish(self, modes: Modes, replaces: ModeFile | None = None) -> Path:
        """Write the rest of ``modes`` (its ``labels, a, b`` are those written) and rename the file
        into place (``replaces``: see ``write_mode_file``)."""
        if self.written != self.N:
            raise RuntimeError(f"mode file {self.path}: {self.written} of {self.N} columns written")
        if (modes.online is not None) != self.online:
            raise ValueError(f"mode file {self.path}: online state in only one of the header and the finished fit")
        _write_rest(self.file, modes)
        self.file.close()
        try:
            os.replace(self.tmp, self.path)
        except PermissionError:
            if replaces is None:
                raise
            replaces.close()
            os.replace(self.tmp, self.path)
        return self.path

    def close(self) -> None:
        """Close and remove the temporary file (nothing once ``finish`` has renamed it)."""
        try:
            if self.file.id.valid:
                self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ModeFileWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_rest(f: h5py.File, modes: Modes) -> None:
    """Everything of a mode file after ``labels, a, b`` and ``online/first`` (``ModeFileWriter.finish``)."""
    f.create_dataset("time", data=np.asarray(modes.time, dtype=np.int64))
    f.create_dataset("checkpoints", data=modes.names, dtype=h5py.string_dtype())
    f.create_dataset("checkpoint_info", data=[i.to_json() for i in modes.infos], dtype=h5py.string_dtype())
    write_text(f, "layout", modes.layout.to_json())
    carried = f.create_group("carried")
    for spec in modes.layout.carried:
        if spec.name in dropped(modes.layout, modes.settings):
            continue  # --drop-unmodelled
        rows = modes.carried[spec.name]
        if isinstance(rows, CarriedRows):
            dataset = carried.create_dataset(spec.key, shape=rows.shape, dtype=np.uint8)
            row = 0
            for block in rows.blocks():
                dataset[row:row + len(block)] = block
                row += len(block)
            if row != rows.shape[0]:
                raise ValueError(f"carried tensor {spec.name!r}: wrote {row} rows, expected {rows.shape[0]}")
        else:
            carried.create_dataset(spec.key, data=rows)
    for digest, data in modes.attachments.items():
        f.require_group("attachments").create_dataset(digest, data=np.frombuffer(data, dtype=np.uint8))
    if modes.online is not None:
        group = f["online"]
        group.attrs["warmup"] = int(modes.online.warmup)
        group.create_dataset("mode_sse_least_squares",
                             data=np.asarray(modes.online.mode_sse_least_squares, dtype=np.float64))
    f.create_dataset("mode_sizes", data=np.asarray(modes.mode_sizes, dtype=np.int64))
    f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, tool_version=__version__,
                   settings=json.dumps(modes.settings.to_json()), metrics=json.dumps(modes.metrics.to_json()))


@dataclass
class ModeFile(ModesShape):
    """An open, validated mode file. ``labels``, ``a``, ``b`` and carried tensors stay on disk until
    asked for: per tensor (``parameters``), at sampled columns (``sampled``), or all at once (``load``)."""
    path: Path
    handle: h5py.File
    layout: Layout
    references: np.ndarray        # (M, T) float32, normalised
    reference_offset: np.ndarray
    reference_scale: np.ndarray
    reference_index: np.ndarray
    time: np.ndarray
    names: list[str]
    infos: list[CheckpointInfo]
    mode_sizes: np.ndarray
    settings: FitSettings
    metrics: FitMetrics
    format_version: int
    tool_version: str
    warmup: int | None = None     # F of an online fit (group ``online``), else None
    embedding: dict | None = None  # attributes of the group ``embedding`` (embedded CMD), else None

    def parameters(self, columns: slice | np.ndarray = slice(None)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``labels, a, b`` of the parameters ``columns``: a slice (one tensor's range; all by
        default) or sorted column indices."""
        labels = self.handle["labels"][columns]
        if labels.size and int(labels.max()) >= self.M:
            raise CmdError(f"{self.path}: corrupt mode file (label out of range)")
        return labels, self.handle["a"][columns], self.handle["b"][columns]

    def parameter_reader(self, width: int) -> Callable[[slice], list[np.ndarray]]:
        """``parameters`` of column slices of at most ``width``, into reused buffers (``_hdf5.SliceReader``)."""
        read = SliceReader(self.handle, ("labels", "a", "b"), width, below=self.M)
        return lambda columns: read(*columns.indices(self.N)[:2])

    @property
    def dropped(self) -> list[str]:
        """Floating-point tensors the file leaves out (``cmd fit --drop-unmodelled``)."""
        return dropped(self.layout, self.settings)

    def require_whole(self, what: str) -> None:
        """Refuse ``what`` (rebuilding whole checkpoints) when tensors were dropped."""
        if self.dropped:
            more = len(self.dropped) - 3
            shown = ", ".join(self.dropped[:3]) + (f" and {more} more" if more > 0 else "")
            raise CmdError(f"{self.path}: fitted with --drop-unmodelled, it does not hold {shown}: {what} needs "
                           "every tensor (refit without --drop-unmodelled to rebuild whole checkpoints)")

    def carried(self, name: str) -> np.ndarray:
        """A carried tensor's raw bytes at every checkpoint, ``(T, nbytes)`` uint8."""
        return self.handle["carried"][dataset_key(name)][()]

    def embedded_at(self) -> np.ndarray | None:
        """Embedded CMD: per parameter the checkpoint position after which it was embedded (-1 never)."""
        return None if self.embedding is None else self.handle["embedding"]["embedded_at"][()].astype(np.int64)

    def embedded_counts(self) -> list[int] | None:
        """Embedded CMD: how many parameters were embedded at each checkpoint (a list of T)."""
        embedded_at = self.embedded_at()
        if embedded_at is None:
            return None
        return np.cumsum(np.bincount(embedded_at[embedded_at >= 0], minlength=self.T)).tolist()

    def carried_row(self, name: str, index: int) -> np.ndarray:
        """A carried tensor's raw bytes at checkpoint ``index``."""
        return self.handle["carried"][dataset_key(name)][index]

    def carried_rows(self, name: str) -> CarriedRows:
        """A carried tensor's rows, read in blocks of ``CARRIED_BLOCK_BYTES`` when written out."""
        dataset = self.handle["carried"][dataset_key(name)]

        def blocks() -> Iterator[np.ndarray]:
            step = max(1, CARRIED_BLOCK_BYTES // max(1, dataset.shape[1]))
            for start in range(0, dataset.shape[0], step):
                yield dataset[start:start + step]

        return CarriedRows(tuple(dataset.shape), blocks)

    def attachment(self, digest: str) -> bytes:
        """A file copied back with a Hugging Face folder, by the SHA-256 of its content."""
        return self.handle["attachments"][digest][()].tobytes()

    def attachments(self) -> dict[str, bytes]:
        return {digest: self.attachment(digest) for digest in self.handle.get("attachments", {})}

    def online(self) -> OnlineInfo | None:
        """An online fit's state (``cmd fit --warmup``, ``cmd update``), else None."""
        if self.warmup is None:
            return None
        return OnlineInfo(self.warmup, self.handle["online"]["first"][()], self.least_squares_error())

    def least_squares_error(self) -> np.ndarray | None:
        """An online fit's least-squares error per mode (``online/mode_sse_least_squares``), else None."""
        return None if self.warmup is None else self.handle["online"]["mode_sse_least_squares"][()]

    def first_reader(self, width: int) -> Callable[[int, int], np.ndarray]:
        """An online fit's ``first`` (the first checkpoint's values) of columns ``start:stop``, at most
        ``width`` of them, into a reused buffer (``_hdf5.SliceReader``)."""
        read = SliceReader(self.handle, ("online/first",), width)
        return lambda start, stop: read(start, stop)[0]

    def load(self) -> Modes:
        """The whole fit in memory (carried tensors stay on disk, read in blocks when written)."""
        labels, a, b = self.parameters()
        return Modes(layout=self.layout, references=self.references, reference_offset=self.reference_offset,
                     reference_scale=self.reference_scale, reference_index=self.reference_index, labels=labels,
                     a=a, b=b, mode_sizes=self.mode_sizes, time=self.time, names=list(self.names),
                     infos=list(self.infos), settings=self.settings, metrics=self.metrics,
                     carried={spec.name: self.carried_rows(spec.name) for spec in self.layout.carried
                              if spec.name not in self.dropped},
                     attachments=self.attachments(), online=self.online())

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "ModeFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_mode_file(path: Path) -> ModeFile:
    """Open and validate a mode file (validated before anything is read into memory).

    Use it as a context manager: ``with open_mode_file(path) as modes: ...``.

    Args:
        path: The mode file.

    Returns:
        The open file: ``M``, ``T``, ``N``, ``references``, ``names``, ``time``, ``layout``,
        ``settings``, ``metrics``, ``parameters()`` (labels, a, b of a column range), ``load()``
        (the whole fit in memory) and ``close()``.

    Raises:
        CmdError: Any problem, naming the file: missing, not HDF5, an unknown format version, or
            contents that are inconsistent or unsafe.
    """
    path = Path(path)
    require_regular(path, "a mode file")
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise CmdError(f"{path}: not a mode file (not HDF5, or truncated)") from None
    try:
        if handle.attrs.get("format") != FORMAT:
            raise CmdError(f"{path}: not a cmdtool mode file")
        version = handle.attrs.get("format_version", -1)
        if not checks.is_integer(version):
            shown = version.item() if isinstance(version, np.generic) else version
            raise CmdError(f"{path}: corrupt mode file (format_version {shown!r} is not an integer)")
        if version != FORMAT_VERSION:
            raise CmdError(f"{path}: mode-file format version {version} is not supported "
                           f"(this cmdtool reads version {FORMAT_VERSION}; upgrade cmdtool)")
        version = int(version)
        check_links(handle)
        checks.check_storage(handle, path.stat().st_size)
        settings, warmup = checks.read_settings(handle)
        mode_file = ModeFile(
            path=path, handle=handle, layout=Layout.from_json(read_text(handle, "layout")),
            references=handle["references"][()], reference_offset=handle["reference_offset"][()],
            reference_scale=handle["reference_scale"][()], reference_index=handle["reference_index"][()],
            time=handle["time"][()], names=read_strings(handle, "checkpoints"),
            infos=[CheckpointInfo.from_json(s) for s in read_strings(handle, "checkpoint_info")],
            mode_sizes=handle["mode_sizes"][()], settings=settings,
            metrics=FitMetrics.from_json(checks.parse_json_object(handle.attrs["metrics"], "metrics")),
            format_version=version, tool_version=str(handle.attrs.get("tool_version", "?")),
            warmup=None if warmup is None else int(warmup), embedding=checks.embedding_attributes(handle))
        _validate(mode_file)
        checks.check_contents(mode_file)
        return mode_file
    except CmdError:
        handle.close()
        raise
    except ValueError as e:
        handle.close()
        raise CmdError(f"{path}: corrupt mode file ({e})") from None
    except (KeyError, TypeError, OSError, AttributeError, RecursionError, OverflowError) as e:
        handle.close()
        text = " ".join(str(e).split())[:200]
        raise CmdError(f"{path}: corrupt mode file ({type(e).__name__}: {text})") from None


def write_embedding(path: Path, embedded_at: np.ndarray, **attributes) -> None:
    """Add the group ``embedding`` to a finished mode file that no reader sees yet (a temporary
    name): ``embedded_at`` (N,) and the attributes of ``checks.EMBEDDING_ATTRIBUTES``."""
    with h5py.File(path, "r+") as f:
        group = f.create_group("embedding")
        group.create_dataset("embedded_at", data=np.asarray(embedded_at, dtype=np.int32))
        for key, kind in checks.EMBEDDING_ATTRIBUTES.items():
            group.attrs[key] = kind(attributes[key])


def embedding_summary(modes: ModeFile) -> dict | None:
    """Embedded CMD's settings and the embedded fraction (of the embeddable parameters) at every
    checkpoint, for ``cmd info`` and ``cmd report``; None for a file without embedding."""
    counts = modes.embedded_counts()
    if counts is None:
        return None
    total = modes.embedding["embeddable"]
    fraction = [c / total if total else 0.0 for c in counts]
    return {**modes.embedding, "embedded": counts[-1], "embedded_fraction": fraction[-1], "fraction": fraction}


def _validate(mf: ModeFile) -> None:
    if mf.references.ndim != 2:
        raise CmdError(f"{mf.path}: corrupt mode file (references must be a matrix)")
    h, M, T, N = mf.handle, mf.M, mf.T, mf.N
    expected = {"labels": (N,), "a": (N,), "b": (N,), "time": (T,), "reference_index": (M,),
                "reference_offset": (M,), "reference_scale": (M,), "mode_sizes": (M,)}
    for name, shape in expected.items():
        if h[name].shape != shape:
            raise CmdError(f"{mf.path}: corrupt mode file ({name} has shape {h[name].shape}, expected {shape})")
    if len(mf.names) != T or len(mf.infos) != T:
        raise CmdError(f"{mf.path}: corrupt mode file (checkpoint list does not match T = {T})")
    if mf.warmup is not None:
        online = h["online"]
        if (online["first"].shape != (N,) or online["mode_sse_least_squares"].shape != (M,)
                or not 1 <= mf.warmup <= T):
            raise CmdError(f"{mf.path}: corrupt mode file (online state does not match N, M or T)")
    checks.check_embedding(mf)
    for spec in mf.layout.carried:
        if spec.name in dropped(mf.layout, mf.settings):
            continue
        if spec.key not in h["carried"] or h["carried"][spec.key].shape != (T, spec.nbytes):
            raise CmdError(f"{mf.path}: corrupt mode file (carried tensor {spec.name!r} missing)")
    for info in mf.infos:
        for name, digest in info.files.items():
            if digest not in h.get("attachments", {}):
                raise CmdError(f"{mf.path}: corrupt mode file (copied file {name!r} missing)")


def checkpoint_tensor_bytes(modes: ModeFile) -> tuple[int, list[str]]:
    """The bytes of the run's checkpoints as their own tensors (each in its dtype: bfloat16 runs are
    half of float32), over the tensors the mode file rebuilds (modelled and carried, not those left
    out by ``--drop-unmodelled``), and the dtypes of the modelled tensors."""
    left_out = set(modes.dropped)
    per_checkpoint = sum(spec.nbytes for spec in modes.layout.tensors if spec.name not in left_out)
    return modes.T * per_checkpoint, sorted({spec.dtype for spec in modes.layout.modelled})


def summarize(path: str | Path) -> dict:
    """The facts ``cmd info`` and ``cmd fit --json`` report about a mode file.

    Args:
        path: The mode file.

    Returns:
        The object ``cmd info --json`` prints (fields listed under "JSON output" in the formats).
    """
    path = Path(path)
    with open_mode_file(path) as modes:
        file_bytes = path.stat().st_size
        checkpoint_bytes = 4 * modes.N * modes.T
        own_bytes, own_dtypes = checkpoint_tensor_bytes(modes)
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
            "checkpoint_bytes": own_bytes,
            "checkpoint_dtypes": own_dtypes,
            "compression_ratio_checkpoint_bytes": own_bytes / file_bytes,
            "rel_error": modes.metrics.rel_error,
            "rel_error_displacement": modes.metrics.rel_error_displacement,
            "error_curve": modes.metrics.error_curve,
            "time": [int(t) for t in modes.time],
            "checkpoint_names": list(modes.names),
            "settings": modes.settings.to_json(),
            "online": None if modes.warmup is None else {"warmup": modes.warmup, "updates": modes.T - modes.warmup},
            "embedding": embedding_summary(modes),
        }
