"""``torch.distributed.checkpoint`` (DCP) folders, read on one machine tensor by tensor without running code.

A DCP folder (``torch.distributed.checkpoint.save``: FSDP, Lightning Fabric, Accelerate's sharded
state dicts, torchtitan) holds ``.metadata``, a pickle saying what is stored where, and one or more
``__<rank>_<n>.distcp`` files: concatenated items, each a tensor chunk or a plain value written with
``torch.save`` (``serialization_format=SAFETENSORS``, which keeps the chunks elsewhere, is refused).
A tensor sharded over ranks is several chunks, each with its offsets in the whole.

``FileSystemReader.read_metadata`` unpickles ``.metadata`` with plain ``pickle``, which calls
whatever the file names. Here an allowlisted unpickler builds inert stand-ins of the metadata
classes instead (no torch class is made and no function outside the list is called) and refuses
every other global. Each item's file, offset and length is checked against the folder before a byte
of it is read; each chunk is loaded from its own bytes with ``torch.load(weights_only=True)``,
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._files import plain_name
from .._lazy import torch  # imported on first use
from ..errors import CmdError
from ..layout import DTYPE_SIZES
from .formats import _UNSAFE_GLOBAL, FolderFiles, _first_sentence, dtype_name
from .schema import TRAINING_STATE_KEYS, WRAPPER_KEYS, CheckpointInfo, is_plain
from .untrusted import check_tensor, check_zip_records

METADATA = ".metadata"
SUFFIX = ".distcp"
MAX_METADATA_BYTES = 2**30   # a pickle of names, shapes and offsets; far larger is not a DCP metadata file
MAX_VALUE_BYTES = 2**20      # non-tensor values (step, epoch, ...) larger than this are dropped unread
_MAX_INT = 2**62


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


# ------------------------------------------------------------------------------------------ metadata


class _Stub:
    """An inert stand-in for one DCP metadata object: its pickled state, or its constructor arguments."""

    def __new__(cls, *args):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        self.state = state

    def get(self, name: str, position: int) -> Any:
        """A field, from a state dict (dataclasses) or a state tuple (``TensorProperties``)."""
        if isinstance(self.state, dict):
            return self.state.get(name)
        if isinstance(self.state, tuple) and position < len(self.state):
            return self.state[position]
        return None


class _Metadata(_Stub): pass            # noqa: E701
class _TensorStorage(_Stub): pass       # noqa: E701
class _TensorProperties(_Stub): pass    # noqa: E701
class _Chunk(_Stub): pass               # noqa: E701
class _Bytes(_Stub): pass               # noqa: E701
class _Index(_Stub): pass               # noqa: E701
class _StorageMeta(_Stub): pass         # noqa: E701
class _StorageInfo(_Stub): pass         # noqa: E701


class _DType(str):
    """A torch dtype named in the metadata, kept as its name."""


def _size(values=()) -> tuple:
    if not (isinstance(values, (tuple, list)) and all(type(v) is int and 0 <= v < _MAX_INT for v in values)):
        raise pickle.UnpicklingError("torch.Size of something other than non-negative integers")
    return tuple(values)


def _text(*values) -> str:
    if not all(isinstance(v, str) for v in values):
        raise pickle.UnpicklingError("expected strings")
    return "/".join(values)


def _code(value=0) -> int:
    if type(value) is not int:
        raise pickle.UnpicklingError("expected an integer")
    return value


_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_METADATA_MODULE, "Metadata"): _Metadata,
    (_METADATA_MODULE, "TensorStorageMetadata"): _TensorStorage,
    (_METADATA_MODULE, "TensorProperties"): _TensorProperties,
    (_METADATA_MODULE, "ChunkStorageMetadata"): _Chunk,
    (_METADATA_MODULE, "BytesStorageMetadata"): _Bytes,
    (_METADATA_MODULE, "MetadataIndex"): _Index,
    (_METADATA_MODULE, "StorageMeta"): _StorageMeta,
    (_METADATA_MODULE, "_MEM_FORMAT_ENCODING"): _code,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): _size,
    ("torch.serialization", "_get_layout"): _text,
    **{("pathlib", name): _text for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")},
}


def _shown(text: str) -> str:
    return ascii(text)[1:-1][:80]


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles ``.metadata`` into stand-ins; any global not on the list is refused, and nothing runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return _DType(name)
        raise _Refused(f"{_shown(module)}.{_shown(name)}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id")


class _Refused(pickle.UnpicklingError):
    pass


@dataclass(frozen=True)
class Item:
    """Where one stored item's bytes are: a file of the folder, a byte offset and a length."""
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]  # where the chunk starts in the whole tensor
    sizes: tuple[int, ...]
    item: Item


@dataclass(frozen=True)
class StoredTensor:
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass
class DcpMetadata:
    """What ``.metadata`` says, validated: tensors and values by their path in the saved state dict
    (``("model", "layer.weight")``)."""
    tensors: dict[tuple, StoredTensor]
    values: dict[tuple, Item]


def read_metadata(folder: Path, files: FolderFiles) -> DcpMetadata:
    """``folder/.metadata`` unpickled with the allowlist and checked against the folder's files."""
    path = folder / METADATA
    if path.is_symlink() or not path.is_file():
        raise CmdError(f"{path}: not a plain file (cmdtool follows no links in checkpoints)")
    size = path.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise CmdError(f"{path}: {size} bytes, more than a torch.distributed.checkpoint metadata file holds "
                       f"(at most {MAX_METADATA_BYTES}); corrupt or not DCP metadata")
    data = path.read_bytes()
    try:
        root = _MetadataUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise CmdError(f"{path}: refused: the metadata pickle names {e}, which is not a torch.distributed.checkpoint "
                       f"metadata class; unpickling it could run code") from None
    except RecursionError:
        raise CmdError(f"{path}: refused: values nested too deeply to read safely") from None
    except Exception as e:  # pickle raises assorted types on corrupt input
        raise CmdError(f"{path}: cannot read torch.distributed.checkpoint metadata, truncated or corrupt "
                       f"({_first_sentence(e)})") from None
    try:
        return _parse(root, folder, files)
    except _Invalid as e:
        raise CmdError(f"{path}: invalid torch.distributed.checkpoint metadata: {e}") from None


class _Invalid(ValueError):
    pass


def _int(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < _MAX_INT:
        raise _Invalid(f"{what} is not a non-negative integer")
    return value


def _parse(root: Any, folder: Path, files: FolderFiles) -> DcpMetadata:
    if not isinstance(root, _Metadata):
        raise _Invalid("the pickle holds no Metadata object")
    entries, planner, storage = (root.get(k, i) for i, k in
                                 enumerate(("state_dict_metadata", "planner_data", "storage_data")))
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise _Invalid("no state_dict_metadata or storage_data")
    sizes = {name: (folder / name).stat().st_size for name in files.weights}
    items: dict[tuple, Item] = {}
    for index, info in storage.items():
        if not isinstance(index, _Index) or not isinstance(info, _StorageInfo):
            raise _Invalid("storage_data holds something other than MetadataIndex -> _StorageInfo")
        fqn, offset = index.get("fqn", 0), index.get("offset", 1)
        items[fqn, offset] = _item(info, fqn, sizes)
    tensors, values = {}, {}
    planner = planner if isinstance(planner, dict) else {}
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise _Invalid("a state dict key is not a string")
        path = planner.get(fqn, (fqn,))
        if not (isinstance(path, (tuple, list)) and path and all(isinstance(p, (str, int)) for p in path)):
            raise _Invalid(f"the planner path of {_shown(fqn)!r} is not a tuple of keys")
        path = tuple(path)
        if isinstance(entry, _Bytes):
            if (fqn, None) not in items:
                raise _Invalid(f"no stored bytes for value {_shown(fqn)!r}")
            values[path] = items[fqn, None]
        elif isinstance(entry, _TensorStorage):
            tensors[path] = _tensor(entry, fqn, items)
        else:
            raise _Invalid(f"entry {_shown(fqn)!r} is neither a tensor nor bytes")
    return DcpMetadata(tensors, values)


def _item(info: _StorageInfo, fqn: Any, sizes: dict[str, int]) -> Item:
    where = f"the stored bytes of {_shown(str(fqn))!r}"
    file = info.get("relative_path", 0)
    try:
        plain_name(file, "file name")
    except ValueError as e:
        raise _Invalid(f"{where}: {e}") from None
    if file not in sizes:
        raise _Invalid(f"{where} are in {_shown(file)!r}, which is not a .distcp file of the folder")
    offset, length = _int(info.get("offset", 1), f"{where}: offset"), _int(info.get("length", 2), f"{where}: length")
    if offset + length > sizes[file]:
        raise _Invalid(f"{where} end at byte {offset + length} of {_shown(file)!r}, which holds {sizes[file]} "
                       f"(truncated or crafted)")
    if info.get("transform_descriptors", 3):
        raise _Invalid(f"{where} are stored through transforms (compression or another extension), "
                       f"which cmdtool does not read")
    return Item(file, offset, length)


def _tensor(entry: _TensorStorage, fqn: str, items: dict[tuple, Item]) -> StoredTensor:
    where = f"tensor {_shown(fqn)!r}"
    properties, shape, chunks = (entry.get(k, i) for i, k in enumerate(("properties", "size", "chunks")))
    if not isinstance(properties, _TensorProperties) or not isinstance(shape, tuple) or not isinstance(chunks, list):
        raise _Invalid(f"{where}: no properties, size or chunks")
    dtype, layout = properties.get("dtype", 0), properties.get("layout", 1)
    if not isinstance(dtype, _DType):
        raise _Invalid(f"{where}: no dtype")
    if layout not in (None, "torch.strided"):
        raise _Invalid(f"{where} is not dense ({_shown(str(layout))})")
    stored, covered = [], 0
    for chunk in chunks:
        offsets, sizes = (chunk.get(k, i) if isinstance(chunk, _Chunk) else None for i, k in
                          enumerate(("offsets", "sizes")))
        if not (isinstance(offsets, tuple) and isinstance(sizes, tuple) and len(offsets) == len(sizes) == len(shape)
                and all(o + s <= n for o, s, n in zip(offsets, sizes, shape))):
            raise _Invalid(f"{where}: a chunk lies outside the tensor's shape {list(shape)}")
        if (fqn, offsets) not in items:
            raise _Invalid(f"{where}: no stored bytes for the chunk at {list(offsets)}")
        stored.append(Chunk(offsets, sizes, items[fqn, offsets]))
        covered += math.prod(sizes)
    if covered != math.prod(shape) or any(_overlap(a, b) for i, a in enumerate(stored) for b in stored[:i]):
        raise _Invalid(f"{where}: its chunks do not cover the tensor exactly once")
    return StoredTensor(str(dtype), shape, tuple(stored))


def _overlap(a: Chunk, b: Chunk) -> bool:
    return all(oa < ob + sb and ob < oa + sa for oa, sa, ob, sb in zip(a.offsets, a.sizes, b.offsets, b.sizes)) \
        and math.prod(a.sizes) > 0 and math.prod(b.sizes) > 0


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
            raise CmdError(f"{folder}: two tensors are both named {_shown(name)!r}")
        chosen[name] = stored
    if not chosen:
        raise CmdError(f"{folder}: no model tensors in this torch.distributed.checkpoint folder")
    left = {str(path[0]) for path in meta.tensors if wrapper is not None and path[0] != wrapper
            or wrapper is None and path[0] in TRAINING_STATE_KEYS}
    return wrapper, chosen, sorted(left)


class DcpReader:
    """One DCP folder read as one checkpoint: ``signature``, ``info``, ``stored`` (plain top-level
    values such as ``step``), and the tensors, assembled from their chunks on demand."""

    def __init__(self, folder: Path, files: FolderFiles, ema: bool = False):
        self.path = Path(folder)
        if ema:
            raise CmdError(f"{self.path}: --ema applies to timm and Lightning WeightAveraging checkpoints; "
                           f"this is a torch.distributed.checkpoint folder")
        self.attachments: dict[str, bytes] = {}
        self._files: dict[str, Any] = {}
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
            unsafe = _UNSAFE_GLOBAL.search(str(e))
            if unsafe is None:
                raise CmdError(f"{where}: cannot read, truncated or corrupt ({_first_sentence(e)})") from None
            raise CmdError(f"{where}: refused: it holds a pickled {_shown(unsafe.group(1))}, and loading it could "
                           f"run code") from None
        except RecursionError:
            raise CmdError(f"{where}: refused: values nested too deeply to read safely") from None
        except Exception as e:
            raise CmdError(f"{where}: cannot read, truncated or corrupt ({_first_sentence(e)})") from None

    def _value(self, path: tuple, item: Item) -> Any:
        return self._read(item, f"value {_shown('.'.join(map(str, path)))!r}")

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
        flat = self.tensor(name).detach().reshape(-1)
        out[:] = (flat if span is None else flat[span[0]:span[1]]).to(torch.float32).numpy()

    def float32_values(self, name: str) -> np.ndarray:
        out = np.empty(math.prod(self.signature[name][0]), dtype=np.float32)
        self.read_float32(name, out)
        return out

    def raw_bytes(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        raw = self.tensor(name).detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if out is not None:
            out[:] = raw
        return raw

    def check_unchanged(self) -> None:
        for name, stamp in self._stamps.items():
            st = (self.path / name).stat()
            if (st.st_ino, st.st_size, st.st_mtime_ns) != stamp:
                raise CmdError(f"{self.path / name}: changed while it was read")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __enter__(self) -> "DcpReader":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.check_unchanged()
        finally:
            self.close()


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
