"""Finding, ordering, reading and writing checkpoints. Knows nothing about modes."""

from .discover import CHECKPOINT_SUFFIXES, Checkpoint, Discovery, Skipped, discover, name_number, natural_key
from .formats import (CheckpointInfo, CheckpointReader, FolderReader, dtype_name, sniff_format,
                      write_checkpoint)

__all__ = ["CHECKPOINT_SUFFIXES", "Checkpoint", "CheckpointInfo", "CheckpointReader", "Discovery",
           "FolderReader", "Skipped", "discover", "dtype_name", "name_number", "natural_key", "sniff_format",
           "write_checkpoint"]
