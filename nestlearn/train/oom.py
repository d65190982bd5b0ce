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

from nestlearn.units import bytes_text

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


def message(device: str, step: int, batch: int, seq_len: int, accum: int, model: Any) -> str:
    """The one-line message of a run of ``model`` (a ``CompiledModel``) that ran out of memory at
    ``step``: the batch flags, then the levels to recompute and how much fast state the first of
    them keeps at this micro-batch's size (``level_summary``'s ``kept_per_token``)."""
    text = (f"out of {device} memory at step {step} (batch {batch} x {seq_len} bytes in {accum} micro-batch(es)); "
            "lower --batch or --seq-len, or raise --accum")
    names = remat_candidates(model.levels)
    if names:
        sets = " ".join(f"levels.{n}.remat={REMAT}" for n in names[:3])
        text += (f"; or let in-context levels recompute their chunks in the backward instead of keeping every "
                 f"chunk's fast weights (what a long sequence fills memory with): add {sets} "
                 "(docs/execution.md, Recomputation)")
        per_token = next(r["kept_per_token"] for r in model.level_summary() if r["name"] == names[0])
        if per_token:
            tokens = -(-batch // max(accum, 1)) * seq_len
            text += (f"; {names[0]} alone keeps at least {bytes_text(per_token * tokens)} of fast state "
                     f"per micro-batch of {tokens} tokens")
    return text
