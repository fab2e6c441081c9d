"""Sizes as people read them: in the tables of ``cmd info``, in reports and in error messages."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """``512 B``, ``1.5 KB``, ``123 MB``, ``4.2 TB``: three significant digits, units of 1000."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 999.5:  # what rounds to 1000 is shown in the next unit
            return f"{n:.3g} {unit}"
    n /= 1000
    return f"{n:.3g} TB" if n < 999.5 else f"{n:.0f} TB"
