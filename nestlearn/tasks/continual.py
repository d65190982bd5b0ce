"""``continual``: distinct domains learned one after another, and forgetting.

Domains: ``code`` (the stdlib's Python sources), ``prose`` (the interpreter's help topics, or
generated prose-like text where they are absent), and any synthetic task (``anbn``, ``parity``,
``mqar``, ...). ``phases`` is the domain order, ``phase_steps`` the steps of each phase (one number
for all, or one per phase); after the last phase the stream stays on the last domain.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from itertools import accumulate

import torch
from torch import Tensor

from nestlearn.spec.errors import suggest

from .base import Batch, Task, TaskError
from .corpus import Corpus, split_items, stdlib_corpus
from .formal import LANGUAGES, FormalTask
from .prose import generated_prose, stdlib_docs
from .synthetic import MQARTask
from .text import CorpusLM

TEXT_DOMAINS = ("code", "prose")
SYNTHETIC_DOMAINS = (*LANGUAGES, "mqar")


def prose_corpus(source: str = "auto") -> Corpus:
    """``stdlib``: help topics split by topic; ``generated``: disjoint generated train/val text."""
    docs = stdlib_docs() if source in ("auto", "stdlib") else []
    if len(docs) >= 2:
        return split_items("python-help-topics", docs)
    if source == "stdlib":
        raise TaskError("continual: this Python has no pydoc_data help topics; use prose=generated")
    train, val = generated_prose(2 << 20, "train"), generated_prose(128 << 10, "val")
    return Corpus("generated-prose", torch.frombuffer(bytearray(train), dtype=torch.uint8),
                  torch.frombuffer(bytearray(val), dtype=torch.uint8))


def _domain_task(domain: str, prose: str, code_bytes: int | None) -> Task:
    if domain == "code":
        return CorpusLM(stdlib_corpus(code_bytes) if code_bytes else stdlib_corpus())
    if domain == "prose":
        return CorpusLM(prose_corpus(prose))
    if domain in LANGUAGES:
        return FormalTask(domain)
    if domain == "mqar":
        return MQARTask()
    choices = (*TEXT_DOMAINS, *SYNTHETIC_DOMAINS)
    hint = suggest(domain, choices, cutoff=0.6)
    raise TaskError(f"continual: unknown domain '{domain}'{hint}; choices: {', '.join(choices)}")


UNIFORM_BITS = 8.0  # bits per byte of a uniform guess over 256 bytes


def domain_perf(metrics: dict[str, float]) -> float:
    """A domain's performance, higher is better: accuracy, or bits saved over uniform for text."""
    if "accuracy" in metrics:
        return float(metrics["accuracy"])
    return UNIFORM_BITS - float(metrics["bits_per_byte"])


def _earlier_domains(rows: list[list[float]], phases: Sequence[str], what: str) -> list[tuple[int, str, int]]:
    """``(column, domain, last phase that trained it)`` for every domain not trained in the final
    phase, after checking that ``rows`` is a phases x domains matrix."""
    domains = list(dict.fromkeys(phases))
    if len(rows) != len(phases) or any(len(r) != len(domains) for r in rows):
        raise TaskError(f"{what}: expected a {len(phases)} x {len(domains)} matrix (phases x domains "
                        f"{domains}), got {len(rows)} rows of lengths {sorted({len(r) for r in rows})}")
    return [(j, d, max(i for i, p in enumerate(phases) if p == d))
            for j, d in enumerate(domains) if d != phases[-1]]


def forgetting_percent(perf: Sequence[Sequence[float]], phases: Sequence[str]) -> dict[str, float | None]:
    """Forgetting as the Nested Learning paper's continual table reports it, in %.

    ``perf[p][j]``: performance (``domain_perf``) on domain j (domains in order of first appearance
    in ``phases``) right after phase p. For every domain not trained in the final phase:
    ``100 * (best - final) / best``, best being the largest performance over the phases up to and
    including the last one that trained it. 0% = nothing lost, 100% = all that was learned is gone,
    negative = it improved; None where best <= 0 (nothing was learned)."""
    rows = [[float(v) for v in r] for r in perf]
    out: dict[str, float | None] = {}
    for j, d, last in _earlier_domains(rows, phases, "forgetting"):
        best = max(rows[i][j] for i in range(last + 1))
        out[d] = 100.0 * (best - rows[-1][j]) / best if best > 0 else None
    return out


def loss_increase(losses: Sequence[Sequence[float]] | Tensor, phases: Sequence[str]) -> dict[str, float]:
    """Loss increase (nats) on earlier domains after later phases.

    ``losses[i][j]``: loss on domain j (domains in order of first appearance in ``phases``) measured
    after phase i. For each domain not trained in the final phase: final loss minus the loss right
    after the last phase that trained it. Returns ``{domain: increase, ..., "mean": ...}``.
    """
    rows = losses.tolist() if isinstance(losses, Tensor) else [list(r) for r in losses]
    out: dict[str, float] = {}
    for j, d, last in _earlier_domains(rows, phases, "loss_increase"):
        out[d] = float(rows[-1][j]) - float(rows[last][j])
    out["mean"] = sum(out.values()) / len(out) if out else 0.0
    return out


class ContinualTask(Task):
    """Domains in sequence. ``phases``: names, or one comma-separated string; ``prose``: ``auto``,
    ``stdlib`` or ``generated``; ``code_bytes``: the code corpus budget (default 8 MB)."""

    name = "continual"
    kind = "lm"

    def __init__(self, phases: Sequence[str] | str = ("code", "prose", "anbn"),
                 phase_steps: int | Sequence[int] = 500, prose: str = "auto",
                 code_bytes: int | None = None) -> None:
        names = [p.strip() for p in phases.split(",")] if isinstance(phases, str) else list(map(str, phases))
        if not names or any(not n for n in names):
            raise TaskError(f"continual: phases must be a non-empty list of domains, got {phases!r}")
        steps = [phase_steps] * len(names) if isinstance(phase_steps, int) else list(map(int, phase_steps))
        if len(steps) != len(names):
            raise TaskError(f"continual: {len(names)} phases but {len(steps)} phase_steps")
        if any(s < 1 for s in steps):
            raise TaskError(f"continual: every phase needs at least one step, got phase_steps={steps}")
        if prose not in ("auto", "stdlib", "generated"):
            raise TaskError(f"continual: prose must be auto, stdlib or generated, got '{prose}'")
        self.phases, self.phase_steps = names, steps
        self.domains = list(dict.fromkeys(names))
        self.tasks = {d: _domain_task(d, prose, code_bytes) for d in self.domains}
        self._ends = list(accumulate(steps))
        self.options = {"phases": ",".join(names), "phase_steps": steps, "prose": prose,
                        "code_bytes": code_bytes}

    @property
    def total_steps(self) -> int:
        return self._ends[-1]

    def phase_ends(self) -> list[int]:
        """The step count at the end of each phase (evaluate every domain there)."""
        return list(self._ends)

    def phase_of_step(self, step: int) -> int:
        return min(bisect.bisect_right(self._ends, step), len(self.phases) - 1)

    def domain_of_step(self, step: int) -> str:
        return self.phases[self.phase_of_step(step)]

    def task(self, domain: str) -> Task:
        if domain not in self.tasks:
            raise TaskError(f"continual: domain '{domain}' is not one of this run's phases "
                            f"({', '.join(self.domains)})")
        return self.tasks[domain]

    def batch_at(self, step: int, batch: int, seq_len: int, seed: int = 0) -> Batch:
        return self.tasks[self.domain_of_step(step)].batch_at(step, batch, seq_len, seed)

    def eval_batches(self, batch: int, seq_len: int, n: int, seed: int = 0,
                     domain: str | None = None) -> list[Batch]:
        """``n`` held-out batches of ``domain``; with no domain, ``n`` of every domain in turn."""
        if domain is not None:
            return self.task(domain).eval_batches(batch, seq_len, n, seed)
        return [b for d in self.domains for b in self.tasks[d].eval_batches(batch, seq_len, n, seed)]

    def evaluate_domains(self, model_fn: Callable[[Tensor], Tensor], batch: int, seq_len: int, n: int,
                         seed: int = 0,
                         device: torch.device | str | None = None) -> dict[str, dict[str, float]]:
        """Every domain's metrics (its own kind: bits per byte for text, accuracy for synthetic)."""
        return {d: t.evaluate(model_fn, t.eval_batches(batch, seq_len, n, seed), device)
                for d, t in self.tasks.items()}

    def loss_increase(self, losses: Sequence[Sequence[float]] | Tensor) -> dict[str, float]:
        return loss_increase(losses, self.phases)

    def forgetting_percent(self, perf: Sequence[Sequence[float]]) -> dict[str, float | None]:
        return forgetting_percent(perf, self.phases)

    def describe(self) -> str:
        parts = ", ".join(f"{p} x{s}" for p, s in zip(self.phases, self.phase_steps, strict=True))
        return f"continual: {parts}"
