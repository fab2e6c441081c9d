"""Finding, ordering, reading and writing checkpoints. Knows nothing about modes."""

from .discover import CHECKPOINT_SUFFIXES, Checkpoint, discover, natural_key
from .formats import CheckpointInfo, CheckpointReader, dtype_name, sniff_format, write_checkpoint

__all__ = ["CHECKPOINT_SUFFIXES", "Checkpoint", "CheckpointInfo", "CheckpointReader", "discover",
           "dtype_name", "natural_key", "sniff_format", "write_checkpoint"]
