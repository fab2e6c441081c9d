"""Reading and writing checkpoints, safetensors or torch, without executing code.

A checkpoint is one file, or a Hugging Face folder whose weights may be sharded over several files
(``model-00001-of-00002.safetensors`` + ``model.safetensors.index.json``). A torch file holds either
a state dict or a dict wrapping one (``{"state_dict": ..., "epoch": 3}``); the wrapper's plain values
(numbers, strings, and lists and dicts of them, such as Lightning's ``hyper_parameters``) are kept so
that write-back can restore them. Optimizer, scheduler and grad-scaler states are dropped: they no
longer match reconstructed weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .._lazy import torch  # imported on first use
from ..errors import CmdError, first_sentence
from ..layout import DTYPE_SIZES
from .safetensors_file import MAX_HEADER, SafetensorsFile
from .schema import CURRENT_MODEL_KEY, EMA_KEY, TRAINING_STATE_KEYS, WRAPPER_KEYS, CheckpointInfo, is_plain
from .untrusted import check_tensor, check_zip_records

Signature = dict[str, tuple[tuple[int, ...], str]]
# torch 2.13 words a refused global either way, depending on whether its module is blocked outright
UNSAFE_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sniff_format(path: Path) -> str | None:
    """``"safetensors"``, ``"torch"`` or None, judged by each format's own structure, not the name.

    Safetensors is tried first, by its whole frame: the 8-byte header length fits the file and the
    format's limit, and the header it spans starts with ``{`` and ends with ``}`` (then spaces). Only
    then the torch formats by their first bytes (a zip archive, or a pickle's ``0x80``): a safetensors
    header length whose low byte is 0x80 (128, 384, …) is a safetensors file, not a pickle."""
    with open(path, "rb") as f:
        head = f.read(9)
        if _is_safetensors_frame(f, head, os.fstat(f.fileno()).st_size):
            return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive, or legacy pickle
        return "torch"
    return None


def _is_safetensors_frame(f, head: bytes, size: int) -> bool:
    """Whether an open file is framed as safetensors: ``head`` (its first 9 bytes) holds a header
    length within the file and ``MAX_HEADER``, and the header is ``{`` … ``}`` padded with spaces."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    if not 2 <= header_len <= min(MAX_HEADER, size - 8):
        return False
    tail = min(header_len, 16)  # the end of the header: "}" and at most 7 spaces of padding
    f.seek(8 + header_len - tail)
    return f.read(tail).rstrip(b" ").endswith(b"}")


class Reader:
    """What the checkpoint readers share: ``with reader:`` closes it, and checks on a clean exit that
    no file changed while it was read (``check_unchanged``)."""

    def check_unchanged(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def read_stored(self, name: str, out: np.ndarray, span: tuple[int, int] | None = None) -> bool:
        """Tensor ``name``'s elements (flat; ``span = (start, stop)``: only those) as the file
        holds them, into ``out`` (that many bytes), when this reader reads them straight from the
        file; False, with ``out`` untouched, when it cannot (``read_float32`` reads every tensor)."""
        return False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.check_unchanged()
        finally:
            self.close()


def tensor_bytes(tensor: torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """A tensor's bytes in its own dtype, flat uint8, copied into ``out`` when given."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    if out is not None:
        out[:] = raw
    return raw


class CheckpointReader(Reader):
    """Open one checkpoint file; ``signature`` lists its tensors, ``tensor(name)`` reads one.

    ``ema=True`` takes timm's ``state_dict_ema`` instead of the model's state dict."""

    def __init__(self, path: Path, fmt: str, ema: bool = False):
        self.path = path
        self.ema = ema
        self._file: SafetensorsFile | None = None  # a safetensors file (torch files: ``_state``)
        self.attachments: dict[str, bytes] = {}  # a single file has no companion files to copy
        try:
            if fmt == "safetensors":
                self._open_safetensors()
            else:
                self._open_torch()
        except CmdError:
            self.close()
            raise
        except pickle.UnpicklingError as e:
            unsafe = UNSAFE_GLOBAL.search(str(e))
            if unsafe is None:
                raise CmdError(f"{path}: cannot read checkpoint, truncated or corrupt "
                               f"({first_sentence(e)})") from None
            raise CmdError(f"{path}: refused: the file holds a pickled {unsafe.group(1)}, and loading it "
                           f"could run code; keep only tensors and plain values in checkpoints") from None
        except RecursionError:
            raise CmdError(f"{path}: refused: values nested too deeply to read safely") from None
        except Exception as e:  # torch and safetensors raise assorted types on corrupt input
            raise CmdError(f"{path}: cannot read checkpoint, truncated or corrupt ({first_sentence(e)})") from None
        for name, (_, dtype) in self.signature.items():
            if dtype not in DTYPE_SIZES:
                raise CmdError(f"{path}: tensor {name!r} has dtype {dtype}, which cmdtool cannot carry or model "
                               f"(supported: {', '.join(DTYPE_SIZES)})")

    def _open_safetensors(self) -> None:
        if self.ema:
            raise CmdError(f"{self.path}: --ema needs timm's {EMA_KEY} in a torch checkpoint; "
                           f"this is a safetensors file")
        # Plain reads at the header's offsets (safetensors_file.py): no torch import, which costs
        # more than a large model's ingest, and no memory map.
        self._file = SafetensorsFile(self.path)
        self.info = CheckpointInfo("safetensors", metadata=self._file.metadata)
        self.signature: Signature = {name: (e.shape, e.dtype) for name, e in self._file.entries.items()}

    def _open_torch(self) -> None:
        with warnings.catch_warnings():  # torch warns about odd pickles; the error says what matters
            warnings.simplefilter("ignore")
            check_zip_records(self.path)
            try:
                if self.path.name.endswith(".safetensors"):  # torch.load would route it by name
                    with open(self.path, "rb") as f:
                        obj = torch.load(f, map_location="cpu", weights_only=True)
                else:
                    obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy format
        self._state, self.info = unwrap_state_dict(obj, self.path, self.ema)
        for name, t in self._state.items():
            check_tensor(self.path, name, t)
        self.signature = {name: (tuple(t.shape), dtype_name(t.dtype)) for name, t in self._state.items()}

    def tensor(self, name: str) -> torch.Tensor:
        if self._file is not None:
            shape, dtype = self.signature[name]
            raw = np.empty(self._file.entries[name].nbytes, dtype=np.uint8)
            self._file.read_into(name, raw)
            return torch.from_numpy(raw).view(getattr(torch, dtype)).reshape(shape)
        return self._state[name]

    def read_float32(self, name: str, out: np.ndarray, scratch: np.ndarray | None = None,
                     span: tuple[int, int] | None = None) -> None:
        """A floating-point tensor's values into ``out`` (flat float32, its size). A safetensors
        float32 tensor is read straight into ``out``; another dtype goes through ``scratch`` (uint8,
        at least the tensor's bytes, reused by the caller) and is converted exactly. With ``span =
        (start, stop)`` only those elements (flat), into an ``out`` of ``stop - start``; from a
        safetensors file only their bytes are read."""
        if self._file is None:
            flat = self.tensor(name).detach().reshape(-1)
            out[:] = (flat if span is None else flat[span[0]:span[1]]).to(torch.float32).numpy()
            return
        self._file.read_float32(name, out, scratch, span)

    def read_stored(self, name: str, out: np.ndarray, span: tuple[int, int] | None = None) -> bool:
        if self._file is None:
            return False
        if span is None:
            self._file.read_into(name, out)
        else:
            self._file.read_range(name, *span, out)
        return True

    def float32_values(self, name: str) -> np.ndarray:
        """A tensor's values as a flat float32 array (what the trajectory store holds)."""
        out = np.empty(math.prod(self.signature[name][0]), dtype=np.float32)
        self.read_float32(name, out)
        return out

    def raw_bytes(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """A tensor's bytes in its own dtype, flat uint8 (how carried tensors are kept), into
        ``out`` when given."""
        if self._file is not None:
            if out is None:
                out = np.empty(self._file.entries[name].nbytes, dtype=np.uint8)
            self._file.read_into(name, out)
            return out
        return tensor_bytes(self.tensor(name), out)

    def check_unchanged(self) -> None:
        """Raise ``CmdError`` if a safetensors file changed while it was read."""
        if self._file is not None:
            self._file.check_unchanged()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._state = None



@dataclass(frozen=True)
class FolderFiles:
    """The files of a Hugging Face checkpoint folder, by role (names relative to the folder)."""
    weights: tuple[str, ...]   # weight files, in shard order
    index: str | None          # model.safetensors.index.json (or the .bin one) when sharded
    copied: tuple[str, ...]    # config and tokenizer files, written back verbatim
    dropped: tuple[str, ...]   # optimizer.pt, scheduler.pt, rng_state*.pth, training_args.bin: never loaded


class FolderReader(Reader):
    """A Hugging Face checkpoint folder read as one checkpoint: the tensors of all its weight files.

    Tied weights (``lm_head.weight``) are absent from the files, and so from the signature: the
    folder's own key set is the truth, and ``from_pretrained`` ties them again."""

    def __init__(self, folder: Path, fmt: str, files: FolderFiles):
        self.path = folder
        self._readers = [CheckpointReader(folder / name, fmt) for name in files.weights]
        self.signature: Signature = {}
        self._owner: dict[str, CheckpointReader] = {}
        for reader in self._readers:
            self.signature.update(reader.signature)
            self._owner.update(dict.fromkeys(reader.signature, reader))
        index = None
        if files.index is not None:
            metadata = read_json(folder / files.index).get("metadata") or {}
            index = {"name": files.index,
                     "metadata": {k: v for k, v in metadata.items() if k != "total_size" and is_plain(v)}}
        self.attachments: dict[str, bytes] = {}
        copied = {}
        for name in files.copied:
            digest, data = read_attachment(folder / name)
            copied[name] = digest
            self.attachments[digest] = data
        self.info = CheckpointInfo(fmt, dropped=list(files.dropped), metadata=self._readers[0].info.metadata,
                                   shards={name: list(r.signature) for name, r in zip(files.weights, self._readers)},
                                   index=index, files=copied)

    def tensor(self, name: str) -> torch.Tensor:
        return self._owner[name].tensor(name)

    def float32_values(self, name: str) -> np.ndarray:
        return self._owner[name].float32_values(name)

    def read_float32(self, name: str, out: np.ndarray, scratch: np.ndarray | None = None,
                     span: tuple[int, int] | None = None) -> None:
        self._owner[name].read_float32(name, out, scratch, span)

    def read_stored(self, name: str, out: np.ndarray, span: tuple[int, int] | None = None) -> bool:
        return self._owner[name].read_stored(name, out, span)

    def raw_bytes(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        return self._owner[name].raw_bytes(name, out)

    def check_unchanged(self) -> None:
        for reader in self._readers:
            reader.check_unchanged()

    def close(self) -> None:
        for reader in self._readers:
            reader.close()



def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CmdError(f"{path}: not readable JSON ({first_sentence(e)})") from None
    except RecursionError:
        raise CmdError(f"{path}: refused: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise CmdError(f"{path}: expected a JSON object")
    return value


# dtypes numpy represents as they are (safetensors' numpy reader refuses bfloat16 and float8)
NUMPY_DTYPES = frozenset(("bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                          "float16", "float32", "float64"))


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def is_weight_averaging(obj: Any) -> bool:
    """A Lightning checkpoint saved with the ``WeightAveraging`` callback (Lightning >= 2.5)."""
    return isinstance(obj, Mapping) and _is_state_dict(obj.get(CURRENT_MODEL_KEY)) and _is_state_dict(
        obj.get("state_dict"))


def unwrap_state_dict(obj: Any, path: Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Find the state dict in what ``torch.load`` returned: the dict itself, or under a wrapper key
    (timm's ``state_dict_ema`` when ``ema``). Of a Lightning ``WeightAveraging`` checkpoint, the trained
    weights (``current_model_state``), or the average (``state_dict``) when ``ema``."""
    if is_weight_averaging(obj):
        key, other = ("state_dict", CURRENT_MODEL_KEY) if ema else (CURRENT_MODEL_KEY, "state_dict")
        state, info = _unwrap(obj, key)
        info.dropped.remove(other)
        info.aliases = [other]
        return state, info
    if ema:
        if not (isinstance(obj, Mapping) and _is_state_dict(obj.get(EMA_KEY))):
            raise CmdError(f"{path}: --ema: no {EMA_KEY} in this checkpoint "
                           f"(timm writes it when trained with --model-ema)")
        return _unwrap(obj, EMA_KEY)
    if _is_state_dict(obj):
        return dict(obj), CheckpointInfo("torch")
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return _unwrap(obj, key)
        if not obj:
            raise CmdError(f"{path}: no state dict found (the file holds an empty dict)")
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CmdError(f"{path}: no state dict found (top-level keys: {keys}; "
                       f"expected tensors, or one of {', '.join(WRAPPER_KEYS[:4])}, ...)")
    raise CmdError(f"{path}: no state dict found (the file holds a {type(obj).__name__})")


def _unwrap(obj: Mapping, key: str) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    kept = {k: v for k, v in obj.items() if k != key and k not in TRAINING_STATE_KEYS and is_plain(v)}
    dropped = [str(k) for k in obj if k != key and k not in kept]
    return dict(obj[key]), CheckpointInfo("torch", wrapper=key, extras=kept, dropped=dropped)


def read_attachment(path: Path) -> tuple[str, bytes]:
    """A file copied back verbatim (``config.json``): its SHA-256 and its bytes."""
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), data


