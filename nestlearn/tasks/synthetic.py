"""Synthetic recall tasks generated on the fly from a seed: ``mqar`` and ``niah``.
(The formal languages live in ``formal.py`` and are re-exported here.)"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .base import PAD, Batch, Task, TaskError, check_shape
from .formal import LANGUAGES, FormalTask, Language
from .prose import generated_prose
from .rng import Rng, generator

__all__ = ["MQARTask", "NIAHTask", "accuracy_by_length", "FormalTask", "LANGUAGES", "Language"]

KEY_LO, N_KEYS = 128, 128  # keys: bytes 128..255
VAL_LO, N_VALS = 1, 127  # values: bytes 1..127 (0 is padding)


class MQARTask(Task):
    """Multi-query associative recall: ``k1 v1 k2 v2 ... kN vN`` then ``Q`` queries ``q a`` (keys
    distinct within a row, queries a random subset of them). Only the answers count.
    ``n_pairs`` defaults to ``min(64, (seq_len + 1) // 4)``, ``n_queries`` to ``n_pairs``."""

    name = "mqar"

    def __init__(self, n_pairs: int | None = None, n_queries: int | None = None) -> None:
        if n_pairs is not None and not 1 <= n_pairs <= N_KEYS:
            raise TaskError(f"mqar: n_pairs must be in [1, {N_KEYS}], got {n_pairs}")
        if n_queries is not None and n_queries < 1:
            raise TaskError(f"mqar: n_queries must be at least 1, got {n_queries}")
        self.n_pairs, self.n_queries = n_pairs, n_queries
        self.options = {"n_pairs": n_pairs, "n_queries": n_queries}

    def sizes(self, seq_len: int) -> tuple[int, int]:
        n = self.n_pairs if self.n_pairs is not None else max(1, min(64, (seq_len + 1) // 4))
        q = self.n_queries if self.n_queries is not None else n
        if q > n:
            raise TaskError(f"mqar: n_queries ({q}) cannot exceed n_pairs ({n})")
        if 2 * (n + q) > seq_len + 1:
            raise TaskError(f"mqar: {n} pairs and {q} queries need seq_len >= {2 * (n + q) - 1}, "
                            f"got {seq_len}")
        return n, q

    def _make(self, g: torch.Generator, batch: int, seq_len: int) -> Batch:
        n, q = self.sizes(seq_len)
        keys = torch.rand(batch, N_KEYS, generator=g).argsort(1)[:, :n] + KEY_LO
        vals = torch.randint(VAL_LO, VAL_LO + N_VALS, (batch, n), generator=g)
        order = torch.rand(batch, n, generator=g).argsort(1)[:, :q]
        full = torch.full((batch, seq_len + 1), PAD, dtype=torch.long)
        full[:, 0:2 * n:2], full[:, 1:2 * n:2] = keys, vals
        full[:, 2 * n:2 * (n + q):2] = keys.gather(1, order)
        full[:, 2 * n + 1:2 * (n + q):2] = vals.gather(1, order)
        mask = torch.zeros(batch, seq_len)
        mask[:, 2 * n:2 * (n + q):2] = 1.0  # the query key predicts its value
        return Batch.from_sequences(full, mask)

    def batch_at(self, step: int, batch: int, seq_len: int, seed: int = 0) -> Batch:
        check_shape(batch, seq_len)
        return self._make(generator(seed, step, "mqar"), batch, seq_len)

    def eval_batches(self, batch: int, seq_len: int, n: int, seed: int = 0) -> list[Batch]:
        check_shape(batch, seq_len)
        return [self._make(generator(seed, i, "mqar", "eval"), batch, seq_len) for i in range(n)]


_LABELS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar "
           "papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


@functools.lru_cache(maxsize=8)
def _filler(size: int) -> bytes:
    return generated_prose(size, "niah-filler")


class NIAHTask(Task):
    """Needle in a haystack: passkey retrieval. A row of prose-like filler hides ``n_keys``
    needles ("The pass key [for NAME] is 12345. Remember it."); it ends with the question and the
    queried key's digits, the only bytes that count. ``length`` (when set) fixes the row length
    instead of ``seq_len``; ``depth`` in [0, 1] fixes where the queried needle sits (else random)."""

    name = "niah"

    def __init__(self, length: int | None = None, n_keys: int = 1, digits: int = 5,
                 depth: float | None = None) -> None:
        if not 1 <= n_keys <= len(_LABELS):
            raise TaskError(f"niah: n_keys must be in [1, {len(_LABELS)}], got {n_keys}")
        if not 1 <= digits <= 32:
            raise TaskError(f"niah: digits must be in [1, 32], got {digits}")
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise TaskError(f"niah: depth must be in [0, 1], got {depth}")
        self.length, self.n_keys, self.digits, self.depth = length, n_keys, digits, depth
        if length is not None and length < self.min_length():
            raise TaskError(f"niah: length must be at least {self.min_length()} for n_keys={n_keys}, "
                            f"digits={digits}; got {length}")
        self.options = {"length": length, "n_keys": n_keys, "digits": digits, "depth": depth}

    def _texts(self, label: str | None, key: str) -> tuple[bytes, bytes]:
        who = f" for {label}" if label else ""
        needle = f" The pass key{who} is {key}. Remember it. {key} is the pass key{who}."
        question = f"\n\nWhat is the pass key{who}? The pass key{who} is "
        return needle.encode(), question.encode()

    def min_length(self) -> int:
        label = max(_LABELS[: self.n_keys], key=len) if self.n_keys > 1 else None
        needle, question = self._texts(label, "0" * self.digits)
        return self.n_keys * len(needle) + len(question) + self.digits - 1

    def _row(self, rng: Rng, seq_len: int) -> bytes:
        labels: list[str | None] = list(_LABELS[: self.n_keys]) if self.n_keys > 1 else [None]
        keys = ["".join(str(rng.randint(0, 10)) for _ in range(self.digits)) for _ in labels]
        ask = rng.randint(0, len(labels))
        needles = [self._texts(lab, k)[0] for lab, k in zip(labels, keys, strict=True)]
        question = self._texts(labels[ask], keys[ask])[1] + keys[ask].encode()
        hay_len = seq_len + 1 - len(question) - sum(map(len, needles))
        filler = _filler(max(1 << 16, 1 << (hay_len + 1).bit_length()))
        off = rng.randint(0, len(filler) - hay_len + 1)
        hay = filler[off:off + hay_len]
        spots = []
        for i in range(len(needles)):
            frac = self.depth if (i == ask and self.depth is not None) else rng.random()
            target = int(frac * hay_len)
            cut = hay_len if target >= hay_len else hay.rfind(b". ", 0, target + 1) + 1  # a sentence end
            spots.append((cut, i))
        out, prev = bytearray(), 0
        for cut, i in sorted(spots):
            out += hay[prev:cut] + needles[i]
            prev = cut
        out += hay[prev:] + question
        return bytes(out)

    def _make(self, rng: Rng, batch: int, seq_len: int) -> Batch:
        seq_len = self.length or seq_len
        check_shape(batch, seq_len)
        if seq_len < self.min_length():
            raise TaskError(f"niah: seq_len must be at least {self.min_length()} for n_keys={self.n_keys}, "
                            f"digits={self.digits}; got {seq_len}")
        full = torch.stack([torch.frombuffer(bytearray(self._row(rng, seq_len)), dtype=torch.uint8)
                            for _ in range(batch)])
        mask = torch.zeros(batch, seq_len)
        mask[:, seq_len - self.digits:] = 1.0
        return Batch.from_sequences(full, mask)

    def batch_at(self, step: int, batch: int, seq_len: int, seed: int = 0) -> Batch:
        return self._make(Rng(seed, step, "niah"), batch, seq_len)

    def eval_batches(self, batch: int, seq_len: int, n: int, seed: int = 0) -> list[Batch]:
        return [self._make(Rng(seed, i, "niah", "eval"), batch, seq_len) for i in range(n)]

    def accuracy_by_length(self, model_fn: Callable[[Tensor], Tensor], lengths: Sequence[int], batch: int = 8,
                           n: int = 1, seed: int = 0, device: torch.device | str | None = None,
                           metric: str = "sequence_accuracy") -> dict[int, float]:
        """``metric`` (default: the whole passkey right) at each row length in ``lengths``."""
        out = {}
        for length in lengths:
            task = NIAHTask(length, self.n_keys, self.digits, self.depth)
            batches = task.eval_batches(batch, length, n, seed)
            out[int(length)] = task.evaluate(model_fn, batches, device)[metric]
        return out


def accuracy_by_length(model_fn: Callable[[Tensor], Tensor], lengths: Sequence[int], *, n_keys: int = 1,
                       digits: int = 5, depth: float | None = None, batch: int = 8, n: int = 1, seed: int = 0,
                       device: torch.device | str | None = None,
                       metric: str = "sequence_accuracy") -> dict[int, float]:
    """NIAH passkey accuracy by length for a model ``inputs [B, T] -> logits [B, T, 256]``."""
    return NIAHTask(None, n_keys, digits, depth).accuracy_by_length(model_fn, lengths, batch, n, seed, device,
                                                                    metric)
