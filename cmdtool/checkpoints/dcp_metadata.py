"""The ``.metadata`` file of a ``torch.distributed.checkpoint`` folder, read without running code.

``FileSystemReader.read_metadata`` unpickles it with plain ``pickle``, which calls whatever the file
names. Here an allowlisted unpickler builds inert stand-ins of the metadata classes instead (no
torch class is made and no function outside the list is called) and refuses every other global;
the result is checked against the folder (every item inside a ``.distcp`` file of it, every tensor
covered exactly once by its chunks) before any size or offset in it is trusted.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import plain_name
from .._lazy import torch  # imported on first use
from ..errors import CmdError, first_sentence

if TYPE_CHECKING:
    from .formats import FolderFiles

METADATA = ".metadata"
SUFFIX = ".distcp"
MAX_METADATA_BYTES = 2**30   # a pickle of names, shapes and offsets; far larger is not a DCP metadata file
_MAX_INT = 2**62


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


def shown(text: str) -> str:
    """A stored string as it may be printed: escaped, at most 80 characters."""
    return ascii(text)[1:-1][:80]


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles ``.metadata`` into stand-ins; any global not on the list is refused, and nothing runs."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return _DType(name)
        raise _Refused(f"{shown(module)}.{shown(name)}")

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
                       f"({first_sentence(e)})") from None
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
            raise _Invalid(f"the planner path of {shown(fqn)!r} is not a tuple of keys")
        path = tuple(path)
        if isinstance(entry, _Bytes):
            if (fqn, None) not in items:
                raise _Invalid(f"no stored bytes for value {shown(fqn)!r}")
            values[path] = items[fqn, None]
        elif isinstance(entry, _TensorStorage):
            tensors[path] = _tensor(entry, fqn, items)
        else:
            raise _Invalid(f"entry {shown(fqn)!r} is neither a tensor nor bytes")
    return DcpMetadata(tensors, values)


def _item(info: _StorageInfo, fqn: Any, sizes: dict[str, int]) -> Item:
    where = f"the stored bytes of {shown(str(fqn))!r}"
    file = info.get("relative_path", 0)
    try:
        plain_name(file, "file name")
    except ValueError as e:
        raise _Invalid(f"{where}: {e}") from None
    if file not in sizes:
        raise _Invalid(f"{where} are in {shown(file)!r}, which is not a .distcp file of the folder")
    offset, length = _int(info.get("offset", 1), f"{where}: offset"), _int(info.get("length", 2), f"{where}: length")
    if offset + length > sizes[file]:
        raise _Invalid(f"{where} end at byte {offset + length} of {shown(file)!r}, which holds {sizes[file]} "
                       f"(truncated or crafted)")
    if info.get("transform_descriptors", 3):
        raise _Invalid(f"{where} are stored through transforms (compression or another extension), "
                       f"which cmdtool does not read")
    return Item(file, offset, length)


def _tensor(entry: _TensorStorage, fqn: str, items: dict[tuple, Item]) -> StoredTensor:
    where = f"tensor {shown(fqn)!r}"
    properties, shape, chunks = (entry.get(k, i) for i, k in enumerate(("properties", "size", "chunks")))
    if not isinstance(properties, _TensorProperties) or not isinstance(shape, tuple) or not isinstance(chunks, list):
        raise _Invalid(f"{where}: no properties, size or chunks")
    dtype, layout = properties.get("dtype", 0), properties.get("layout", 1)
    if not isinstance(dtype, _DType):
        raise _Invalid(f"{where}: no dtype")
    if layout not in (None, "torch.strided"):
        raise _Invalid(f"{where} is not dense ({shown(str(layout))})")
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
