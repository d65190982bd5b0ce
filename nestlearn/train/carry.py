"""Evaluation from the carried state (``--carry-state``).

A run that carries state ends every training batch holding one state per micro-batch: every
in-context level's fast weights, rule state and chunk position, and the attention caches and
convolution tails, each tensor with that micro-batch's rows first. Evaluation starts its
held-out rows from that state without changing it:

* **Micro-batches** (``--accum``): their states are joined along the row axis in the order
  ``Batch.split`` gave them their rows, so carried row ``r`` is the state of the batch's row
  ``r``. A row's carry depends only on its own tokens and the weights, so this is the state a
  run without accumulation holds: ``--accum`` stays a memory knob and does not change what is
  measured (taking one micro-batch's state would drop the others' streams and make it do so).
* **Rows**: held-out row ``i`` starts from carried row ``i mod B``. The rows of a training batch
  are independent draws, so the ``B`` carried states are exchangeable samples of "the state the
  stream left": any fixed assignment is unbiased, and ``i mod B`` uses each as evenly as the
  counts allow (with the default evaluation batch, the training batch's ``B`` rows, each exactly
  once) at no extra cost. States are never averaged: a mean of fast weights, of their rule
  states or of attention caches is no state any stream reached, and the memories are nonlinear.
* **No mutation**: every held-out batch starts from a copy of the same carried state (held-out
  data never advances it), so the training stream goes on as if nothing had been evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from nestlearn.train.errors import TrainError

EvalState = Literal["carried", "initial"]
"""Where evaluation started every held-out row: the state the training stream carried at that
moment, or the model's initial (meta-learned) state. Recorded as ``eval_state``."""


def has_state(carry: Sequence[Any] | None) -> bool:
    """Is there a carried state to start from (a carrying run after its first step, whose model
    carries something: a Transformer without a window carries no tensor at all)?"""
    if not carry or any(s is None for s in carry):
        return False
    return any(isinstance(leaf, Tensor) for s in carry for leaf in tree_flatten(s)[0])


def eval_state_of(carry: Sequence[Any] | None) -> EvalState:
    return "carried" if has_state(carry) else "initial"


def joined(carry: Sequence[Any] | None) -> Any | None:
    """The whole batch's carried state: the micro-batches' states joined along the row axis
    (one micro-batch: its state itself), or None where nothing is carried yet."""
    if carry is None or not has_state(carry):
        return None
    if len(carry) == 1:
        return carry[0]
    flat = [tree_flatten(s) for s in carry]
    structure = flat[0][1]
    if any(f[1] != structure for f in flat[1:]):
        raise TrainError("the carried state's micro-batches do not have the same structure")
    leaves = [_join([f[0][i] for f in flat]) for i in range(len(flat[0][0]))]
    return tree_unflatten(leaves, structure)


def _has_rows(leaf: Any) -> bool:
    """A tensor with rows first; a 0-d tensor (e.g. Adam's step count) is shared by all rows."""
    return isinstance(leaf, Tensor) and leaf.dim() > 0


def _join(parts: list[Any]) -> Any:
    """One leaf of the joined state: tensors stacked by rows; anything else (a chunk position, a
    step count) is the same in every micro-batch, as they all see the same sequence length."""
    if _has_rows(parts[0]):
        return torch.cat(parts)
    same = (lambda a, b: torch.equal(a, b)) if isinstance(parts[0], Tensor) else (lambda a, b: a == b)
    if not all(same(p, parts[0]) for p in parts[1:]):
        raise TrainError(f"the carried state's micro-batches disagree on a position ({parts})")
    return parts[0]


def carried_rows(state: Any) -> int | None:
    """The number of rows ``B`` of a carried state (None where no tensor has rows)."""
    leaves, _ = tree_flatten(state)
    rows = {int(t.shape[0]) for t in leaves if _has_rows(t)}
    if len(rows) > 1:
        raise TrainError(f"the carried state's tensors do not share a row count (first dimensions {sorted(rows)})")
    return rows.pop() if rows else None


def start_state(state: Any, n: int) -> Any:
    """The start state of ``n`` held-out rows: row ``i`` from carried row ``i mod B``, copied."""
    b = carried_rows(state)
    if b is None:
        return state
    index = torch.arange(n) % b

    def take(leaf: Any) -> Any:
        if _has_rows(leaf):
            return leaf.index_select(0, index.to(leaf.device))
        return leaf.clone() if isinstance(leaf, Tensor) else leaf

    return tree_map(take, state)


def evaluation_fn(model: nn.Module, state: Any | None,
                  context: Callable[[], AbstractContextManager[Any]] = nullcontext) -> Callable[[Tensor], Tensor]:
    """``inputs [n, T] -> float logits [n, T, V]`` of ``model`` (under ``context``, e.g.
    autocast), every row started from ``state`` (``start_state``), or from the model's initial
    state where ``state`` is None."""

    def fn(x: Tensor) -> Tensor:
        start = None if state is None else start_state(state, int(x.shape[0]))
        with context():
            return model(x, start)[0].float()  # type: ignore[no-any-return]

    return fn


__all__ = ["EvalState", "has_state", "eval_state_of", "joined", "carried_rows", "start_state", "evaluation_fn"]
