"""Checks on a torch checkpoint before its tensors are trusted: checkpoints come from anyone.

``torch.load(weights_only=True)`` runs no code, but it takes sizes and offsets from the file: a
storage record whose declared size reaches into the next record is mapped as it is, and the tensor
then holds another record's bytes. So the archive's records are checked first (stored, inside the
file, not overlapping), and every loaded tensor is checked against the storage it views. Tensors
that are not plain dense values on the CPU (sparse, nested, meta, quantized) are refused by name.
"""

from __future__ import annotations

import struct
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO

from .._lazy import torch
from ..errors import CmdError
from ..layout import DTYPE_SIZES

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


def check_zip_records(path: Path, stream: BinaryIO | None = None) -> None:
    """Refuse a torch zip archive whose records are compressed, overlap, or run past the file.

    ``stream`` (an open, seekable file or ``BytesIO``) is read instead of ``path``, which then only
    names it in errors. A legacy (non-zip) pickle is read as a stream and needs no check here."""
    with (open(path, "rb") if stream is None else nullcontext(stream)) as f:
        f.seek(0)
        if f.read(4) != b"PK\x03\x04":
            return
        try:
            with zipfile.ZipFile(f) as archive:
                records = sorted(archive.infolist(), key=lambda r: r.header_offset)
                end_of_records = archive.start_dir
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise CmdError(f"{path}: cannot read checkpoint, truncated or corrupt (zip archive: {e})") from None
        spans = []
        for record in records:
            f.seek(record.header_offset)
            header = f.read(_LOCAL_HEADER.size)
            if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                raise CmdError(f"{path}: record {record.filename!r} has no valid header (truncated or corrupt)")
            _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
            start = record.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            spans.append((record.header_offset, start + record.compress_size, record))
            if "/data/" in record.filename and (record.compress_type != zipfile.ZIP_STORED
                                                or record.compress_size != record.file_size):
                raise CmdError(f"{path}: storage record {record.filename!r} is compressed; "
                               f"torch checkpoints store tensor data uncompressed (corrupt or crafted file)")
    for (_, end, record), (next_start, _, _) in zip(spans, [*spans[1:], (end_of_records, 0, None)]):
        if end > next_start:
            raise CmdError(f"{path}: storage record {record.filename!r} declares {record.file_size} bytes, "
                           f"more than the archive holds before the next record (truncated or crafted file)")


def check_tensor(path: Path, name: str, tensor) -> None:
    """Refuse a tensor cmdtool cannot read as plain values, or one that views bytes its storage
    does not have; dense views (non-contiguous, overlapping, shared storage) are fine."""
    where = f"{path}: tensor {name!r}"
    if tensor.is_nested:
        raise CmdError(f"{where} is a nested tensor; save its components as separate dense tensors")
    if tensor.layout != torch.strided:
        layout = str(tensor.layout).removeprefix("torch.")
        raise CmdError(f"{where} is sparse ({layout}); save it dense (tensor.to_dense()) to use it with cmdtool")
    if tensor.device.type != "cpu":
        raise CmdError(f"{where} is on the {tensor.device.type} device and holds no values "
                       f"(saved from a model that was never materialised)")
    if tensor.is_quantized:
        raise CmdError(f"{where} is quantized ({str(tensor.dtype).removeprefix('torch.')}, "
                       f"{str(tensor.qscheme()).removeprefix('torch.')}): its scale and zero point would be lost; "
                       f"save tensor.dequantize() or tensor.int_repr() instead")
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in DTYPE_SIZES:
        raise CmdError(f"{where} has dtype {dtype}, which cmdtool cannot carry or model "
                       f"(supported: {', '.join(DTYPE_SIZES)})")
    if tensor.numel() == 0:
        return
    extent = 1 + tensor.storage_offset() + sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride()))
    needed = extent * tensor.element_size()
    available = tensor.untyped_storage().nbytes()
    if any(stride < 0 for stride in tensor.stride()) or needed > available:
        raise CmdError(f"{where} needs {needed} bytes of its storage, which holds {available} "
                       f"(truncated or crafted file)")
