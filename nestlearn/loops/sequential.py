"""The reference executor: token by token, exactly the paper's recurrence.

For period C, every token's gradient is taken at the state of its chunk's start (the
mini-batch recurrence); with C = 1 this is the plain online recurrence. Output token t is
read with the state *after* token t's update. Slow and obvious on purpose: it is the oracle
the chunked executors are tested against.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from nestlearn.loops.chunks import gain_rates, keep_saved, run_segments
from nestlearn.loops.common import (
    GradMode,
    MemoryProblem,
    MemoryState,
    Params,
    detach_tree,
    hp_at,
    leaf_grads_ready,
    scale_grads,
)
from nestlearn.memories.base import plain_lin
from nestlearn.objectives import error_signal


def token_grads(pb: MemoryProblem, anchor: Params, k: Tensor, v: Tensor,
                rate: Tensor | None = None) -> tuple[Params, Params]:
    """Gradient of one token's objective at ``anchor`` (scaled by the level's ``clip`` and
    ``max_gain``; ``rate``: the token's ``lr``, ``[B, H]``, needed for the latter) and the
    memory's layer inputs."""
    inputs: Params = {}

    def record(name: str, w: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
        inputs[name] = a[:, :, 0].detach() if not pb.grad.create_graph else a[:, :, 0]
        return plain_lin(name, w, a, b)

    # a graph for the inner gradient whenever the caller records one (even from a detached,
    # truncated state: the gradient still depends on k and v)
    create = pb.grad.create_graph and torch.is_grad_enabled()
    with torch.enable_grad(), keep_saved():  # its grad is taken at once: not through a remat checkpoint
        p, _ = leaf_grads_ready(anchor)
        pred = pb.arch.apply(p, k, record)
        loss = pb.objective(pred, v).sum()
        names = list(p)
        gs = torch.autograd.grad(loss, [p[n] for n in names], create_graph=create, allow_unused=True)
        sq_signal = None
        if pb.max_gain is not None:  # ||dL/dpred||^2: the denominator of the curvature the cap bounds
            sq_signal = error_signal(pb.objective, pred, v, create).pow(2).sum(-1)[:, :, 0]
    grads = {n: (g if g is not None else torch.zeros_like(p[n])) for n, g in zip(names, gs)}
    if not create:
        grads = {n: g.detach() for n, g in grads.items()}
        sq_signal = None if sq_signal is None else sq_signal.detach()
    return scale_grads(pb, grads, sq_signal, rate), inputs


def run_sequential(pb: MemoryProblem, state: MemoryState) -> tuple[Tensor, MemoryState]:
    if pb.grad.kind == "stop":
        return run_stopped(pb, state)

    def step(params: Params, opt: dict[str, Any], anchor: Params, t0: int, t1: int) -> tuple[Tensor, Params, dict[str, Any]]:
        ys = []
        for t in range(t0, t1):  # every token's gradient at the chunk-start state, then its step
            sl = slice(t, t + 1)
            grads, inputs = token_grads(pb, anchor, pb.k[:, :, sl], pb.v[:, :, sl], gain_rates(pb, t))
            params, opt = pb.rule.step(params, opt, grads, hp_at(pb.hp, t), inputs)
            ys.append(pb.arch.apply(anchor if pb.read_start else params, pb.q[:, :, sl]))
        return torch.cat(ys, dim=2), params, opt

    return run_segments(pb, state, step)


def run_stopped(pb: MemoryProblem, state: MemoryState) -> tuple[Tensor, MemoryState]:
    """``stop``: the state evolves without a graph; reads differentiate through q only."""
    inner = replace(
        pb, q=pb.q.detach(), k=pb.k.detach(), v=pb.v.detach(), grad=GradMode("first_order"),
        hp={n: (h.detach() if isinstance(h, Tensor) else h) for n, h in pb.hp.items()},
    )
    with torch.no_grad():
        ys_states = []
        st = detach_tree(state)
        for t in range(pb.q.shape[2]):
            _, st = run_sequential(inner.slice(t, t + 1), st)
            ys_states.append(st["anchor"] if pb.read_start else st["params"])
    ys = [pb.arch.apply(p, pb.q[:, :, t : t + 1]) for t, p in enumerate(ys_states)]
    return torch.cat(ys, dim=2), st
