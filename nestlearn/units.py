"""Sizes for people. No torch: the spec commands use it too."""

from __future__ import annotations


def three_digits(v: float) -> str:
    """``v`` (at least 1) to three significant digits, without an exponent: ``1.00``, ``64.0``, ``160``."""
    return f"{v:.0f}" if v >= 99.95 else f"{v:.1f}" if v >= 9.995 else f"{v:.2f}"


def bytes_text(n: float) -> str:
    """``n`` bytes in binary units to three significant digits: ``160 KB``, ``1.00 MB``,
    ``64.0 GB`` (short enough for a table column at 80 characters)."""
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{three_digits(n / size)} {unit}"
    return f"{n:.0f} B"


def count_text(n: int) -> str:
    """A count in decimal units to three significant digits: ``528K``, ``4.19M``, ``21.8M``."""
    for unit, size in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{three_digits(n / size)}{unit}"
    return str(n)
