"""Per-level inner diagnostics, collected only when asked (e.g. at a training log step).

``with collect() as stats: model(tokens)`` fills ``stats[level]`` with the inner objective
of every memory of that level at its starting state (before this call's updates), the norm
of the update the call made and, for an ``l2`` level with a rate, its chunk gain at that state
(``chunk_gain``). Values stay tensors (no host sync in the hot path); the caller reads them
once with ``summarize``. Outside ``collect`` recording costs one attribute check.

The chunk gain is ``S(C, beta) * mean_t(lr_t |x_t|^2)`` (``S``: the problem's ``gain_steps``, from
the level's period and its momentum's largest value), ``x_t`` the input of the memory's last
layer for token ``t`` at the starting weights (the key itself for a linear memory, the hidden
activations for an MLP): the quantity of docs/training-health.md §1 and §7 whose value above 1
lets a chunk of tokens pushing the same way overshoot. It follows what the outer level has
learned (an MLP's hidden activations grow with its initial weights), which a bound on the spec's
constants cannot; ``summarize`` reports its largest value over a level's memories.

The peak gain is the largest token's ``S(C, beta) * lr_t * c_t``, ``c_t`` the memory's curvature
along that token's error at the starting weights (both layers of an MLP; ``common.token_gain``),
before the level's ``clip`` and ``max_gain``: the quantity ``max_gain`` holds down, so a level
whose peak gain stays below its cap never had a token scaled. For memories with an explicit
backward (``error_signals``: linear, MLP).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nestlearn.memories.base import Lin, plain_lin

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
        inputs: dict[str, Tensor] = {}
        loss = pb.objective(pb.arch.apply(start, pb.k.detach(), _recording(inputs)), pb.v.detach())
        sq = sum(((after["params"][n].detach() - p) ** 2).flatten(2).sum(-1) for n, p in start.items())
        norm = torch.as_tensor(sq).sqrt().mean()
    entry = store.setdefault(pb.level, {"inner_loss": [], "update_norm": []})
    entry["inner_loss"].append(loss.float().mean())
    entry["update_norm"].append(norm.float())
    gain = chunk_gain(pb, inputs)
    if gain is not None:
        entry.setdefault("chunk_gain", []).append(gain.float())
        peak = peak_gain(pb, start)
        if peak is not None:
            entry.setdefault("peak_gain", []).append(peak.float())


def _recording(inputs: dict[str, Tensor]) -> Lin:
    """A ``lin`` hook that multiplies as ``plain_lin`` and keeps each weight's input in ``inputs``
    (the inner-loss forward then gives the chunk gain its layer inputs at no extra cost)."""
    def lin(name: str, w: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
        inputs[name] = a
        return plain_lin(name, w, a, b)

    return lin


def layer_inputs(pb: MemoryProblem, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each weight's input when the memory at ``params`` reads ``pb``'s keys."""
    inputs: dict[str, Tensor] = {}
    with torch.no_grad():
        pb.arch.apply(params, pb.k.detach(), _recording(inputs))
    return inputs


def chunk_gain(pb: MemoryProblem, inputs: dict[str, Tensor]) -> Tensor | None:
    """``S(C, beta) * mean_t(lr_t |x_t|^2)`` from the layer inputs at the starting weights
    (``layer_inputs``; module docstring); None where the level has no ``l2`` objective or no
    rate, or its memory's last layer was not read through the ``lin`` hook."""
    from nestlearn import objectives
    from nestlearn.loops.chunks import hp_tokens

    layers = getattr(pb.arch, "layers", None)
    if pb.objective is not objectives.l2 or "lr" not in pb.hp or not layers or layers[-1].weight not in inputs:
        return None
    x = inputs[layers[-1].weight]
    with torch.no_grad():  # S: the problem's gain_steps (the level's momentum at its largest; no host sync)
        lr = hp_tokens(pb, "lr").detach()
        return pb.gain_steps * (lr * x.pow(2).sum(-1)).mean()


def peak_gain(pb: MemoryProblem, params: dict[str, Tensor]) -> Tensor | None:
    """The largest token's ``S(C, beta) * lr_t * c_t`` at ``params`` (module docstring), ``S`` the
    problem's ``gain_steps``; None where ``chunk_gain`` is (call it after that) or the memory has
    no explicit backward."""
    from nestlearn import objectives
    from nestlearn.loops.chunks import hp_tokens, token_sq_norm
    from nestlearn.loops.common import token_gain

    v = pb.v.detach()
    seen: list[Tensor] = []

    def dloss(pred: Tensor) -> Tensor:
        seen.append(objectives.error_signal(objectives.l2, pred, v, False))
        return seen[-1]

    with torch.no_grad():
        sig = pb.arch.error_signals(params, pb.k.detach(), dloss)
        if sig is None:
            return None
        sq, lr = token_sq_norm(pb.arch, *sig, params), hp_tokens(pb, "lr").detach()
        return token_gain(sq, seen[-1].pow(2).sum(-1), lr, pb.gain_steps).max()


LARGEST = ("chunk_gain", "peak_gain")
"""The statistics ``summarize`` reports as their largest value over a level's memories and blocks."""


def summarize(store: dict[str, dict[str, list[Tensor]]]) -> dict[str, dict[str, float]]:
    """Means over a level's memories and blocks (the gains: the largest), as floats (one host
    sync)."""
    out: dict[str, dict[str, float]] = {}
    for level, entry in store.items():
        out[level] = {k: float(torch.stack(v).max() if k in LARGEST else torch.stack(v).mean())
                      for k, v in entry.items() if v}
    return out
