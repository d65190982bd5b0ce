"""Inner objectives: per-token losses ``L(M(k), v)`` summed over the feature dimension.

Each returns a tensor shaped like ``pred`` without its last dimension, so the executors can
sum over batch, heads and tokens and still read per-token gradients (the tokens of a chunk
are independent at the chunk-start state).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

Objective = Callable[[Tensor, Tensor], Tensor]


def l2(pred: Tensor, target: Tensor) -> Tensor:
    """``||M(k) - v||^2`` (Titans, DeltaNet, TTT)."""
    return (pred - target).pow(2).sum(-1)


def dot(pred: Tensor, target: Tensor) -> Tensor:
    """``-<M(k), v>``: the Hebbian objective whose gradient step is linear attention."""
    return -(pred * target).sum(-1)


BUILTIN: dict[str, Objective] = {"l2": l2, "dot": dot}


def resolve(name: str) -> Objective:
    """``l2``, ``dot``, or a user callable given as ``package.module:function``."""
    if name in BUILTIN:
        return BUILTIN[name]
    module, _, attr = name.partition(":")
    fn = getattr(importlib.import_module(module), attr)
    if not callable(fn):
        raise TypeError(f"objective {name!r} is not callable")
    return fn  # type: ignore[no-any-return]


def error_signal(objective: Objective, pred: Tensor, target: Tensor, create_graph: bool) -> Tensor:
    """``dL/dpred`` per token, for the closed-form paths; works for any objective."""
    if objective is l2:
        return 2.0 * (pred - target)
    if objective is dot:
        return -target
    with torch.enable_grad():
        p = pred if pred.requires_grad else pred.detach().requires_grad_()
        (g,) = torch.autograd.grad(objective(p, target).sum(), p, create_graph=create_graph)
    return g
