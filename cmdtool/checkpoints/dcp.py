"""``torch.distributed.checkpoint`` (DCP) folders, read on one machine tensor by tensor without running code.

A DCP folder (``torch.distributed.checkpoint.save``: FSDP, Lightning Fabric, Accelerate's sharded
state dicts, torchtitan) holds ``.metadata``, a pickle saying what is stored where, and one or more
``__<rank>_<n>.distcp`` files: concatenated items, each a tensor chunk or a plain value written with
``torch.save`` (``serialization_format=SAFETENSORS``, which keeps the chunks elsewhere, is refused).
A tensor sharded over ranks is several chunks, each with its offsets in the whole.

``.metadata`` is read without running code and checked against the folder before any offset in it
is trusted (``dcp_metadata.py``); each chunk is loaded from its own bytes with ``torch.load(weights_only=True)``,
checked as any torch checkpoint's tensors are, and placed into the whole tensor: memory is one
tensor and one chunk at a time.

Written back with ``torch.distributed.checkpoint.save`` in this one process (no process group):
a folder of the same layout (one ``.distcp`` file) that ``dcp.load`` and this reader read.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .._lazy import torch  # imported on first use
from ..errors import CmdError, first_sentence
from ..layout import DTYPE_SIZES
from .dcp_metadata import METADATA, SUFFIX, DcpMetadata, Item, StoredTensor, read_metadata, shown
from .formats import UNSAFE_GLOBAL, FolderFiles, Reader, dtype_name, tensor_bytes
from .schema import TRAINING_STATE_KEYS, WRAPPER_KEYS, CheckpointInfo, is_plain
from .untrusted import check_tensor, check_zip_records

MAX_VALUE_BYTES = 2**20  # non-tensor values (step, epoch, ...) larger than this are dropped unread


def is_dcp_folder(folder: Path) -> bool:
    """Whether ``folder`` is a DCP checkpoint: it holds ``.distcp`` files (with or without ``.metadata``:
    a missing one is an error when the folder is read)."""
    try:
        return folder.is_dir() and any(p.name.endswith(SUFFIX) for p in folder.iterdir())
    except OSError:
        return False


def dcp_files(folder: Path) -> FolderFiles:
    """The files of a DCP folder by role: the ``.distcp`` files are the weights, ``.metadata`` the index."""
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith("."))
    if not (folder / METADATA).is_file():
        raise CmdError(f"{folder}: a torch.distributed.checkpoint folder without its {METADATA} file "
                       f"(an interrupted save?)")
    for name in names:
        if (folder / name).is_symlink() or not (folder / name).is_file():
            raise CmdError(f"{folder / name}: not a plain file (cmdtool follows no links in checkpoints)")
    return FolderFiles(tuple(names), METADATA, (), ())


# ------------------------------------------------------------------------------------------ reading


def _model_tensors(meta: DcpMetadata, folder: Path) -> tuple[str | None, dict[str, StoredTensor], list[str]]:
    """The model's tensors: those under the first wrapper key (``model``, ``state_dict``, ...) that
    holds any, else every top-level tensor outside the training state (``optimizer``, ...).
    Returns the wrapper key, the tensors by name, and the top-level keys left out."""
    tops = {path[0] for path in meta.tensors}
    wrapper = next((key for key in WRAPPER_KEYS if key in tops
                    and any(p[0] == key and len(p) > 1 for p in meta.tensors)), None)
    chosen: dict[str, StoredTensor] = {}
    for path, stored in meta.tensors.items():
        if wrapper is not None:
            if path[0] != wrapper or len(path) == 1:
                continue
            name = ".".join(map(str, path[1:]))
        elif path[0] in TRAINING_STATE_KEYS:
            continue
        else:
            name = ".".join(map(str, path))
        if name in chosen:
            raise CmdError(f"{folder}: two tensors are both named {shown(name)!r}")
        chosen[name] = stored
    if not chosen:
        raise CmdError(f"{folder}: no model tensors in this torch.distributed.checkpoint folder")
    left = {str(path[0]) for path in meta.tensors if wrapper is not None and path[0] != wrapper
            or wrapper is None and path[0] in TRAINING_STATE_KEYS}
    return wrapper, chosen, sorted(left)


class DcpReader(Reader):
    """One DCP folder read as one checkpoint: ``signature``, ``info``, ``stored`` (plain top-level
    values such as ``step``), and the tensors, assembled from their chunks on demand."""

    def __init__(self, folder: Path, files: FolderFiles, ema: bool = False):
        self.path = Path(folder)
        if ema:
            raise CmdError(f"{self.path}: --ema applies to timm and Lightning WeightAveraging checkpoints; "
                           f"this is a torch.distributed.checkpoint folder")
        self.attachments: dict[str, bytes] = {}
        self._files: dict[str, Any] = {}
        self._last: tuple[str, torch.Tensor] | None = None  # read_float32's last tensor
        self._stamps = {}
        for name in files.weights:
            st = (self.path / name).stat()
            self._stamps[name] = (st.st_ino, st.st_size, st.st_mtime_ns)
        meta = read_metadata(self.path, files)
        wrapper, self._tensors, dropped = _model_tensors(meta, self.path)
        for name, stored in self._tensors.items():
            if stored.dtype not in DTYPE_SIZES:
                raise CmdError(f"{self.path}: tensor {name!r} has dtype {stored.dtype}, which cmdtool cannot carry "
                               f"or model (supported: {', '.join(DTYPE_SIZES)})")
        self.signature = {name: (s.shape, s.dtype) for name, s in self._tensors.items()}
        extras = {}
        for path, item in meta.values.items():
            value = self._value(path, item) if len(path) == 1 and item.length <= MAX_VALUE_BYTES else None
            if isinstance(path[0], str) and len(path) == 1 and value is not None and is_plain(value):
                extras[path[0]] = value
            else:
                dropped.append(".".join(map(str, path)))
        if wrapper is not None:
            extras.pop(wrapper, None)
        self.stored = extras
        self.info = CheckpointInfo("dcp", wrapper=wrapper, extras=extras, dropped=sorted(set(dropped)))

    def _read(self, item: Item, what: str) -> Any:
        """One item's bytes, loaded with ``torch.load(weights_only=True)`` after its zip records are checked."""
        where = f"{self.path / item.file}: {what}"
        f = self._files.get(item.file)
        if f is None:
            f = self._files[item.file] = open(self.path / item.file, "rb")
        f.seek(item.offset)
        data = io.BytesIO(f.read(item.length))
        if len(data.getbuffer()) != item.length:
            raise CmdError(f"{where}: the file is shorter than its metadata says (changed while read?)")
        try:
            check_zip_records(Path(where), data)
            data.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.load(data, map_location="cpu", weights_only=True)
        except CmdError:
            raise
        except pickle.UnpicklingError as e:
            unsafe = UNSAFE_GLOBAL.search(str(e))
            if unsafe is None:
                raise CmdError(f"{where}: cannot read, truncated or corrupt ({first_sentence(e)})") from None
            raise CmdError(f"{where}: refused: it holds a pickled {shown(unsafe.group(1))}, and loading it could "
                           f"run code") from None
        except RecursionError:
            raise CmdError(f"{where}: refused: values nested too deeply to read safely") from None
        except Exception as e:
            raise CmdError(f"{where}: cannot read, truncated or corrupt ({first_sentence(e)})") from None

    def _value(self, path: tuple, item: Item) -> Any:
        return self._read(item, f"value {shown('.'.join(map(str, path)))!r}")

    def tensor(self, name: str) -> torch.Tensor:
        stored = self._tensors[name]
        whole = None
        for chunk in stored.chunks:
            if chunk.item.length == math.prod(chunk.sizes) * DTYPE_SIZES[stored.dtype]:  # a torch.save is longer
                raise CmdError(f"{self.path / chunk.item.file}: tensor {name!r} is stored as raw bytes "
                               f"(serialization_format=SAFETENSORS), which cmdtool does not read; save with the "
                               f"default format (torch_save)")
            piece = self._read(chunk.item, f"tensor {name!r}")
            if not isinstance(piece, torch.Tensor):
                raise CmdError(f"{self.path / chunk.item.file}: tensor {name!r}: the stored item is not a tensor")
            check_tensor(self.path / chunk.item.file, name, piece)
            if dtype_name(piece.dtype) != stored.dtype or tuple(piece.shape) != chunk.sizes:
                raise CmdError(f"{self.path / chunk.item.file}: tensor {name!r}: a chunk holds "
                               f"{dtype_name(piece.dtype)} {list(piece.shape)}, the metadata says "
                               f"{stored.dtype} {list(chunk.sizes)}")
            if len(stored.chunks) == 1:
                return piece
            if whole is None:
                whole = torch.empty(stored.shape, dtype=piece.dtype)
            whole[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] = piece
        if whole is None:  # no chunks: an empty tensor
            whole = torch.empty(stored.shape, dtype=getattr(torch, stored.dtype))
        return whole

    def read_float32(self, name: str, out: np.ndarray, scratch: np.ndarray | None = None,
                     span: tuple[int, int] | None = None) -> None:
        """A tensor's values (or the flat elements ``span``) as float32 into ``out``. A DCP item is
        read whole, so the tensor last read is kept (one tensor's memory) for the next span of it:
        ingest and ``cmd update`` read a large tensor a span at a time, and would otherwise read it
        again for every span."""
        if self._last is None or self._last[0] != name:
            self._last = None  # the previous tensor's memory goes before the next is read
            self._last = (name, self.tensor(name).detach().reshape(-1))
        flat = self._last[1]
        out[:] = (flat if span is None else flat[span[0]:span[1]]).to(torch.float32).numpy()

    def float32_values(self, name: str) -> np.ndarray:
        out = np.empty(math.prod(self.signature[name][0]), dtype=np.float32)
        self.read_float32(name, out)
        return out

    def raw_bytes(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        return tensor_bytes(self.tensor(name), out)

    def check_unchanged(self) -> None:
        for name, stamp in self._stamps.items():
            st = (self.path / name).stat()
            if (st.st_ino, st.st_size, st.st_mtime_ns) != stamp:
                raise CmdError(f"{self.path / name}: changed while it was read")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files, self._last = {}, None


# ------------------------------------------------------------------------------------------ writing


def write_dcp(path: Path, state: dict[str, torch.Tensor], wrapper: str | None, extras: dict[str, Any]) -> None:
    """``state`` (under ``wrapper``, beside the plain ``extras``) as a DCP folder at ``path``, written by
    ``torch.distributed.checkpoint.save`` in this process alone (no process group)."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    obj = {**extras, wrapper: state} if wrapper else {**extras, **state}
    os.makedirs(path)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore")
        save(obj, storage_writer=FileSystemWriter(str(path), thread_count=1, sync_files=True), no_dist=True)
