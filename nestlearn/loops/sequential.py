"""The reference executor: token by token, exactly the paper's recurrence.

For period C, every token's gradient is taken at the state of its chunk's start (the
mini-batch recurrence); with C = 1 this is the plain online recurrence. Output token t is
read with the state *after* token t's update. Slow and obvious on purpose: it is the oracle
the chunked executors are tested against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nestlearn.loops.common import MemoryProblem, Params, clip_grads, detach_tree, hp_at, leaf_grads_ready
from nestlearn.loops.dual import keep_saved
from nestlearn.memories.base import plain_lin


def token_grads(pb: MemoryProblem, anchor: Params, k: Tensor, v: Tensor) -> tuple[Params, Params]:
    """Gradient of one token's objective at ``anchor`` and the memory's layer inputs."""
    inputs: Params = {}

    def record(name: str, w: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
        inputs[name] = a[:, :, 0].detach() if not pb.grad.create_graph else a[:, :, 0]
        return plain_lin(name, w, a, b)

    # a graph for the inner gradient whenever the caller records one (even from a detached,
    # truncated state: the gradient still depends on k and v)
    create = pb.grad.create_graph and torch.is_grad_enabled()
    with torch.enable_grad(), keep_saved():  # its grad is taken at once: not through a remat checkpoint
        p, _ = leaf_grads_ready(anchor)
        loss = pb.objective(pb.arch.apply(p, k, record), v).sum()
        names = list(p)
        gs = torch.autograd.grad(loss, [p[n] for n in names], create_graph=create, allow_unused=True)
    grads = {n: (g if g is not None else torch.zeros_like(p[n])) for n, g in zip(names, gs)}
    if not create:
        grads = {n: g.detach() for n, g in grads.items()}
    return clip_grads(grads, pb.clip), inputs


def run_sequential(pb: MemoryProblem, state: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    if pb.grad.kind == "stop":
        return _run_stopped(pb, state)
    params, opt, anchor = state["params"], state["opt"], state["anchor"]
    offset, chunks = state["offset"], state["chunks"]
    ys = []
    for t in range(pb.q.shape[2]):
        if offset == 0:
            if pb.grad.kind == "truncate" and chunks > 0 and chunks % pb.grad.n == 0:
                params, opt = detach_tree(params), detach_tree(opt)
            anchor = params
            chunks += 1
        sl = slice(t, t + 1)
        grads, inputs = token_grads(pb, anchor, pb.k[:, :, sl], pb.v[:, :, sl])
        params, opt = pb.rule.step(params, opt, grads, hp_at(pb.hp, t), inputs)
        ys.append(pb.arch.apply(anchor if pb.read_start else params, pb.q[:, :, sl]))
        offset = (offset + 1) % pb.period
    new_state = {"params": params, "opt": opt, "anchor": anchor, "offset": offset, "chunks": chunks}
    return torch.cat(ys, dim=2), new_state


def _run_stopped(pb: MemoryProblem, state: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """``stop``: the state evolves without a graph; reads differentiate through q only."""
    from dataclasses import replace

    from nestlearn.loops.common import GradMode

    inner = replace(
        pb, q=pb.q.detach(), k=pb.k.detach(), v=pb.v.detach(), grad=GradMode("first_order"),
        hp={n: (h.detach() if isinstance(h, Tensor) else h) for n, h in pb.hp.items()},
    )
    with torch.no_grad():
        ys_states = []
        st = detach_tree(state)
        for t in range(pb.q.shape[2]):
            one = replace(inner, q=inner.q[:, :, t : t + 1], k=inner.k[:, :, t : t + 1],
                          v=inner.v[:, :, t : t + 1], hp=hp_at(inner.hp, slice(t, t + 1)))
            _, st = run_sequential(one, st)
            ys_states.append(st["anchor"] if pb.read_start else st["params"])
    ys = [pb.arch.apply(p, pb.q[:, :, t : t + 1]) for t, p in enumerate(ys_states)]
    return torch.cat(ys, dim=2), st
