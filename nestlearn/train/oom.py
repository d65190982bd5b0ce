"""What to change when a training step runs out of device memory.

Besides the batch and sequence length, a model with in-context levels keeps, for the backward,
every chunk's fast weights of each level (the carried state at every chunk start): HOPE's fast
CMS level alone keeps 4 MB of fp32 weights per 16 tokens of each sequence at its shipped size,
64 GB at 65,536 tokens (docs/benchmarks.md). ``remat: N`` on such a level keeps one state per N
chunks and recomputes the rest in the backward (docs/execution.md, Recomputation), which the
batch flags cannot do for one long sequence.
"""

from __future__ import annotations

from typing import Any

REMAT = 8
"""The group size suggested (HOPE's `remat` example: an eighth of the saved weights)."""


def remat_candidates(levels: dict[str, Any]) -> list[str]:
    """In-context levels that keep every chunk's state (no ``remat`` yet) and whose executor
    ``remat`` can wrap, shortest period first: with equal memories, the shortest period keeps
    the most per token."""
    from nestlearn.loops.executors import remat_available

    found = [(int(lv.period), name) for name, lv in levels.items()
             if not lv.is_outer and lv.spec.remat is None and remat_available(lv.rule, lv.executor)]
    return [name for _, name in sorted(found)]


def message(device: str, step: int, batch: int, seq_len: int, accum: int, levels: dict[str, Any],
            kept: dict[str, float | None] | None = None) -> str:
    """The one-line message of a run that ran out of memory at ``step``; ``kept``: the bytes of
    fast state each level keeps per token (``CompiledModel.level_summary``'s ``kept_per_token``),
    said for the first level named at this micro-batch's size."""
    text = (f"out of {device} memory at step {step} (batch {batch} x {seq_len} bytes in {accum} micro-batch(es)); "
            "lower --batch or --seq-len, or raise --accum")
    names = remat_candidates(levels)
    if names:
        sets = " ".join(f"levels.{n}.remat={REMAT}" for n in names[:3])
        text += (f"; or let in-context levels recompute their chunks in the backward instead of keeping every "
                 f"chunk's fast weights (what a long sequence fills memory with): add {sets} "
                 "(docs/execution.md, Recomputation)")
        per_token = (kept or {}).get(names[0])
        if per_token:
            tokens = -(-batch // max(accum, 1)) * seq_len
            size = per_token * tokens
            said = f"{size / 2**30:.1f} GB" if size >= 2**30 else f"{size / 2**20:.1f} MB"
            text += f"; {names[0]} alone keeps at least {said} of fast state per micro-batch of {tokens} tokens"
    return text
