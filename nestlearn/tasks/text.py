"""Byte-level language modelling on a ``Corpus``: random windows of ``seq_len + 1`` bytes."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Batch, Task, TaskError, check_shape
from .corpus import Corpus, load_corpus
from .rng import generator


def windows(data: Tensor, starts: Tensor, seq_len: int) -> Batch:
    """The batch of windows ``data[s : s + seq_len + 1]`` for each start ``s``."""
    return Batch.from_sequences(torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]))


def _need(data: Tensor, seq_len: int, split: str, corpus: str) -> int:
    room = data.numel() - (seq_len + 1)
    if room < 0:
        raise TaskError(f"{corpus}: the {split} split has {data.numel()} bytes, fewer than seq_len + 1 = "
                        f"{seq_len + 1}; use a shorter sequence or more data")
    return room


def random_windows(data: Tensor, step: int, batch: int, seq_len: int, seed: int, salt: str,
                   corpus: str = "corpus") -> Batch:
    room = _need(data, seq_len, "train", corpus)
    starts = torch.randint(0, room + 1, (batch,), generator=generator(seed, step, salt))
    return windows(data, starts, seq_len)


def spread_windows(data: Tensor, batch: int, seq_len: int, n: int, corpus: str = "corpus") -> list[Batch]:
    """``n`` batches of windows spread evenly over ``data`` (deterministic evaluation)."""
    if n < 1:
        raise TaskError(f"the number of evaluation batches must be at least 1, got {n}")
    room = _need(data, seq_len, "validation", corpus)
    starts = torch.linspace(0, room, n * batch).round().long()
    return [windows(data, starts[i * batch:(i + 1) * batch], seq_len) for i in range(n)]


class CorpusLM(Task):
    """Byte-level language modelling on an already loaded ``Corpus``."""

    name = "lm"
    kind = "lm"

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus
        self.options = {"corpus": corpus.name}

    def batch_at(self, step: int, batch: int, seq_len: int, seed: int = 0) -> Batch:
        check_shape(batch, seq_len)
        return random_windows(self.corpus.train, step, batch, seq_len, seed, f"lm:{self.corpus.name}",
                              self.corpus.name)

    def eval_batches(self, batch: int, seq_len: int, n: int, seed: int = 0) -> list[Batch]:
        """Windows spread evenly over the validation split (``seed`` is unused: always the same)."""
        check_shape(batch, seq_len)
        return spread_windows(self.corpus.val, batch, seq_len, n, self.corpus.name)

    def describe(self) -> str:
        return f"{self.name} on {self.corpus.describe()}"


class LMTask(CorpusLM):
    """``lm``: byte-level language modelling. ``data``: ``None`` (the Python standard library's
    sources, offline), a text file or folder, or ``hf:NAME[:CONFIG]``; ``max_bytes`` caps the
    corpus (default 8 MB for the stdlib, everything for a path)."""

    def __init__(self, data: str | None = None, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 2:
            raise TaskError(f"lm: max_bytes must be at least 2, got {max_bytes}")
        super().__init__(load_corpus(data, max_bytes))
        self.options = {"data": None if data is None else str(data), "max_bytes": max_bytes}
