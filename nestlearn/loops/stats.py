"""Per-level inner diagnostics, collected only when asked (e.g. at a training log step).

``with collect() as stats: model(tokens)`` fills ``stats[level]`` with the inner objective
of every memory of that level at its starting state (before this call's updates), the norm
of the update the call made and, for an ``l2`` level with a rate, its chunk gain at that state
(``chunk_gain``). Values stay tensors (no host sync in the hot path); the caller reads them
once with ``summarize``. Outside ``collect`` recording costs one attribute check.

The chunk gain is ``S(C, beta) * mean_t(lr_t |x_t|^2)``, ``x_t`` the input of the memory's last
layer for token ``t`` at the starting weights (the key itself for a linear memory, the hidden
activations for an MLP): the quantity of docs/training-health.md §1 and §7 whose value above 1
lets a chunk of tokens pushing the same way overshoot. It follows what the outer level has
learned (an MLP's hidden activations grow with its initial weights), which a bound on the spec's
constants cannot; ``summarize`` reports its largest value over a level's memories.
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
    gain = chunk_gain(pb, start)
    if gain is not None:
        entry.setdefault("chunk_gain", []).append(gain.float())


def chunk_gain(pb: MemoryProblem, start: dict[str, Tensor]) -> Tensor | None:
    """``S(C, beta) * mean_t(lr_t |x_t|^2)`` at ``start`` (module docstring); None where the level
    has no ``l2`` objective or no rate, or its memory has no layers to read."""
    from dataclasses import replace

    from nestlearn import objectives
    from nestlearn.loops.chunks import chunk_signals, hp_tokens
    from nestlearn.stability import accumulated_step

    layers = getattr(pb.arch, "layers", None)
    if pb.objective is not objectives.l2 or "lr" not in pb.hp or not layers:
        return None
    beta = pb.hp.get("beta", 0.0)
    beta_f = float(beta.max()) if isinstance(beta, Tensor) else float(beta)
    with torch.no_grad():
        try:
            _, inputs = chunk_signals(replace(pb, clip=None), start, pb.k.detach(), pb.v.detach())
        except (RuntimeError, TypeError, KeyError):  # a memory without the closed form's signals
            return None
        x = inputs.get(layers[-1].weight)
        if x is None:
            return None
        lr = hp_tokens(pb, "lr").detach()
        return accumulated_step(int(pb.period), beta_f) * (lr * x.pow(2).sum(-1)).mean()


def summarize(store: dict[str, dict[str, list[Tensor]]]) -> dict[str, dict[str, float]]:
    """Means over a level's memories and blocks (the chunk gain: the largest), as floats (one
    host sync)."""
    out: dict[str, dict[str, float]] = {}
    for level, entry in store.items():
        out[level] = {k: float(torch.stack(v).max() if k == "chunk_gain" else torch.stack(v).mean())
                      for k, v in entry.items() if v}
    return out
