"""Formal-language recognition (the Nested Learning paper's Table 5): parity, (aa)*, (abab)*,
aⁿbⁿ, aⁿbⁿcⁿ.

Each example is ``STRING=LABEL\\n`` with LABEL ``1`` (in the language) or ``0``; examples are
packed into a row and only the label bytes count. Labels are fair coin flips. Negatives are
near misses with the same length distribution as positives wherever the language allows it
(aⁿbⁿ, aⁿbⁿcⁿ: wrong counts or swapped symbols at the same length; (abab)*: wrong lengths of the
alternating pattern, or flipped symbols), so length alone never gives the label away there.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import PAD, Batch, Task, TaskError, check_shape
from .rng import Rng

MARKER, YES, NO, SEP = ord("="), ord("1"), ord("0"), ord("\n")


def _parity(rng: Rng, n: int, label: bool) -> str:
    head = rng.bits(n - 1)
    return head + str((head.count("1") + int(label)) % 2)


def _aa(rng: Rng, n: int, label: bool) -> str:
    return "a" * n  # the length (even or odd) was chosen by the label


def _abab(rng: Rng, n: int, label: bool) -> str:
    pattern = ("ab" * (n // 2 + 1))[:n]
    if label or n % 4:
        return pattern  # (abab)^k, or a prefix of the pattern with a wrong length
    s = list(pattern)
    while "".join(s) == pattern:  # same length, one or two flipped symbols
        for _ in range(rng.randint(1, 3)):
            i = rng.randint(0, n)
            s[i] = "b" if s[i] == "a" else "a"
    return "".join(s)


def _counts_or_swap(rng: Rng, n: int, label: bool, symbols: str) -> str:
    k = n // len(symbols)
    if label:
        return "".join(c * k for c in symbols)
    if rng.coin():  # wrong counts, same total length
        while True:
            counts = [k + rng.randint(-k, k + 1) for _ in symbols[:-1]]
            last = n - sum(counts)
            if all(c >= 0 for c in counts) and last >= 0 and (counts + [last]) != [k] * len(symbols):
                return "".join(c * m for c, m in zip(symbols, counts + [last], strict=True))
    s = list("".join(c * k for c in symbols))  # right counts, order broken by one swap
    i = rng.randint(0, n - k)
    j = rng.randint((i // k + 1) * k, n)
    s[i], s[j] = s[j], s[i]
    return "".join(s)


@dataclass(frozen=True)
class Language:
    name: str
    title: str
    generate: Callable[[Rng, int, bool], str]
    accepts: Callable[[str], bool]
    valid_length: Callable[[int, bool], bool]  # may a string of this length carry this label?


LANGUAGES: dict[str, Language] = {
    "parity": Language("parity", "binary strings with an odd number of 1s", _parity,
                       lambda s: set(s) <= {"0", "1"} and s.count("1") % 2 == 1, lambda n, lab: True),
    "aa_star": Language("aa_star", "(aa)*", _aa, lambda s: re.fullmatch("(aa)*", s) is not None,
                        lambda n, lab: n % 2 == (0 if lab else 1)),
    "abab_star": Language("abab_star", "(abab)*", _abab, lambda s: re.fullmatch("(abab)*", s) is not None,
                          lambda n, lab: n % 4 == 0 or not lab),
    "anbn": Language("anbn", "a^n b^n", lambda r, n, lab: _counts_or_swap(r, n, lab, "ab"),
                     lambda s: len(s) % 2 == 0 and s == "a" * (len(s) // 2) + "b" * (len(s) // 2),
                     lambda n, lab: n % 2 == 0),
    "anbncn": Language("anbncn", "a^n b^n c^n", lambda r, n, lab: _counts_or_swap(r, n, lab, "abc"),
                       lambda s: len(s) % 3 == 0 and s == "".join(c * (len(s) // 3) for c in "abc"),
                       lambda n, lab: n % 3 == 0),
}


class FormalTask(Task):
    """Recognition of one formal language. ``min_len``/``max_len``: string lengths; ``pack``:
    as many examples per row as fit (else one example per row)."""

    kind = "synthetic"

    def __init__(self, language: str, min_len: int = 1, max_len: int = 32, pack: bool = True) -> None:
        if language not in LANGUAGES:
            raise TaskError(f"unknown formal language '{language}' (choices: {', '.join(LANGUAGES)})")
        if min_len < 1 or max_len < min_len:
            raise TaskError(f"{language}: need 1 <= min_len <= max_len, "
                            f"got min_len={min_len}, max_len={max_len}")
        self.language = LANGUAGES[language]
        self.name = language  # type: ignore[misc]
        self.min_len, self.max_len, self.pack = min_len, max_len, pack
        self._lengths = {lab: [n for n in range(min_len, max_len + 1) if self.language.valid_length(n, lab)]
                         for lab in (True, False)}
        for lab, ns in self._lengths.items():
            if not ns:
                kind = "positive" if lab else "negative"
                raise TaskError(f"{language}: no {kind} strings have a length in [{min_len}, {max_len}]")
        self.options = {"min_len": min_len, "max_len": max_len, "pack": pack}

    def example(self, rng: Rng, max_len: int | None = None) -> tuple[str, bool] | None:
        """One (string, label) with length <= ``max_len``; None when the drawn label cannot fit."""
        label = rng.coin()
        ns = self._lengths[label]
        k = bisect.bisect_right(ns, self.max_len if max_len is None else max_len)
        if k == 0:
            return None
        return self.language.generate(rng, ns[rng.randint(0, k)], label), label

    def _rows(self, rng: Rng, batch: int, seq_len: int) -> Batch:
        need = max(ns[0] for ns in self._lengths.values()) + 1  # shortest string of either label, '=', label
        if seq_len < need:
            raise TaskError(f"{self.name}: seq_len must be at least {need} (string, '=', label) "
                            f"with min_len={self.min_len}; got {seq_len}")
        buf = bytearray()
        rows: list[int] = []
        cols: list[int] = []
        for b in range(batch):
            row = bytearray()
            while True:
                ex = self.example(rng, seq_len + 1 - len(row) - 2)  # string, '=', label (newline may be cut)
                if ex is None:
                    break
                s, label = ex
                rows.append(b)
                cols.append(len(row) + len(s))  # the input '=' predicts the label
                row += s.encode() + bytes([MARKER, YES if label else NO, SEP])
                if not self.pack or len(row) >= seq_len + 1:
                    break
            buf += row[: seq_len + 1].ljust(seq_len + 1, bytes([PAD]))
        full = torch.frombuffer(buf, dtype=torch.uint8).view(batch, seq_len + 1)
        mask = torch.zeros(batch, seq_len)
        mask[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = 1.0
        return Batch.from_sequences(full, mask)

    def batch_at(self, step: int, batch: int, seq_len: int, seed: int = 0) -> Batch:
        check_shape(batch, seq_len)
        return self._rows(Rng(seed, step, self.name), batch, seq_len)

    def eval_batches(self, batch: int, seq_len: int, n: int, seed: int = 0) -> list[Batch]:
        check_shape(batch, seq_len)
        return [self._rows(Rng(seed, i, self.name, "eval"), batch, seq_len) for i in range(n)]
