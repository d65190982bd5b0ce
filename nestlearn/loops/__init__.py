"""Executors for one memory's inner loop: sequential (the oracle) and chunk-parallel."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor

from nestlearn.loops import fla_backend, stats
from nestlearn.loops.chunked import run_chunked
from nestlearn.loops.common import GradMode, MemoryProblem, init_state
from nestlearn.loops.delta import run_delta
from nestlearn.loops.delta import supports as delta_supports
from nestlearn.loops.dgd_dual import run_dgd_dual
from nestlearn.loops.dgd_dual import supports as dgd_supports
from nestlearn.loops.dual import run_dual
from nestlearn.loops.sequential import run_sequential

Executor = Literal["auto", "sequential", "chunked", "scan"]

__all__ = ["GradMode", "MemoryProblem", "init_state", "run", "run_sequential", "run_chunked", "run_dual"]


def run(pb: MemoryProblem, state: dict[str, Any], executor: Executor = "auto") -> tuple[Tensor, dict[str, Any]]:
    """Run ``pb`` from ``state`` (see ``_dispatch``), recording diagnostics when collecting.

    Under autocast (bf16 / fp16 activations) the inner loop itself runs in fp32: fast weights,
    their optimiser state and the chunk algebra (products of many decays, triangular solves)
    drift or overflow in half precision. fla's kernels keep their own mixed precision."""
    device = pb.q.device.type
    if torch.is_autocast_enabled(device) and not (fla_backend.available(pb) and fla_backend.supports(pb)):
        with torch.autocast(device, enabled=False):
            y, new_state = _dispatch(_fp32(pb), _fp32_tree(state), executor)
    else:
        y, new_state = _dispatch(pb, state, executor)
    if stats.active():
        stats.record(pb, state, new_state)
    return y, new_state


def _dispatch(pb: MemoryProblem, state: dict[str, Any], executor: Executor = "auto") -> tuple[Tensor, dict[str, Any]]:
    """Run ``pb`` from ``state``. ``auto`` takes the closed form for linear rules and the
    ``vmap(grad)`` + scan chunk executor otherwise; ``scan`` forces the latter.

    Hyper-parameters missing from ``pb.hp`` take the rule's own constants."""
    consts = {n: float(h) for n, h in pb.rule.hypers.items() if isinstance(h, (int, float))}
    if any(n not in pb.hp for n in consts):
        pb = replace(pb, hp={**consts, **pb.hp})
    if executor == "sequential":
        return run_sequential(pb, state)
    # [bench/perf, issue 5] period-1 linear memory + l2 + sgd (no beta): the exact
    # chunk-parallel (gated) delta rule; chunk size from the level's `chunk:` when the
    # problem carries one (MemoryProblem.chunk), else 64.
    if executor == "auto" and fla_backend.available(pb) and fla_backend.supports(pb):
        return fla_backend.run_fla(pb, state, getattr(pb, "chunk", None))
    if executor == "auto" and delta_supports(pb):
        return run_delta(pb, state, getattr(pb, "chunk", None))
    if executor in ("auto", "chunked") and dgd_supports(pb):
        return run_dgd_dual(pb, state)
    if executor == "scan" or not pb.rule.linear:
        return run_chunked(pb, state)
    return run_dual(pb, state)


def _fp32_tree(x: Any) -> Any:
    def up(t: Any) -> Any:
        return t.float() if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t

    return torch.utils._pytree.tree_map(up, x)


def _fp32(pb: MemoryProblem) -> MemoryProblem:
    return replace(pb, q=_fp32_tree(pb.q), k=_fp32_tree(pb.k), v=_fp32_tree(pb.v), hp=_fp32_tree(dict(pb.hp)))
