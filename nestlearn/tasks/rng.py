"""Deterministic randomness for the data layer: seeds derived from (seed, step, salt), and a small
scalar RNG backed by a private ``torch.Generator`` (the global RNG is never touched)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TypeVar

import torch

_MASK64 = (1 << 64) - 1
T = TypeVar("T")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (ints, or strings hashed with a stable CRC32)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        v = zlib.crc32(p.encode()) if isinstance(p, str) else int(p)
        h = _splitmix64(h ^ (v & _MASK64))
    return h >> 1


def generator(*parts: int | str) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


class Rng:
    """Scalar draws (ints, floats, choices) for Python-level generators, served from blocks of
    ``torch.randint`` on a private generator so that per-draw overhead stays small."""

    _BITS = 53

    def __init__(self, *parts: int | str, block: int = 2048) -> None:
        self.gen = generator(*parts)
        self._block = block
        self._buf: list[int] = []
        self._i = 0

    def _next(self) -> int:
        if self._i >= len(self._buf):
            self._buf = torch.randint(0, 1 << self._BITS, (self._block,), generator=self.gen).tolist()
            self._i = 0
        v = self._buf[self._i]
        self._i += 1
        return v

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in ``[lo, hi)``."""
        if hi <= lo:
            raise ValueError(f"empty range [{lo}, {hi})")
        return lo + self._next() % (hi - lo)

    def random(self) -> float:
        """Uniform float in ``[0, 1)``."""
        return self._next() / float(1 << self._BITS)

    def coin(self) -> bool:
        return self._next() & 1 == 1

    def bits(self, n: int) -> str:
        """``n`` uniform random bits as a string of '0' and '1'."""
        out = []
        while n > 0:
            k = min(n, self._BITS)
            out.append(format(self._next() & ((1 << k) - 1), f"0{k}b"))
            n -= k
        return "".join(out)

    def choice(self, seq: Sequence[T]) -> T:
        return seq[self.randint(0, len(seq))]
