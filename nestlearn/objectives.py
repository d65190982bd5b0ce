"""Inner objectives: per-token losses ``L(M(k), v)`` summed over the feature dimension.

Each returns a tensor shaped like ``pred`` without its last dimension, so the executors can
sum over batch, heads and tokens and still read per-token gradients (the tokens of a chunk
are independent at the chunk-start state).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a gradient is taken: checking a spec's names needs none
    from torch import Tensor

Objective = Callable[["Tensor", "Tensor"], "Tensor"]


def l2(pred: Tensor, target: Tensor) -> Tensor:
    """``||M(k) - v||^2`` (Titans, DeltaNet, TTT)."""
    return (pred - target).pow(2).sum(-1)


def dot(pred: Tensor, target: Tensor) -> Tensor:
    """``-<M(k), v>``: the Hebbian objective whose gradient step is linear attention."""
    return -(pred * target).sum(-1)


BUILTIN: dict[str, Objective] = {"l2": l2, "dot": dot}


def check_name(name: str) -> str | None:
    """What is wrong with an objective's name, without importing anything (None: nothing).

    ``package.module:function`` is checked by its syntax and by whether its top-level package
    is installed (``importlib.util.find_spec`` of that name runs none of its code); the
    module itself is imported, and its function looked up, only when a model is built to run
    (``nestlearn run``, ``nestlearn.compile``). ``nestlearn validate`` and ``compile`` therefore
    never execute code named by a spec received from someone else."""
    if name in BUILTIN:
        return None
    module, sep, attr = name.partition(":")
    parts = module.split(".")
    if not sep or not attr.isidentifier() or not all(p.isidentifier() for p in parts):
        return f"unknown objective {name!r}: use 'l2', 'dot' or a callable as 'package.module:function'"
    try:
        found = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        found = None
    if found is None:
        return (f"no installed package {parts[0]!r} for the objective {name!r} (checked without importing it; "
                "nestlearn run imports it)")
    return None


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
    import torch

    with torch.enable_grad():
        p = pred if pred.requires_grad else pred.detach().requires_grad_()
        (g,) = torch.autograd.grad(objective(p, target).sum(), p, create_graph=create_graph)
    return g
