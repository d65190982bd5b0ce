"""``python -m bench.opcount [--seq T] [--batch B] [--reps N]``: dispatched aten ops of the compiled
Titans memory vs the hand-written loop (``bench/handwritten.py``), forward and backward separately
(and with ``--reps``, the median wall time of a forward+backward of each).

On GPU this path is launch-bound, so the number of ops per chunk is a proxy for its speed.
Counts are per op name (``aten.mm.default``...) at a small size on CPU; views and other
metadata-only ops are counted too (they cost a dispatch, not a kernel).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import specs
from bench.handwritten import HandTitans
from nestlearn.compile import compile_spec


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count(forward: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]) -> tuple[Counter[str], Counter[str]]:
    """Ops of ``forward()`` and of its loss's backward (into fresh ``.grad``s, as a training step)."""
    for p in params:
        p.grad = None
    with Count() as f:
        loss = forward().float().square().mean()
    with Count() as b:
        loss.backward()
    return f.ops, b.ops


def timed(forward: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], reps: int) -> list[float]:
    """Seconds of each of ``reps`` forward+backwards (after one warm-up)."""
    times = []
    for _ in range(reps + 1):
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        forward().float().square().mean().backward()
        times.append(time.perf_counter() - t0)
    return times[1:]


def table(title: str, ours: Counter[str], hand: Counter[str], chunks: int) -> None:
    print(f"\n## {title}: {'compiled':>8} {'hand':>6} {'diff':>6}")
    for name in sorted(set(ours) | set(hand), key=lambda n: (-(ours[n] - hand[n]), n)):
        if ours[name] or hand[name]:
            print(f"{name:<44} {ours[name]:>8} {hand[name]:>6} {ours[name] - hand[name]:>+6}")
    o, h = sum(ours.values()), sum(hand.values())
    print(f"{'total':<44} {o:>8} {h:>6} {o - h:>+6}")
    print(f"{'per chunk':<44} {o / chunks:>8.1f} {h / chunks:>6.1f} {(o - h) / chunks:>+6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--reps", type=int, default=0, help="also time a forward+backward of each")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = compile_spec(specs.validate(specs.titans_memory(a.dim, a.heads, a.chunk)))
    hand = HandTitans(model)
    x = torch.randn(a.batch, a.seq, a.dim)
    chunks = -(-a.seq // a.chunk)
    for warm_up in (lambda: model(x)[0], lambda: hand(x)):  # lazily built masks, ...
        warm_up()
    params: list[torch.Tensor] = list(model.parameters())
    of, ob = count(lambda: model(x)[0], params)
    hf, hb = count(lambda: hand(x), params)
    with torch.no_grad():
        y, y_hand = model(x)[0], hand(x)
    finite = y.isfinite() & y_hand.isfinite()  # this spec's memory can diverge (to nan) at small sizes
    err = (y - y_hand)[finite].abs().max().item() if finite.any() else float("nan")
    print(f"titans_memory dim {a.dim} heads {a.heads} chunk {a.chunk}, {a.batch}x{a.seq} ({chunks} chunks); "
          f"max |compiled - hand| = {err:.2e} over the {finite.float().mean().item():.0%} finite outputs")
    table("forward", of, hf, chunks)
    table("backward", ob, hb, chunks)
    if a.reps:
        ours, theirs = (statistics.median(timed(f, params, a.reps)) for f in (lambda: model(x)[0], lambda: hand(x)))
        print(f"\nfwd+bwd median of {a.reps}: compiled {ours * 1e3:.1f} ms, hand {theirs * 1e3:.1f} ms, "
              f"ratio {ours / theirs:.3f}")


if __name__ == "__main__":
    main()
