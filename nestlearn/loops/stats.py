"""Per-level inner diagnostics, collected only when asked (e.g. at a training log step).

``with collect() as stats: model(tokens)`` fills ``stats[level]`` with the inner objective
of every memory of that level at its starting state (before this call's updates) and the norm
of the update the call made. Values stay tensors (no host sync in the hot path); the caller
reads them once with ``summarize``. Outside ``collect`` recording costs one attribute check.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from nestlearn.loops.common import MemoryProblem, MemoryState

_ACTIVE: ContextVar[dict[str, dict[str, list[Tensor]]] | None] = ContextVar("nestlearn_stats", default=None)


@contextmanager
def collect() -> Iterator[dict[str, dict[str, list[Tensor]]]]:
    """Collect ``{level: {"inner_loss": [...], "update_norm": [...]}}`` while the block runs."""
    store: dict[str, dict[str, list[Tensor]]] = {}
    token = _ACTIVE.set(store)
    try:
        yield store
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    return _ACTIVE.get() is not None


def record(pb: MemoryProblem, before: MemoryState, after: MemoryState) -> None:
    """Record one memory's inner loss at ``before`` and the size of the step to ``after``."""
    store = _ACTIVE.get()
    if store is None or not pb.level:
        return
    with torch.no_grad():
        start = {n: p.detach() for n, p in before["params"].items()}
        loss = pb.objective(pb.arch.apply(start, pb.k.detach()), pb.v.detach())
        sq = sum(((after["params"][n].detach() - p) ** 2).flatten(2).sum(-1) for n, p in start.items())
        norm = torch.as_tensor(sq).sqrt().mean()
    entry = store.setdefault(pb.level, {"inner_loss": [], "update_norm": []})
    entry["inner_loss"].append(loss.float().mean())
    entry["update_norm"].append(norm.float())


def summarize(store: dict[str, dict[str, list[Tensor]]]) -> dict[str, dict[str, float]]:
    """Means over a level's memories and blocks, as floats (one host sync)."""
    out: dict[str, dict[str, float]] = {}
    for level, entry in store.items():
        out[level] = {k: float(torch.stack(v).mean()) for k, v in entry.items() if v}
    return out
