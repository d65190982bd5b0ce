"""Executors for one memory's inner loop: sequential (the oracle) and chunk-parallel.

One floor, imported bottom-up (no cycle; ``tests/test_loops_imports.py``):

- ``common``: ``MemoryProblem`` (one memory's problem over a span, ``slice``), ``GradMode``
  (``cuts_at``), ``MemoryState`` (the carried state), gradient clipping, ``init_state``;
- ``chunks``: what every executor shares: ``segments`` (where a chunk starts), the chunk loop
  ``run_segments``, ``segsum`` / ``masks``, ``per_token``, ``chunk_signals``;
- the executors, each ``run_*(problem, state) -> (y, state)``: ``sequential``, ``chunked``
  (``vmap(grad)`` + scan, any rule), ``dual`` (closed form of linear rules), ``dgd_dual`` (DGD's
  closed form), ``delta`` (+ ``chunk_scan``: the period-1 delta rule), ``fla_backend`` (fla's kernels);
- ``executors``: the table ``(supports, run, remat_ok, compilable)`` that ``run`` below, the spec
  checks and the compiled ops query; ``remat`` (recomputation) and ``stats`` (diagnostics) wrap a run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from nestlearn.loops import remat, stats
from nestlearn.loops.chunked import run_chunked
from nestlearn.loops.common import GradMode, MemoryProblem, MemoryState, init_state, with_rule_constants
from nestlearn.loops.dual import run_dual
from nestlearn.loops.executors import EXECUTORS, Executor, ExecutorRow, pick
from nestlearn.loops.sequential import run_sequential

__all__ = ["EXECUTORS", "Executor", "ExecutorRow", "GradMode", "MemoryProblem", "MemoryState", "init_state", "pick",
           "run", "run_sequential", "run_chunked", "run_dual"]


def run(pb: MemoryProblem, state: MemoryState, executor: Executor = "auto") -> tuple[Tensor, MemoryState]:
    """Run ``pb`` from ``state`` on the executor ``executors.pick`` chooses, recording
    diagnostics when collecting.

    Under autocast (bf16 / fp16 activations) the inner loop itself runs in fp32: fast weights,
    their optimiser state and the chunk algebra (products of many decays, triangular solves)
    drift or overflow in half precision. fla's kernels keep their own mixed precision."""
    hp = with_rule_constants(pb.rule, pb.hp)  # hyper-parameters missing from pb.hp: the rule's constants
    if len(hp) != len(pb.hp):
        pb = replace(pb, hp=hp)
    row = pick(pb, executor)

    def execute(p: MemoryProblem, s: MemoryState) -> tuple[Tensor, MemoryState]:
        if remat.applies(p):  # the level's remat: recompute per group of chunks in the backward
            if row.remat_ok:
                return remat.run_grouped(p, s, row.run)
            remat.warn_unsupported(p)
        return row.run(p, s)

    device = pb.q.device.type
    if torch.is_autocast_enabled(device) and row.name != "fla":
        with torch.autocast(device, enabled=False):
            y, new_state = execute(_fp32(pb), _fp32_tree(state))
    else:
        y, new_state = execute(pb, state)
    if stats.active():
        stats.record(pb, state, new_state)
    return y, new_state


def _fp32_tree(x: Any) -> Any:
    def up(t: Any) -> Any:
        return t.float() if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t

    return torch.utils._pytree.tree_map(up, x)


def _fp32(pb: MemoryProblem) -> MemoryProblem:
    return replace(pb, q=_fp32_tree(pb.q), k=_fp32_tree(pb.k), v=_fp32_tree(pb.v), hp=_fp32_tree(dict(pb.hp)))
