"""Sizes for people. No torch: the spec commands use it too."""

from __future__ import annotations


def bytes_text(n: float) -> str:
    """``n`` bytes in binary units: ``160.50 KB``, ``1.00 MB``, ``64.00 GB``."""
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
