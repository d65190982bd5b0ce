"""The executor table: which inner-loop executor runs a memory problem, and what it allows.

Each row is ``(supports, run, remat_ok, compilable)`` with the level ``executor:`` values it
serves and the rule-level condition ``takes`` (what spec-time checks can know before any
tensor exists). ``pick`` takes the first row, in table order, that serves the requested
executor and supports the problem: the fastest exact path first, ``vmap(grad)`` + scan last.
``graph`` (spec checks), ``remat`` and ``run`` below query the table; a new fast path (e.g. a
fused kernel) is one row here, placed before the rows it should win over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from nestlearn.loops import cms_triton, dgd_dual, dgd_triton, fla_backend
from nestlearn.loops.chunked import run_chunked
from nestlearn.loops.common import MemoryProblem, MemoryState
from nestlearn.loops.delta import run_delta
from nestlearn.loops.delta import supports as delta_supports
from nestlearn.loops.dgd_dual import run_dgd_dual
from nestlearn.loops.dual import run_dual
from nestlearn.loops.sequential import run_sequential
from nestlearn.rules.base import Rule

Executor = Literal["auto", "sequential", "chunked", "scan"]
RunFn = Callable[[MemoryProblem, MemoryState], tuple[Tensor, MemoryState]]


@dataclass(frozen=True)
class ExecutorRow:
    name: str
    serves: tuple[str, ...]
    """The level ``executor:`` values this row may answer."""
    supports: Callable[[MemoryProblem], bool]
    """Exactly the problems this row computes."""
    run: RunFn
    remat_ok: bool
    """``remat`` can wrap it (no torch.func inside: checkpointing's saved-tensor hooks work)."""
    compilable: bool
    """Its chunk step goes through torch.compile where the problem asks for it
    (``MemoryProblem.compiled``, via ``chunks.chunk_step``)."""
    takes: Callable[[Rule], bool]
    """The rule-level part of ``supports`` (a necessary condition, known at spec time)."""


def _delta_rule(rule: Rule) -> bool:
    from nestlearn.rules.momentum import Momentum

    return type(rule) is Momentum and "beta" not in rule.hypers and rule.decay_to == "zero"


def _dgd(rule: Rule) -> bool:
    from nestlearn.rules.dgd import DGD

    return isinstance(rule, DGD)


EXECUTORS: tuple[ExecutorRow, ...] = (
    ExecutorRow("fla", ("auto",), lambda pb: fla_backend.available(pb) and fla_backend.supports(pb),
                lambda pb, s: fla_backend.run_fla(pb, s, pb.chunk), remat_ok=True, compilable=False, takes=_delta_rule),
    ExecutorRow("delta", ("auto",), delta_supports, lambda pb, s: run_delta(pb, s, pb.chunk),
                remat_ok=True, compilable=False, takes=_delta_rule),
    # HOPE's self-modifying memory on the fused Triton kernel: CUDA; training with grad: unroll
    ExecutorRow("dgd_triton", ("auto", "chunked"), lambda pb: dgd_triton.supports(pb),
                lambda pb, s: dgd_triton.run_dgd_triton(pb, s),
                remat_ok=True, compilable=False, takes=_dgd),
    ExecutorRow("dgd_dual", ("auto", "chunked"), dgd_dual.supports, run_dgd_dual,
                remat_ok=True, compilable=True, takes=_dgd),
    # HOPE's CMS levels (mlp memory, sgd) on the Triton chunk step: CUDA; training with grad: unroll
    ExecutorRow("cms_triton", ("auto", "chunked"), lambda pb: cms_triton.supports(pb),
                lambda pb, s: cms_triton.run_cms_triton(pb, s),
                remat_ok=True, compilable=False, takes=_delta_rule),
    ExecutorRow("dual", ("auto", "chunked"), lambda pb: pb.rule.linear, run_dual,
                remat_ok=True, compilable=True, takes=lambda rule: rule.linear),
    ExecutorRow("chunked", ("auto", "chunked", "scan"), lambda pb: True, run_chunked,
                remat_ok=False, compilable=False, takes=lambda rule: True),
    ExecutorRow("sequential", ("sequential",), lambda pb: True, run_sequential,
                remat_ok=True, compilable=False, takes=lambda rule: True),
)


def pick(pb: MemoryProblem, executor: Executor = "auto") -> ExecutorRow:
    """The first row serving ``executor`` that supports ``pb`` (the last rows support everything)."""
    return next(row for row in EXECUTORS if executor in row.serves and row.supports(pb))


def remat_available(rule: Rule, executor: Executor = "auto") -> bool:
    """Whether a level with ``rule`` may take an executor that ``remat`` can wrap."""
    return any(row.remat_ok and executor in row.serves and row.takes(rule) for row in EXECUTORS)
