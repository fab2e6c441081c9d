"""The mode file (``*.cmd.h5``), format version 1: everything needed to regenerate the checkpoints.

Root datasets (documented in the README for h5py users):

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

Root attributes: ``format = "cmdtool-modes"``, ``format_version``, ``tool_version``, ``settings``
(JSON) and ``metrics`` (JSON). Writers go to a temporary file renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ._hdf5 import read_strings, read_text, check_space, write_text
from .checkpoints import CheckpointInfo
from .errors import CmdError
from .layout import Layout, dataset_key

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


class ModeFileWriter:
    """Create a mode file: ``write_tile`` per column block, then ``finish`` renames it into place."""

    def __init__(self, path: Path, *, layout: Layout, time: np.ndarray, names: list[str],
                 infos: list[CheckpointInfo], references: np.ndarray, reference_offset: np.ndarray,
                 reference_scale: np.ndarray, reference_index: np.ndarray, label_dtype: np.dtype):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        N = layout.n_parameters
        self.f = h5py.File(self.tmp, "w")
        try:  # a, b, labels, references, carried rows and text, and room for HDF5's own
            text = sum(len(i.to_json()) + len(n) for i, n in zip(infos, names)) + len(layout.to_json())
            check_space(self.tmp, N * (8 + np.dtype(label_dtype).itemsize) + 4 * np.size(references) + text
                    + len(time) * sum(spec.nbytes for spec in layout.carried) + 2**16, self.path)
        except BaseException:
            self.abort()
            raise
        f = self.f
        f.create_dataset("references", data=references.astype(np.float32))
        f.create_dataset("reference_offset", data=np.asarray(reference_offset, dtype=np.float64))
        f.create_dataset("reference_scale", data=np.asarray(reference_scale, dtype=np.float64))
        f.create_dataset("reference_index", data=np.asarray(reference_index, dtype=np.int64))
        f.create_dataset("labels", shape=(N,), dtype=label_dtype)
        f.create_dataset("a", shape=(N,), dtype=np.float32)
        f.create_dataset("b", shape=(N,), dtype=np.float32)
        f.create_dataset("time", data=np.asarray(time, dtype=np.int64))
        f.create_dataset("checkpoints", data=names, dtype=h5py.string_dtype())
        f.create_dataset("checkpoint_info", data=[i.to_json() for i in infos], dtype=h5py.string_dtype())
        write_text(f, "layout", layout.to_json())
        f.create_group("carried")

    def write_tile(self, start: int, labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
        stop = start + len(labels)
        self.f["labels"][start:stop] = labels
        self.f["a"][start:stop] = a.astype(np.float32)
        self.f["b"][start:stop] = b.astype(np.float32)

    def write_carried(self, name: str, raw: np.ndarray) -> None:
        self.f["carried"].create_dataset(dataset_key(name), data=raw)

    def write_attachment(self, digest: str, data: bytes) -> None:
        self.f.require_group("attachments").create_dataset(digest, data=np.frombuffer(data, dtype=np.uint8))

    def write_carried_rows(self, name: str, shape: tuple[int, int], chunks) -> None:
        """A carried tensor written in row blocks (``chunks`` yields ``(T_block, bytes)`` arrays)."""
        dataset = self.f["carried"].create_dataset(dataset_key(name), shape=shape, dtype=np.uint8)
        row = 0
        for chunk in chunks:
            dataset[row:row + len(chunk)] = chunk
            row += len(chunk)
        if row != shape[0]:
            raise ValueError(f"carried tensor {name!r}: wrote {row} rows, expected {shape[0]}")

    def write_online(self, *, warmup: int, first: np.ndarray, mode_sse_least_squares: np.ndarray) -> None:
        """The state an online update needs beyond version 1 (see the module docstring)."""
        group = self.f.create_group("online")
        group.attrs["warmup"] = int(warmup)
        group.create_dataset("first", data=np.asarray(first, dtype=np.float32))
        group.create_dataset("mode_sse_least_squares", data=np.asarray(mode_sse_least_squares, dtype=np.float64))

    def finish(self, *, mode_sizes: np.ndarray, settings: dict, metrics: dict, tool_version: str) -> Path:
        self.f.create_dataset("mode_sizes", data=np.asarray(mode_sizes, dtype=np.int64))
        self.f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, tool_version=tool_version,
                            settings=json.dumps(settings), metrics=json.dumps(metrics))
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


@dataclass
class ModeFile:
    """An open, validated mode file. ``a``, ``b``, ``labels`` stay on disk; slice them per tensor."""
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
    settings: dict
    metrics: dict
    format_version: int
    tool_version: str
    online: dict | None = None    # {"warmup": F} for an online fit (group ``online``), else None

    @property
    def M(self) -> int:
        return self.references.shape[0]

    @property
    def T(self) -> int:
        return self.references.shape[1]

    @property
    def N(self) -> int:
        return self.layout.n_parameters

    def parameters(self, columns: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``labels, a, b`` of the parameters in ``columns`` (one tensor's range)."""
        labels = self.handle["labels"][columns]
        if labels.size and int(labels.max()) >= self.M:
            raise CmdError(f"{self.path}: corrupt mode file (label out of range)")
        return labels, self.handle["a"][columns], self.handle["b"][columns]

    def carried(self, name: str) -> np.ndarray:
        return self.handle["carried"][dataset_key(name)][()]

    def attachment(self, digest: str) -> bytes:
        """A file copied back with a Hugging Face folder, by the SHA-256 of its content."""
        return self.handle["attachments"][digest][()].tobytes()

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "ModeFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_mode_file(path: Path) -> ModeFile:
    """Open and validate a mode file; any problem is a CmdError naming the file."""
    path = Path(path)
    if not path.exists():
        raise CmdError(f"{path}: no such file")
    if path.is_dir():
        raise CmdError(f"{path}: is a directory, expected a mode file")
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise CmdError(f"{path}: not a mode file (not HDF5, or truncated)") from None
    try:
        if handle.attrs.get("format") != FORMAT:
            raise CmdError(f"{path}: not a cmdtool mode file")
        version = int(handle.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise CmdError(f"{path}: mode-file format version {version} is not supported "
                           f"(this cmdtool reads version {FORMAT_VERSION}; upgrade cmdtool)")
        mode_file = ModeFile(
            path=path, handle=handle, layout=Layout.from_json(read_text(handle, "layout")),
            references=handle["references"][()], reference_offset=handle["reference_offset"][()],
            reference_scale=handle["reference_scale"][()], reference_index=handle["reference_index"][()],
            time=handle["time"][()], names=read_strings(handle, "checkpoints"),
            infos=[CheckpointInfo.from_json(s) for s in read_strings(handle, "checkpoint_info")],
            mode_sizes=handle["mode_sizes"][()], settings=json.loads(handle.attrs["settings"]),
            metrics=json.loads(handle.attrs["metrics"]), format_version=version,
            tool_version=str(handle.attrs.get("tool_version", "?")),
            online={"warmup": int(handle["online"].attrs["warmup"])} if "online" in handle else None)
        _validate(mode_file)
        return mode_file
    except CmdError:
        handle.close()
        raise
    except (KeyError, ValueError, TypeError, OSError) as e:
        handle.close()
        raise CmdError(f"{path}: corrupt mode file ({type(e).__name__}: {e})") from None


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
    if mf.online is not None:
        online = h["online"]
        if (online["first"].shape != (N,) or online["mode_sse_least_squares"].shape != (M,)
                or not 1 <= mf.online["warmup"] <= T):
            raise CmdError(f"{mf.path}: corrupt mode file (online state does not match N, M or T)")
    for spec in mf.layout.carried:
        if spec.key not in h["carried"] or h["carried"][spec.key].shape != (T, spec.nbytes):
            raise CmdError(f"{mf.path}: corrupt mode file (carried tensor {spec.name!r} missing)")
    for info in mf.infos:
        for name, digest in info.files.items():
            if digest not in h.get("attachments", {}):
                raise CmdError(f"{mf.path}: corrupt mode file (copied file {name!r} missing)")
