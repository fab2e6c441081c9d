"""Finding, ordering, reading and writing checkpoints. Knows nothing about modes."""

from .discover import (
    CHECKPOINT_SUFFIXES,
    Checkpoint,
    Discovery,
    Skipped,
    checkpoint_at,
    discover,
    name_number,
    natural_key,
    skip_reason,
)
from .formats import CheckpointInfo, CheckpointReader, FolderReader, dtype_name, sniff_format, write_checkpoint

__all__ = ["CHECKPOINT_SUFFIXES", "Checkpoint", "CheckpointInfo", "CheckpointReader", "Discovery", "FolderReader",
           "Skipped", "checkpoint_at", "discover", "dtype_name", "name_number", "natural_key", "skip_reason",
           "sniff_format", "write_checkpoint"]
