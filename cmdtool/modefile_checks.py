"""Checks of a mode file before anything in it is trusted: mode files are shared ("here is my
run, 200 KB"), so each is untrusted input. Two stages, both raising ``ValueError`` with what is
wrong (``open_mode_file`` names the file and calls it corrupt):

- ``check_storage`` before any dataset is read: no dataset may hold more than the file's own
  size (so a 19 KB file cannot declare 2^34 parameters and make a reader allocate 64 GiB), and
  contiguous ones must be fully stored;
- ``check_contents`` once the small parts are parsed: names that become paths are single plain
  file names and unique, indices and labels in range, dtypes and JSON fields of the right kinds,
  references finite, the write-back fields consistent with the layout.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import h5py
import numpy as np

from ._files import plain_name
from .checkpoints.schema import CheckpointInfo, is_plain
from .decompose import label_dtype
from .errors import CmdError
from .layout import is_integer
from .modes import FitSettings

SHA256 = re.compile(r"[0-9a-f]{64}")
LABEL_BLOCK = 1 << 18  # labels read and counted at a time
# FitSettings fields and the JSON types they must have (ints are checked by FitSettings itself)
_SETTING_TYPES = {"include": list, "exclude": list, "ema": bool, "drop_unmodelled": bool, "sampling": str,
                  "source": str, "trajectory": str, "trajectory_fingerprint": str}


# attributes of the group ``embedding`` (embedded CMD, ``modefile.write_embedding``) and their kinds
EMBEDDING_ATTRIBUTES = {"warmup": int, "window": int, "percent": float, "relative": bool, "embeddable": int}
_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false"}


def check_storage(handle: h5py.File, file_size: int) -> None:
    """No dataset declares more elements than the file could hold, and a contiguous dataset is
    stored whole (one that is not reads back as fill values)."""
    problems = []

    def visit(name: str, obj) -> None:
        if not isinstance(obj, h5py.Dataset) or problems:
            return
        element = 16 if obj.dtype.kind == "O" else obj.dtype.itemsize  # variable-length: a heap reference
        declared = obj.size * max(element, 1)
        if declared > file_size:
            problems.append(f"dataset {name!r} declares {declared} bytes, more than the file's {file_size}")
        elif obj.dtype.kind != "O" and obj.chunks is None and declared and obj.id.get_storage_size() < declared:
            problems.append(f"dataset {name!r} is not stored whole")

    handle.visititems(visit)
    if problems:
        raise ValueError(problems[0])


def parse_json_object(text: Any, what: str) -> dict:
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


def read_settings(handle: h5py.File) -> tuple[FitSettings, int | None]:
    """The fit settings (JSON of the right field types) and an online fit's ``warmup``."""
    data = parse_json_object(handle.attrs["settings"], "settings")
    check_settings(data)
    try:
        settings = FitSettings.from_json(data)
    except CmdError as e:
        raise ValueError(f"settings: {e}") from None
    warmup = handle["online"].attrs["warmup"] if "online" in handle else None
    if warmup is not None and not is_integer(warmup):
        raise ValueError(f"online warmup {warmup!r} is not an integer")
    return settings, warmup


def check_settings(data: Mapping[str, Any]) -> None:
    for name, kind in _SETTING_TYPES.items():
        if name in data and not isinstance(data[name], kind):
            raise ValueError(f"settings.{name} is {type(data[name]).__name__}, expected {kind.__name__}")
    for name in ("include", "exclude"):
        if not all(isinstance(p, str) for p in data.get(name, [])):
            raise ValueError(f"settings.{name} must be a list of strings")


def check_contents(mf) -> None:
    """The checks that need the parsed file (``ModeFile`` ``mf``); see the module docstring."""
    h, M, T, N = mf.handle, mf.M, mf.T, mf.N
    if M < 1 or T < 1:
        raise ValueError(f"references have shape {mf.references.shape}: no modes or no checkpoints")
    kinds = {"references": "f", "reference_offset": "f", "reference_scale": "f", "a": "f", "b": "f",
             "reference_index": "iu", "labels": "iu", "time": "iu", "mode_sizes": "iu"}
    for name, kind in kinds.items():
        if h[name].dtype.kind not in kind:
            raise ValueError(f"{name} has dtype {h[name].dtype}, expected {'floats' if kind == 'f' else 'integers'}")
    for name in ("references", "reference_offset", "reference_scale"):
        if not np.isfinite(getattr(mf, name)).all():
            raise ValueError(f"{name} holds NaN or Inf")
    if ((mf.reference_index < 0) | (mf.reference_index >= N)).any():
        raise ValueError(f"reference_index out of range (N = {N})")
    labels, counts = h["labels"], np.zeros(M, dtype=np.int64)
    for start in range(0, labels.shape[0], LABEL_BLOCK):  # read in blocks: memory does not grow with N
        block = labels[start:start + LABEL_BLOCK]
        if int(block.min()) < 0 or int(block.max()) >= M:
            raise ValueError(f"labels out of range (M = {M})")
        counts += np.bincount(block, minlength=M)
    if not np.array_equal(counts, mf.mode_sizes):
        raise ValueError("mode_sizes do not count the labels")
    curve = mf.metrics.error_curve
    if curve is not None and (curve["chosen"] != mf.settings.modes or M > curve["chosen"]):
        raise ValueError(f"metrics.error_curve.chosen is {curve['chosen']}, but the fit asked for at most "
                         f"{mf.settings.modes} modes and found {M}")
    for name in mf.names:
        plain_name(name, "checkpoint name")
    if len(set(mf.names)) != T:
        raise ValueError("checkpoint names are not unique")
    tensors = [spec.name for spec in mf.layout.tensors]
    attachments = h.get("attachments", {})
    for digest in attachments:
        data = attachments[digest]
        if not SHA256.fullmatch(digest) or not isinstance(data, h5py.Dataset) or data.dtype != np.uint8:
            raise ValueError(f"attachment {digest[:80]!r} is not a SHA-256 named byte array")
    for name, info in zip(mf.names, mf.infos):
        check_info(info, tensors, attachments, name)
    for spec in mf.layout.carried:
        if spec.key in h["carried"] and h["carried"][spec.key].dtype != np.uint8:
            raise ValueError(f"carried tensor {spec.name!r} is not stored as bytes")
    if mf.warmup is not None and (h["online"]["first"].dtype.kind != "f"
                                  or h["online"]["mode_sse_least_squares"].dtype.kind != "f"):
        raise ValueError("online state is not floating point")


def check_info(info: CheckpointInfo, tensors: list[str], attachments, name: str) -> None:
    """One checkpoint's write-back fields: kinds, and names that become paths."""
    where = f"checkpoint_info of {name!r}"
    if info.format not in ("safetensors", "torch", "dcp"):
        raise ValueError(f"{where}: format {str(info.format)[:40]!r}")
    if info.wrapper is not None and not isinstance(info.wrapper, str):
        raise ValueError(f"{where}: wrapper is not a string")
    if not isinstance(info.extras, dict) or not is_plain(info.extras):
        raise ValueError(f"{where}: extras are not plain values")
    if info.wrapper is not None and info.wrapper in info.extras:
        raise ValueError(f"{where}: extras hold the wrapper key {info.wrapper!r}")
    if not isinstance(info.aliases, list) or not all(isinstance(a, str) and a != info.wrapper and a not in info.extras
                                                     for a in info.aliases) or (info.aliases and info.wrapper is None):
        raise ValueError(f"{where}: aliases are not other keys beside the wrapper")
    if not isinstance(info.dropped, list) or not all(isinstance(d, str) for d in info.dropped):
        raise ValueError(f"{where}: dropped is not a list of strings")
    if info.metadata is not None and not (isinstance(info.metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in info.metadata.items())):
        raise ValueError(f"{where}: metadata is not a string-to-string map")
    if not isinstance(info.files, dict):
        raise ValueError(f"{where}: files is not a map")
    if info.shards is None:
        if info.files or info.index is not None:
            raise ValueError(f"{where}: copied files or an index without shards")
        return
    if not isinstance(info.shards, dict) or not info.shards:
        raise ValueError(f"{where}: shards is not a map of weight files")
    listed = []
    for shard, names in info.shards.items():
        plain_name(shard, "shard")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{where}: shard {shard!r} does not list tensor names")
        listed += names
    if sorted(listed) != sorted(tensors):
        unknown = sorted(set(listed) - set(tensors))
        problem = (f"lists the unknown tensor {unknown[0]!r}" if unknown else
                   "do not list every tensor exactly once")
        raise ValueError(f"{where}: the shards {problem}")
    paths = list(info.shards)
    for file_name, digest in info.files.items():
        paths.append(plain_name(file_name, "copied file"))
        if not isinstance(digest, str) or digest not in attachments:
            raise ValueError(f"{where}: copied file {file_name!r} has no attachment")
    if info.index is not None:
        if not (isinstance(info.index, dict) and isinstance(info.index.get("metadata", {}), dict)):
            raise ValueError(f"{where}: index is not a map")
        paths.append(plain_name(info.index.get("name"), "index"))
    if len(set(paths)) != len(paths):
        raise ValueError(f"{where}: a file name is used twice")


def embedding_attributes(handle: h5py.File) -> dict | None:
    """The attributes of the group ``embedding``, each of the kind ``write_embedding`` writes (a
    bool ``relative``, integer counts, a finite ``percent``); None for a file without the group."""
    if "embedding" not in handle:
        return None
    group = handle["embedding"]
    if not isinstance(group, h5py.Group):
        raise ValueError("embedding is not a group")
    out = {}
    for key, kind in EMBEDDING_ATTRIBUTES.items():
        value = group.attrs.get(key)
        if kind is bool:
            right = isinstance(value, (bool, np.bool_))
        elif kind is int:
            right = is_integer(value)
        else:
            right = (is_integer(value) or isinstance(value, (float, np.floating))) and bool(np.isfinite(value))
        if not right:
            shown = value.item() if isinstance(value, np.generic) else value
            raise ValueError(f"embedding attribute {key} is {repr(shown)[:40]}, expected {_KIND_NAMES[kind]}")
        out[key] = kind(value)
    return out


def check_embedding(mf) -> None:
    """The group ``embedding`` against the file: settings in range and ``embedded_at`` (N,)
    integers, each -1 (never embedded) or the position of an observation after the warm-up."""
    if mf.embedding is None:
        return
    e, N, T = mf.embedding, mf.N, mf.T
    if (not 2 <= e["warmup"] <= T or e["warmup"] != (mf.warmup or e["warmup"]) or e["window"] < 1
            or not 0 < e["percent"] <= 100 or not 0 <= e["embeddable"] <= N):
        raise ValueError(f"embedding settings out of range (F = {e['warmup']}, L = {e['window']}, "
                         f"P = {e['percent']:g}, embeddable {e['embeddable']} of N = {N}, T = {T})")
    data = mf.handle["embedding"].get("embedded_at")
    if not isinstance(data, h5py.Dataset) or data.dtype.kind not in "iu" or data.shape != (N,):
        shown = f"dtype {data.dtype}, shape {data.shape}" if isinstance(data, h5py.Dataset) else "missing"
        raise ValueError(f"embedding embedded_at ({shown}) must be ({N},) integers")
    values = data[()]
    embedded = values != -1
    if ((values[embedded] < e["warmup"]) | (values[embedded] >= T)).any():
        raise ValueError(f"embedding embedded_at holds positions other than -1 and {e['warmup']} … {T - 1}")
    if int(embedded.sum()) > e["embeddable"]:
        raise ValueError(f"embedding embedded_at embeds more than the {e['embeddable']} embeddable parameters")


def expected_bytes(modes) -> int:
    """About the size of the mode file of ``modes``: its arrays, carried rows, attachments and text,
    with room for HDF5's own structures."""
    N, T = modes.layout.n_parameters, len(modes.time)
    text = sum(len(i.to_json()) + len(n) for i, n in zip(modes.infos, modes.names)) + len(modes.layout.to_json())
    carried = T * sum(spec.nbytes for spec in modes.layout.carried)
    online = 4 * N if modes.online is not None else 0
    return (N * (8 + label_dtype(modes.M).itemsize) + 4 * np.size(modes.references) + text + carried + online
            + sum(len(data) for data in modes.attachments.values()) + 2**16)
