"""Recomputation over groups of chunks: activation memory that grows with the number of groups.

An inner loop's backward normally keeps every chunk's intermediates (error signals, masks,
per-chunk reads) alive from the forward. ``run_grouped`` cuts the sequence into groups of
``remat`` chunks and runs each group under ``torch.utils.checkpoint`` (non-reentrant): the
forward keeps only what crosses group boundaries -- the carried state (fast weights, optimiser
state) and each group's outputs -- and the backward re-runs one group's inner loop at a time.

Not for the ``vmap(grad)`` executor (rules without a closed form): torch.func does not support
the saved-tensor hooks checkpointing uses, so those levels run without recomputation (one
warning; the spec checks refuse ``remat`` where the spec's rule is known to take that path:
``executors.remat_available``).

Exact by construction: every executor is exact when a sequence is fed in pieces with its
carried state (``tests/test_executors.py`` and friends), and recomputation replays the same
ops. ``tests/test_remat.py`` checks outputs and gradients against the ungrouped run in float64
and that the tensors saved for the backward shrink.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from nestlearn.loops.common import MemoryProblem, MemoryState
from nestlearn.loops.delta import DEFAULT_CHUNK

RunFn = Callable[[MemoryProblem, MemoryState], tuple[Tensor, MemoryState]]


def group_tokens(pb: MemoryProblem) -> int:
    """Tokens per recomputed group: ``remat`` chunks of the level's period (or compute chunk)."""
    assert pb.remat is not None
    # period-1 levels without a chunk: count in the delta rule's base chunk (the executor's own
    # chunk may differ; a group only has to be a whole number of tokens)
    chunk = pb.period if pb.period > 1 else (pb.chunk or DEFAULT_CHUNK)
    return pb.remat * chunk


def applies(pb: MemoryProblem) -> bool:
    """Recompute only where a backward will follow and there is more than one group."""
    return pb.remat is not None and torch.is_grad_enabled() and pb.q.shape[2] > group_tokens(pb)


def warn_unsupported(pb: MemoryProblem) -> None:
    """The ``vmap(grad)`` executor (rules without a closed form: adam, muon, ...) cannot run
    under checkpointing: torch.func refuses the saved-tensor hooks it relies on."""
    key = (pb.level, type(pb.rule).__name__)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"level {pb.level or '?'}: remat is not applied to rule {pb.rule.describe()} "
                      "(its executor differentiates with torch.func, which checkpointing cannot wrap); "
                      "it runs without recomputation", stacklevel=3)


_warned: set[tuple[str, str]] = set()


def run_grouped(pb: MemoryProblem, state: MemoryState, execute: RunFn) -> tuple[Tensor, MemoryState]:
    """``execute`` over consecutive groups of ``group_tokens(pb)`` tokens, each checkpointed.

    A sequence starting mid-chunk (a carried ``offset``) gets a first group that is longer by the
    rest of that chunk, so later groups start on chunk boundaries (the executors are exact
    either way; this only keeps every group's chunks whole)."""
    n, t = group_tokens(pb), pb.q.shape[2]
    first = n + (-state["offset"]) % pb.period
    cuts = [0, *range(first, t, n), t] if first < t else [0, t]
    ys = []
    for t0, t1 in zip(cuts[:-1], cuts[1:]):
        part = pb.slice(t0, t1)
        # inner loops draw no random numbers: no RNG state to save (saving it would sync the
        # host with the GPU, which also breaks CUDA-graph capture)
        y, state = checkpoint(execute, part, state, use_reentrant=False, preserve_rng_state=False)
        ys.append(y)
    return torch.cat(ys, 2), state
