"""Writing outputs safely: every output goes to a temporary name beside its target and is renamed
into place only when complete, so that a reader, a kill or a failure never leaves a partial file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """``.NAME.PID.TAG`` beside ``path``: hidden, unique to this process, same filesystem."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{tag}")


def replace_path(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` (a file or folder) to ``target``, moving an existing folder out of the way."""
    if target.is_dir():
        old = temporary_sibling(target, "old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        if tmp.is_dir() and target.exists():  # a folder replaces a file: rename cannot do that
            target.unlink()
        os.replace(tmp, target)


def remove_path(path: Path) -> None:
    """Remove a file or folder if it exists."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
