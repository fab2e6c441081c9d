"""Finding, ordering, reading and writing checkpoints. Knows nothing about modes."""

from .discover import (CHECKPOINT_SUFFIXES, Checkpoint, Discovery, Skipped, candidate_entries, checkpoint_at, discover,
                       name_number, natural_key, skip_reason, times_from_names)
from .formats import CheckpointReader, FolderReader, dtype_name, sniff_format
from .schema import CheckpointInfo
from .writing import write_checkpoint

__all__ = ["CHECKPOINT_SUFFIXES", "Checkpoint", "CheckpointInfo", "CheckpointReader", "Discovery",
           "FolderReader", "Skipped", "candidate_entries", "checkpoint_at", "discover", "dtype_name", "name_number", "natural_key", "skip_reason", "sniff_format", "times_from_names",
           "write_checkpoint"]
