"""Finding, ordering, reading and writing checkpoints. Knows nothing about modes.

Names are imported from their modules on first use (``discover``, ``formats``, ``schema``,
``writing``): ``from cmdtool.checkpoints.schema import CheckpointInfo`` loads no reader."""

from .._lazy import lazy_package

__all__ = ["Checkpoint", "CheckpointInfo", "CheckpointReader", "Discovery", "Skipped", "checkpoint_at", "discover",
           "write_checkpoint"]

lazy_package(__name__, {
    ".discover": ("CHECKPOINT_SUFFIXES", "Checkpoint", "Discovery", "Skipped", "candidate_entries", "checkpoint_at",
                  "discover", "name_number", "natural_key", "skip_reason", "times_from_names"),
    ".formats": ("CheckpointReader", "FolderReader", "dtype_name", "sniff_format"),
    ".schema": ("CheckpointInfo",),
    ".writing": ("write_checkpoint",),
})
