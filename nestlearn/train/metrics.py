"""Metrics: JSON lines in the run directory, and where a divergence began.

Each line of ``metrics.jsonl`` is one record with a ``split``: ``train`` (``loss``, ``bits_per_byte``
or ``accuracy``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``tokens``, ``time`` and, per in-context
level, ``levels.<name>.inner_loss`` and ``levels.<name>.update_norm``), ``val`` (validation
metrics) or ``phase`` (every domain of a continual run after a phase).

The per-level values come from :mod:`nestlearn.loops.stats`, recorded by the inner loops during
the training forward of a log step: ``inner_loss`` is the level's inner objective at the state
each memory started the call from (its meta-learned initial state, or the carried state with
``--carry-state``), ``update_norm`` the size ``‖W_end − W_start‖`` of the update the call made,
per sequence and head; both are averaged over the level's memories, blocks and micro-batches.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nestlearn.files import atomic_write

TIMING_KEYS = ("tokens_per_s", "time")


DEAD_STEPS = 20
"""Consecutive steps with a zero outer gradient after which a run is called dead."""
ZERO_GRAD = 1e-10
"""An outer gradient norm at or below this is zero: no real model trains with gradients this small
(a saturated or detached output gives exactly 0)."""


class DeadRunWatch:
    """Notices a run that stopped learning without diverging: the outer gradient norm at zero for
    ``DEAD_STEPS`` steps in a row (a saturated softmax or gate, a detached output). Nothing moves
    the weights any more but the weight decay, so every further step is wasted; the trainer says
    so once and the summary keeps ``dead_since``. A finite loss never raises: the run goes on, as
    a run the user asked for, and the warning names what to change."""

    def __init__(self, steps: int = DEAD_STEPS) -> None:
        self.steps = steps
        self.streak_start: int | None = None
        self.since: int | None = None  # first step of the streak that was reported

    def update(self, step: int, grad_norm: float, loss: float) -> str | None:
        """Feed one step's record; the warning the first time a streak reaches ``steps``."""
        if not (math.isfinite(grad_norm) and grad_norm <= ZERO_GRAD):
            self.streak_start = None
            return None
        if self.streak_start is None:
            self.streak_start = step
        if self.since is not None or step - self.streak_start + 1 < self.steps:
            return None
        self.since = self.streak_start
        return (f"step {step}: the outer gradient norm has been 0 for {self.steps} steps (since step "
                f"{self.since}; loss {loss:.4f}): the run is dead, nothing but weight decay moves the "
                "weights. Its output saturated or was detached; stop it (Ctrl-C saves) and retry with a "
                "lower learning rate or a smaller in-context rate (docs/training-health.md)")


class MetricsLog:
    """Append-only JSON lines (written by rank 0 only; ``enabled=False`` elsewhere)."""

    def __init__(self, path: str | Path, enabled: bool = True, loggers: list[Any] | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.loggers = list(loggers or [])
        """Also given every record: ``train/loggers.py`` (TensorBoard, Weights & Biases)."""

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(record)) + "\n")
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a run resumes from), so a
        resumed run's log equals an uninterrupted one's."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r["step"] <= step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``: a line that is not a JSON object with a whole-number
    ``step`` (a torn last line from a crash mid-write, bytes damaged on disk) is skipped."""
    out = []
    for raw in Path(path).read_bytes().splitlines():
        try:
            rec = json.loads(raw.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError included
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool):
            out.append(rec)
    return out


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


# ----------------------------------------------------------------------------- state diagnostics


def _ops(model: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    for i, block in enumerate(getattr(model, "blocks", [])):
        for node_id, op in block.ops.items():
            yield str(i), node_id, op


def first_nonfinite(model: nn.Module, state: dict[str, Any]) -> tuple[str, str, str | None] | None:
    """The first node, in the order the forward computed them, whose carried state holds a
    non-finite value: ``(block, node id, level name or None)``."""
    for blk, node_id, op in _ops(model):
        node_state = state.get(blk, {}).get(node_id) if isinstance(state, dict) else None
        if node_state is None:
            continue
        leaves = [t for t in torch.utils._pytree.tree_leaves(node_state) if isinstance(t, Tensor)]
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in leaves):
            level = getattr(op, "level", None)
            return blk, node_id, (level.name if level is not None else None)
    return None


def _nonfinite(tree: Any) -> bool:
    return any(isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
               for t in torch.utils._pytree.tree_leaves(tree))


@torch.no_grad()
def trace_nonfinite(model: nn.Module, inputs: list[Tensor]) -> tuple[str, str, str | None] | None:
    """Re-run ``model`` on ``inputs`` watching every op of every block: the first one (in the order
    the forward ran them) whose output or new state is non-finite is where the divergence began.
    Returns ``(block, node id, level name or None)``; None if every op stayed finite."""
    hit: list[tuple[str, str, str | None]] = []
    hooks = []
    for blk, node_id, op in _ops(model):
        def hook(mod: nn.Module, args: Any, output: Any, blk: str = blk, node_id: str = node_id) -> None:
            if not hit and _nonfinite(output):
                level = getattr(mod, "level", None)
                hit.append((blk, node_id, level.name if level is not None else None))

        hooks.append(op.register_forward_hook(hook))
    try:
        for x in inputs:
            model(x)
            if hit:
                break
    finally:
        for h in hooks:
            h.remove()
    return hit[0] if hit else None
