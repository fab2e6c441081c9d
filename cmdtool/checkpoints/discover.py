"""Finding the checkpoints in a folder, as training stacks write them, and putting them in order.

A checkpoint is a file (a state dict or a wrapper dict: plain scripts, Lightning ``*.ckpt``, timm
``checkpoint-<epoch>.pth.tar``) or a Hugging Face ``checkpoint-<step>/`` folder, of a full model or
of a PEFT adapter (``adapters.py``). Copies that training stacks keep beside the real checkpoints
(``last.ckpt``, ``model_best.pth.tar``, ...) and
training-state files (``optimizer.pt``, ``training_args.bin``, ...) are skipped by name, with the
reason, and never loaded. A ``torch.distributed.checkpoint`` folder (``.metadata`` + ``*.distcp``) is
one checkpoint, read shard by shard (``dcp.py``). Folders that cannot be read on one machine
(DeepSpeed ZeRO, DCP folders nested inside another checkpoint's folder) are refused with the tool
that consolidates them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .._files import require_regular
from ..errors import CmdError
from .adapters import ADAPTER_CONFIG, ADAPTER_STACK, ADAPTER_WEIGHTS, adapter_weights, check_adapter_config
from .dcp import DcpReader, dcp_files, is_dcp_folder
from .formats import CheckpointReader, FolderFiles, FolderReader, read_json, sniff_format
from .schema import CURRENT_MODEL_KEY

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pth.tar")

# Files and folders that are not checkpoints of the run, whatever they hold: (pattern, reason).
SKIPPED_NAMES = (
    (r"last(-v\d+)?\.ckpt", "Lightning's copy of the latest checkpoint (save_last)"),
    (r"last\.pth\.tar", "timm's copy of the latest checkpoint"),
    (r"model_best\.pth\.tar", "timm's copy of the best checkpoint"),
    (r"tmp\.pth\.tar", "timm's temporary file"),
    (r"recovery-.*", "timm's mid-epoch recovery checkpoint"),
    (r"tmp-checkpoint-.*", "leftover of an interrupted Hugging Face save"),
    (r"(optimizer|scheduler|scaler)\.(pt|bin)|rng_state.*\.pth|training_args\.bin",
     "training state, not weights (not loaded)"),
)
# Hugging Face weight files, by preference: (single file, index of shards).
HF_WEIGHTS = (("model.safetensors", "model.safetensors.index.json"),
              ("pytorch_model.bin", "pytorch_model.bin.index.json"))
DEEPSPEED_FILE = re.compile(r".*(mp_rank_\d+_model_states|_optim_states)\.pt")
STORED_TIME_KEYS = ("global_step", "step", "epoch")
WEIGHT_AVERAGING_NOTE = "WeightAveraging: the trained weights (current_model_state) are modelled, --ema the average"


@dataclass(frozen=True)
class Checkpoint:
    path: Path    # the file, or the Hugging Face folder
    format: str   # how its tensors are stored: "safetensors" | "torch" | "dcp"
    time: int     # stored step/epoch, else the number in the name, else the position
    stack: str = "plain"               # "huggingface", "lightning", "timm", "plain", "torch.distributed.checkpoint"
    folder: FolderFiles | None = None  # the roles of a Hugging Face (or DCP) folder's files
    note: str = ""                     # what `cmd ls` adds: which of two stored weight sets is modelled

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def files(self) -> list[Path]:
        """Every file the checkpoint is made of (what the trajectory store's fingerprint covers)."""
        if self.folder is None:
            return [self.path]
        f = self.folder
        return [self.path / n for n in (*f.weights, *((f.index,) if f.index else ()), *f.copied)]

    def open(self, ema: bool = False) -> CheckpointReader | FolderReader | DcpReader:
        if self.format == "dcp":
            return DcpReader(self.path, self.folder, ema)
        if self.folder is None:
            return CheckpointReader(self.path, self.format, ema)
        if ema:
            raise CmdError(f"{self.path}: --ema applies to timm checkpoints (state_dict_ema); "
                           f"this is a Hugging Face folder")
        return FolderReader(self.path, self.format, self.folder)


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class Discovery:
    """What ``discover`` found: the checkpoints in training order, what it skipped and why."""
    folder: Path
    checkpoints: list[Checkpoint]
    skipped: list[Skipped] = field(default_factory=list)
    time_source: str = "position"  # "global_step" | "step" | "epoch" | "name" | "position"
    warnings: list[str] = field(default_factory=list)


INT64_MAX = 2**63 - 1  # times are stored as int64
_DIGITS = re.compile(r"([0-9]+)")  # ASCII digits only: "²" or "١" are letters here, never numbers


def natural_key(name: str) -> list:
    """Sort key that orders ``epoch_2`` before ``epoch_10`` (numbers of any length compare by value
    without converting them)."""
    return [(0, len(part.lstrip("0")), part.lstrip("0"), part) if _DIGITS.fullmatch(part) else (1, 0, part, "")
            for part in _DIGITS.split(name) if part]


def parse_time(text: str) -> int | None:
    """A time written as ASCII digits that fits int64, else None."""
    if not (isinstance(text, str) and _DIGITS.fullmatch(text)) or len(text.lstrip("0")) > 19:
        return None
    value = int(text)
    return value if value <= INT64_MAX else None


def _stem(name: str) -> str:
    for suffix in CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def name_number(name: str) -> int | None:
    """The last number in a checkpoint's name without its suffix (``epoch_12.pt`` → 12), if any
    (ASCII digits; a number beyond int64 is none: such names are ordered by position, which is
    their natural order)."""
    numbers = _DIGITS.findall(_stem(name))
    return parse_time(numbers[-1]) if numbers else None


def times_from_names(names: list[str]) -> list[int] | None:
    """The rule for time from names: the last number in each name, when every name has one."""
    numbers = [name_number(n) for n in names]
    return None if None in numbers else numbers


def candidate_entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` that may be checkpoints, in natural order: folders and files with a
    checkpoint suffix, hidden names (temporary files) left out. One whose name is not UTF-8 is
    refused: it could not be recorded in a mode file."""
    entries = [p for p in sorted(folder.iterdir(), key=lambda p: natural_key(p.name))
               if not p.name.startswith(".") and (p.name.endswith(CHECKPOINT_SUFFIXES) or p.is_dir())]
    for path in entries:
        if not _is_utf8(path.name):
            raise CmdError(f"{folder}: entry {ascii(path.name)}: the name is not valid UTF-8, so it cannot "
                           f"be recorded in a mode file; rename it")
    return entries


def skip_reason(name: str) -> str | None:
    """Why a file or folder of this name is never read as a checkpoint (``last.ckpt``, ``optimizer.pt``, …)."""
    for pattern, reason in SKIPPED_NAMES:
        if re.fullmatch(pattern, name):
            return reason
    return None


def _refuse_unreadable(folder: Path) -> None:
    """Refuse a folder whose tensors are sharded across ranks and not read here, naming the consolidation tool."""
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    if any(n.endswith(".distcp") for n in names):
        raise CmdError(f"{folder}: a torch.distributed.checkpoint folder (.distcp shards) cannot be read "
                       f"as one checkpoint; consolidate it first with "
                       f"torch.distributed.checkpoint.format_utils.dcp_to_torch_save(folder, 'model.pt')")
    if any(DEEPSPEED_FILE.fullmatch(n) for n in names):
        raise CmdError(f"{folder}: a DeepSpeed ZeRO checkpoint (weights sharded across ranks) cannot be read "
                       f"as one checkpoint; consolidate it first with DeepSpeed's zero_to_fp32.py "
                       f"(python zero_to_fp32.py CHECKPOINT_DIR OUTPUT_FILE)")


def _huggingface_files(folder: Path) -> FolderFiles | None:
    """The roles of the files in a Hugging Face checkpoint folder; None if it holds no weights."""
    names = sorted((p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")), key=natural_key)
    for single, index in HF_WEIGHTS:
        if index in names:
            weight_map = read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CmdError(f"{folder / index}: no weight_map in the index")
            weights = tuple(sorted(set(map(str, weight_map.values())), key=natural_key))
            for name in weights:
                if name not in names:
                    raise CmdError(f"{folder / name}: missing (listed in {index})")
            break
        if single in names:
            weights, index = (single,), None
            break
    else:
        return None
    return _folder_roles(folder, names, weights, index)


def _folder_roles(folder: Path, names: list[str], weights: tuple[str, ...], index: str | None) -> FolderFiles:
    """A Hugging Face folder's files by role, given its weight files (and index)."""
    dropped = tuple(n for n in names if n not in weights and n != index and skip_reason(n))
    # Everything else that is not a pickle or another weight file is copied back (config.json,
    # generation_config.json, tokenizer files, trainer_state.json, adapter_config.json).
    copied = tuple(n for n in names if n not in weights and n != index and n not in dropped
                   and sniff_format(folder / n) is None)
    return FolderFiles(weights, index, copied, dropped)


def _adapter_files(folder: Path) -> FolderFiles | None:
    """The roles of the files in a PEFT adapter folder (``adapter_model.safetensors`` and
    ``adapter_config.json``, from a Trainer's ``checkpoint-<step>/`` or ``save_pretrained``); None if
    it holds no adapter. An adapter without a readable ``adapter_config.json`` is a CmdError: it
    could not be written back in a form ``PeftModel.from_pretrained`` loads."""
    names = sorted((p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")), key=natural_key)
    weights = adapter_weights(names)
    if weights is None:
        return None
    if ADAPTER_CONFIG not in names:
        raise CmdError(f"{folder}: {weights} without {ADAPTER_CONFIG}: not a PEFT adapter folder that "
                       f"PeftModel.from_pretrained could load")
    check_adapter_config((folder / ADAPTER_CONFIG).read_bytes(), folder / ADAPTER_CONFIG)
    return _folder_roles(folder, names, (weights,), None)


def _weight_folder_files(folder: Path) -> FolderFiles | None:
    """A folder's files by role when it is one checkpoint: full model weights, else a PEFT adapter."""
    return _huggingface_files(folder) or _adapter_files(folder)


@dataclass
class _Found:
    checkpoint: Checkpoint
    stored: dict[str, int]  # times stored in the checkpoint: global_step, step, epoch


def _int_values(values: dict, keys=STORED_TIME_KEYS) -> dict[str, int]:
    """The stored times among ``values``: ints, or strings of ASCII digits (safetensors metadata),
    within int64; other values are not times."""
    out = {}
    for key in keys:
        value = values.get(key)
        if isinstance(value, str):
            value = parse_time(value)
        if isinstance(value, int) and not isinstance(value, bool) and -INT64_MAX <= value <= INT64_MAX:
            out[key] = value
    return out


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.listdir gives undecodable bytes as lone surrogates
        return False
    return True


def _examine_file(path: Path) -> _Found:
    require_regular(path, "a checkpoint file")  # a FIFO would block, a device read without end
    if path.stat().st_size == 0:
        raise CmdError(f"{path}: empty file: not a safetensors or torch checkpoint (truncated or corrupt)")
    fmt = sniff_format(path)
    if fmt is None:
        raise CmdError(f"{path}: not a safetensors or torch checkpoint (empty, truncated or corrupt)")
    with CheckpointReader(path, fmt) as reader:
        info = reader.info
    stored = _int_values(info.extras) if info.wrapper else _int_values(info.metadata or {})
    note = WEIGHT_AVERAGING_NOTE if info.wrapper == CURRENT_MODEL_KEY else ""
    return _Found(Checkpoint(path, fmt, 0, info.stack, note=note), stored)


def checkpoint_at(path: Path) -> Checkpoint | None:
    """One checkpoint file, or one Hugging Face ``checkpoint-<step>/`` folder, examined as ``discover``
    examines the entries of a run (time still 0); None for another folder. Bad files are a CmdError."""
    path = Path(path)
    if is_dcp_folder(path):
        return _examine_dcp(path).checkpoint
    if path.is_dir():
        files = _weight_folder_files(path)
        return None if files is None else _examine_folder(path, files).checkpoint
    return _examine_file(path).checkpoint


def _examine_folder(folder: Path, files: FolderFiles) -> _Found:
    formats = {sniff_format(folder / name) for name in files.weights}
    if len(formats) != 1 or None in formats:
        raise CmdError(f"{folder}: weight files are not all safetensors or all torch checkpoints")
    state = folder / "trainer_state.json"
    stored = _int_values(read_json(state), ("global_step",)) if state.is_file() else {}
    stack = ADAPTER_STACK if files.weights[0] in ADAPTER_WEIGHTS else "huggingface"
    return _Found(Checkpoint(folder, formats.pop(), 0, stack, files), stored)


def _examine_dcp(folder: Path) -> _Found:
    files = dcp_files(folder)
    with DcpReader(folder, files) as reader:
        stored = _int_values(reader.stored)
    return _Found(Checkpoint(folder, "dcp", 0, "torch.distributed.checkpoint", files), stored)


def discover(folder: Path) -> Discovery:
    """All checkpoints directly in ``folder`` (files, or Hugging Face folders), in training order. A
    folder that is itself one PEFT adapter (``save_pretrained``) is one checkpoint.

    Time: the first of ``global_step``, ``step``, ``epoch`` stored in every checkpoint (a wrapper
    dict's value, safetensors metadata, or a Hugging Face folder's ``trainer_state.json``) that takes
    at least two values; else the last number in each name (``epoch_12`` -> 12) when every name
    has one; else the position in natural sort order. Never modification time. The same file reached
    twice (hard link, symlink) counts once; of checkpoints with the same time the first in natural
    order is kept, with a warning.
    """
    folder = Path(folder)
    if not folder.exists():
        raise CmdError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CmdError(f"{folder}: is a file, expected a folder of checkpoints")
    if is_dcp_folder(folder):
        raise CmdError(f"{folder}: is one torch.distributed.checkpoint checkpoint; point cmdtool at the folder "
                       f"that holds the run's checkpoint folders (step_100/, step_200/, ...)")
    _refuse_unreadable(folder)
    found: list[_Found] = []
    skipped: list[Skipped] = []
    seen: dict[tuple[int, int], Path] = {}
    # the folder itself may be one adapter (save_pretrained), or hold the final one (Trainer.save_model)
    own_adapter = _adapter_files(folder) if (folder / ADAPTER_CONFIG).is_file() else None
    for path in candidate_entries(folder):
        is_dir = path.is_dir()
        reason = skip_reason(path.name) or _own_adapter_reason(path, own_adapter)
        if reason:
            skipped.append(Skipped(path, reason))
            continue
        st = path.stat()
        if (st.st_dev, st.st_ino) in seen:
            skipped.append(Skipped(path, f"same file as {seen[st.st_dev, st.st_ino].name}"))
            continue
        seen[st.st_dev, st.st_ino] = path
        if not is_dir:
            found.append(_examine_file(path))
            continue
        if is_dcp_folder(path):
            found.append(_examine_dcp(path))
            continue
        files = _weight_folder_files(path)
        if files is not None:
            found.append(_examine_folder(path, files))
            continue
        for sub in [path, *(p for p in path.iterdir() if p.is_dir())]:
            _refuse_unreadable(sub)
        skipped.append(Skipped(path, "folder without model weights (no model.safetensors, pytorch_model.bin "
                                     "or adapter_model.safetensors)"))
    if not found and own_adapter is not None:  # one adapter folder, named itself: one checkpoint
        found = [_examine_folder(folder, own_adapter)]
        own_files = {*own_adapter.weights, *own_adapter.dropped}  # its own files: the checkpoint says them
        skipped = [s for s in skipped if s.path.name not in own_files]
    if not found:
        raise CmdError(f"{folder}: no checkpoint files found "
                       f"(looked for {', '.join('*' + s for s in CHECKPOINT_SUFFIXES)} "
                       f"and Hugging Face checkpoint-<step>/ folders, full or PEFT adapter, and "
                       f"torch.distributed.checkpoint folders)" + _lightning_hint(folder))
    return _order(folder, found, skipped)


def _own_adapter_reason(path: Path, own_adapter: FolderFiles | None) -> str | None:
    """Why an adapter weight file directly in the run folder is not one of the run's checkpoints:
    ``Trainer.save_model`` puts the final adapter beside the ``checkpoint-<step>/`` folders."""
    if own_adapter is None or path.name not in own_adapter.weights:
        return None
    return "the adapter saved in the folder itself (save_model); the run is its checkpoint-<step>/ folders"


def _lightning_hint(folder: Path) -> str:
    """Where a Lightning run's checkpoints are, when ``folder`` is the run's root (``checkpoints/``,
    ``lightning_logs/version_<n>/checkpoints/``); empty otherwise."""
    candidates = [folder / "checkpoints", *folder.glob("version_*/checkpoints"),
                  *folder.glob("lightning_logs/version_*/checkpoints")]
    found = sorted({c for c in candidates if c.is_dir() and not c.is_symlink()
                    and any(p.name.endswith(".ckpt") for p in c.iterdir())}, key=lambda c: natural_key(str(c)))
    if not found:
        return ""
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"; this looks like a Lightning run: its checkpoints are in {found[0]}{more}, try `cmd ls {found[0]}`"


def _order(folder: Path, found: list[_Found], skipped: list[Skipped]) -> Discovery:
    """Times from the first source that every checkpoint has; sort; keep one per time."""
    times, source = None, "position"
    for key in STORED_TIME_KEYS:
        values = [f.stored.get(key) for f in found]
        if None not in values and len(set(values)) > 1:
            times, source = values, key
            break
    if times is None:
        numbers = times_from_names([f.checkpoint.name for f in found])
        if numbers is not None:
            times, source = numbers, "name"
        else:
            times = list(range(len(found)))
    ordered = sorted(zip(times, range(len(found))))  # stable: ties keep natural order
    checkpoints, kept, messages = [], {}, []
    for time, i in ordered:
        c = found[i].checkpoint
        if time in kept:
            skipped.append(Skipped(c.path, f"same time {time} ({source}) as {kept[time].name}"))
            messages.append(f"{c.path}: same time {time} ({source}) as {kept[time].name}; kept {kept[time].name}")
            continue
        kept[time] = c
        checkpoints.append(replace(c, time=time))
    return Discovery(folder, checkpoints, skipped, source, messages)
