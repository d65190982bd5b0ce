"""The chunk-parallel executor for any rule and any memory.

Within a chunk every token's gradient is taken at the chunk-start state, all at once with
``vmap(grad)`` over the chunk's tokens (batch and heads are already batched in the
parameters). The rule is then scanned over the chunk's tokens (cheap element-wise work)
and each token is read with its post-update state; only the carry between chunks is
sequential. Linear rules take the closed form in ``dual.py`` instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from nestlearn.loops.chunks import gain_rates, run_segments
from nestlearn.loops.common import MemoryProblem, MemoryState, Params, detach_tree, hp_at, scale_grads
from nestlearn.loops.sequential import run_stopped
from nestlearn.memories.base import plain_lin
from nestlearn.objectives import error_signal


def chunk_grads(pb: MemoryProblem, anchor: Params, k: Tensor, v: Tensor, rate: Tensor | None = None) -> Params:
    """Per-token gradients at ``anchor``: ``[n, B, H, ...]`` for tokens of ``k [B,H,n,d]``, scaled
    by the level's ``clip`` and ``max_gain`` (``rate``: the tokens' ``lr``, ``[B, H, n]``, for the latter)."""

    def loss(p: Params, k1: Tensor, v1: Tensor) -> Tensor:
        return pb.objective(pb.arch.apply(p, k1.unsqueeze(2)), v1.unsqueeze(2)).sum()

    if not pb.grad.create_graph:
        anchor, k, v = detach_tree(anchor), k.detach(), v.detach()
    grads = vmap(grad(loss), in_dims=(None, 2, 2))(anchor, k, v)
    sq_signal = None
    if pb.max_gain is not None:  # every token read at the chunk start: its error ||dL/dpred||^2 in one pass
        assert rate is not None
        err = error_signal(pb.objective, pb.arch.apply(anchor, k), v, pb.grad.create_graph)
        sq_signal, rate = err.pow(2).sum(-1).permute(2, 0, 1), rate.permute(2, 0, 1)
    return scale_grads(pb, grads, sq_signal, rate, lead=3)


def layer_inputs(pb: MemoryProblem, anchor: Params, k: Tensor) -> Params:
    """Each weight's input at every token of the chunk (for rules such as DGD)."""
    rec: Params = {}

    def record(name: str, w: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
        rec[name] = a
        return plain_lin(name, w, a, b)

    pb.arch.apply(anchor, k, record)
    return rec if pb.grad.create_graph else detach_tree(rec)


def run_chunked(pb: MemoryProblem, state: MemoryState) -> tuple[Tensor, MemoryState]:
    if pb.grad.kind == "stop":
        return run_stopped(pb, state)

    def step(params: Params, opt: dict[str, Any], anchor: Params, t0: int, t1: int) -> tuple[Tensor, Params, dict[str, Any]]:
        k, v = pb.k[:, :, t0:t1], pb.v[:, :, t0:t1]
        grads = chunk_grads(pb, anchor, k, v, gain_rates(pb, slice(t0, t1)))
        inputs = layer_inputs(pb, anchor, k) if pb.rule.needs_inputs else None
        ys = []
        for i in range(t1 - t0):  # the rule scanned over the chunk's tokens
            g_i = {n: g[i] for n, g in grads.items()}
            in_i = None if inputs is None else {n: a[:, :, i] for n, a in inputs.items()}
            params, opt = pb.rule.step(params, opt, g_i, hp_at(pb.hp, t0 + i), in_i)
            ys.append(pb.arch.apply(anchor if pb.read_start else params, pb.q[:, :, t0 + i : t0 + i + 1]))
        return torch.cat(ys, dim=2), params, opt

    return run_segments(pb, state, step)
