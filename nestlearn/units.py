"""Sizes for people. No torch: the spec commands use it too."""

from __future__ import annotations


def bytes_text(n: float) -> str:
    """``n`` bytes in binary units to three significant digits: ``160 KB``, ``1.00 MB``,
    ``64.0 GB`` (short enough for a table column at 80 characters)."""
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v >= 99.95 else f"{v:.1f} {unit}" if v >= 9.995 else f"{v:.2f} {unit}"
    return f"{n:.0f} B"
