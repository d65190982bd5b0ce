"""Executors for one memory's inner loop: sequential (the oracle) and chunk-parallel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor

from nestlearn.loops import fla_backend, remat, stats
from nestlearn.loops.chunked import run_chunked
from nestlearn.loops.common import GradMode, MemoryProblem, init_state, with_rule_constants
from nestlearn.loops.delta import run_delta
from nestlearn.loops.delta import supports as delta_supports
from nestlearn.loops.dgd_dual import run_dgd_dual
from nestlearn.loops.dgd_dual import supports as dgd_supports
from nestlearn.loops.dual import run_dual
from nestlearn.loops.sequential import run_sequential

Executor = Literal["auto", "sequential", "chunked", "scan"]

__all__ = ["GradMode", "MemoryProblem", "init_state", "run", "run_sequential", "run_chunked", "run_dual"]


def run(pb: MemoryProblem, state: dict[str, Any], executor: Executor = "auto") -> tuple[Tensor, dict[str, Any]]:
    """Run ``pb`` from ``state`` (executor: ``_pick``), recording diagnostics when collecting.

    Under autocast (bf16 / fp16 activations) the inner loop itself runs in fp32: fast weights,
    their optimiser state and the chunk algebra (products of many decays, triangular solves)
    drift or overflow in half precision. fla's kernels keep their own mixed precision."""
    hp = with_rule_constants(pb.rule, pb.hp)  # hyper-parameters missing from pb.hp: the rule's constants
    if len(hp) != len(pb.hp):
        pb = replace(pb, hp=hp)
    use_fla = executor == "auto" and fla_backend.available(pb) and fla_backend.supports(pb)
    device = pb.q.device.type
    def execute(p: MemoryProblem, s: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        fn = _pick(p, executor, use_fla)
        if remat.applies(p):  # the level's remat: recompute per group of chunks in the backward
            if fn is not run_chunked:
                return remat.run_grouped(p, s, fn)
            remat.warn_unsupported(p)
        return fn(p, s)

    if torch.is_autocast_enabled(device) and not use_fla:
        with torch.autocast(device, enabled=False):
            y, new_state = execute(_fp32(pb), _fp32_tree(state))
    else:
        y, new_state = execute(pb, state)
    if stats.active():
        stats.record(pb, state, new_state)
    return y, new_state


def _pick(pb: MemoryProblem, executor: Executor, use_fla: bool,
          ) -> Callable[[MemoryProblem, dict[str, Any]], tuple[Tensor, dict[str, Any]]]:
    """``auto``: fla's kernels or the chunk-parallel delta rule where the problem is exactly a
    (gated) delta rule (compute chunk: the level's ``chunk:``, else ``delta.auto_chunk``), the
    DGD closed form, the closed form for linear rules, else ``vmap(grad)`` + scan; ``scan``
    forces the last."""
    if executor == "sequential":
        return run_sequential
    if use_fla:
        return lambda p, s: fla_backend.run_fla(p, s, p.chunk)
    if executor == "auto" and delta_supports(pb):
        return lambda p, s: run_delta(p, s, p.chunk)
    if executor in ("auto", "chunked") and dgd_supports(pb):
        return run_dgd_dual
    if executor == "scan" or not pb.rule.linear:
        return run_chunked
    return run_dual


def _fp32_tree(x: Any) -> Any:
    def up(t: Any) -> Any:
        return t.float() if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t

    return torch.utils._pytree.tree_map(up, x)


def _fp32(pb: MemoryProblem) -> MemoryProblem:
    return replace(pb, q=_fp32_tree(pb.q), k=_fp32_tree(pb.k), v=_fp32_tree(pb.v), hp=_fp32_tree(dict(pb.hp)))
