"""The task contract: ``Batch``, ``Task``, the resumable ``BatchStream`` and ``TaskError``.

Every batch is a pure function of ``(task options, seed, step, batch, seq_len)``: ``batch_at(k)``
is the k-th training batch, so resuming at step k replays exactly batches k, k+1, ...
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

PAD = 0  # byte used for padding (never counted: mask 0)


class TaskError(ValueError):
    """A user-facing error about a task, its options or its data (one clear message)."""


@dataclass(frozen=True)
class Batch:
    """``inputs``/``targets``: long ``[B, T]`` (targets are inputs shifted by one byte);
    ``mask``: float ``[B, T]``, 1 where the loss and accuracy count."""

    inputs: Tensor
    targets: Tensor
    mask: Tensor

    @classmethod
    def from_sequences(cls, full: Tensor, mask: Tensor | None = None) -> Batch:
        """From ``full [B, T+1]`` bytes; ``mask [B, T]`` defaults to all ones."""
        full = full.long()
        inputs, targets = full[:, :-1].contiguous(), full[:, 1:].contiguous()
        if mask is None:
            mask = torch.ones(inputs.shape, dtype=torch.float32)
        return cls(inputs, targets, mask.float())

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.inputs.shape[0]), int(self.inputs.shape[1]))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        ts = (self.inputs, self.targets, self.mask)
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in ts))

    def rows(self, start: int, stop: int) -> Batch:
        return Batch(self.inputs[start:stop], self.targets[start:stop], self.mask[start:stop])

    def split(self, n: int) -> list[Batch]:
        """``n`` equal micro-batches along the batch axis (gradient accumulation)."""
        b = self.shape[0]
        if n <= 0 or b % n:
            raise TaskError(f"cannot split a batch of {b} rows into {n} equal micro-batches")
        k = b // n
        return [self.rows(i * k, (i + 1) * k) for i in range(n)]

    def shard(self, rank: int, world: int) -> Batch:
        """This rank's rows of a global batch (data parallel with the same global batch)."""
        return self.split(world)[rank]


def masked_cross_entropy(logits: Tensor, batch: Batch) -> Tensor:
    """Mean cross-entropy (nats) over masked positions; differentiable, no host sync."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none")
    m = batch.mask.flatten().to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1.0)


def _sums(logits: Tensor, batch: Batch) -> dict[str, Tensor]:
    ce = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none")
    ce = ce.view_as(batch.mask)
    m = batch.mask.to(ce.dtype)
    hit = (logits.argmax(-1) == batch.targets).to(ce.dtype) * m
    has = m.sum(1) > 0
    row_ok = ((hit.sum(1) == m.sum(1)) & has).to(ce.dtype)
    return {
        "loss": (ce * m).sum(),
        "count": m.sum(),
        "correct": hit.sum(),
        "rows_correct": row_ok.sum(),
        "rows": has.to(ce.dtype).sum(),
    }


class BatchStream(Iterator[Batch]):
    """An endless, resumable iterator over ``task.batch_at(step, ...)``."""

    def __init__(self, task: Task, batch: int, seq_len: int, seed: int, step: int = 0) -> None:
        self.task, self.batch, self.seq_len, self.seed, self.step = task, batch, seq_len, seed, step

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        b = self.task.batch_at(self.step, self.batch, self.seq_len, self.seed)
        self.step += 1
        return b

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task.name, "step": self.step, "seed": self.seed,
                "batch": self.batch, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("task", "seed", "batch", "seq_len"):
            if key in state and state[key] != mine[key]:
                raise TaskError(
                    f"cannot resume the data stream: saved {key}={state[key]!r}, this run has {mine[key]!r}"
                )
        self.step = int(state["step"])


class Task(ABC):
    """A byte-level task (vocabulary 256). Subclasses implement ``batch_at`` and ``eval_batches``."""

    name: ClassVar[str] = "task"
    kind: ClassVar[Literal["lm", "synthetic"]] = "synthetic"
    vocab_size: ClassVar[int] = 256
    options: dict[str, Any]  # the resolved constructor options (set by ``get_task``)

    @abstractmethod
    def batch_at(self, step: int, batch: int, seq_len: int, seed: int = 0) -> Batch:
        """The training batch number ``step`` (a pure function of its arguments)."""

    @abstractmethod
    def eval_batches(self, batch: int, seq_len: int, n: int, seed: int = 0) -> list[Batch]:
        """``n`` fixed held-out batches (never drawn from the training split where one exists)."""

    def train_batches(self, batch: int, seq_len: int, seed: int = 0, start: int = 0) -> BatchStream:
        """Endless training batches from step ``start``; ``state_dict()`` resumes them exactly."""
        check_shape(batch, seq_len)
        return BatchStream(self, batch, seq_len, seed, start)

    def loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """The training loss: masked mean cross-entropy in nats (a 0-d tensor, no host sync)."""
        return masked_cross_entropy(logits, batch)

    def metrics(self, logits: Tensor, batch: Batch) -> dict[str, float]:
        """Metrics of one batch: see ``finish_metrics``."""
        with torch.no_grad():
            return self.finish_metrics(_sums(logits, batch))

    def finish_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        n = max(float(sums["count"]), 1.0)
        loss = float(sums["loss"]) / n
        if self.kind == "lm":
            return {"loss": loss, "bits_per_byte": loss / math.log(2),
                    "perplexity": math.exp(min(loss, 80.0))}
        return {"loss": loss, "accuracy": float(sums["correct"]) / n,
                "sequence_accuracy": float(sums["rows_correct"]) / max(float(sums["rows"]), 1.0)}

    def evaluate(self, model_fn: Callable[[Tensor], Tensor], batches: Iterable[Batch],
                 device: torch.device | str | None = None) -> dict[str, float]:
        """Metrics pooled over ``batches`` (weighted by masked positions). ``model_fn`` maps
        ``inputs [B, T]`` to ``logits [B, T, 256]``."""
        total: dict[str, Tensor] = {}
        with torch.no_grad():
            for b in batches:
                if device is not None:
                    b = b.to(device)
                for k, v in _sums(model_fn(b.inputs), b).items():
                    total[k] = total[k] + v if k in total else v
        if not total:
            raise TaskError("evaluate() got no batches")
        return self.finish_metrics(total)

    def describe(self) -> str:
        """One line for logs and the CLI."""
        opts = ", ".join(f"{k}={v}" for k, v in getattr(self, "options", {}).items())
        return f"{self.name}({opts})"


def check_shape(batch: int, seq_len: int) -> None:
    if batch < 1:
        raise TaskError(f"batch size must be at least 1, got {batch}")
    if seq_len < 1:
        raise TaskError(f"sequence length must be at least 1, got {seq_len}")
