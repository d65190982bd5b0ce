"""``python -m bench.opcount_hope [--seq T] [--batch B] [--dim D] [--depth N] [--heads H] [--reps N]``:
dispatched aten ops of one forward and one backward of HOPE (``models/hope.yaml``) at a small
size on CPU, in total, per op name (top 25) and per main-memory chunk (the selfmod level's
period), and with ``--reps`` the median wall time of a forward+backward.

On GPU HOPE is launch-bound (tiny matmuls per chunk step), so the number of dispatched ops
per chunk is a proxy for its speed. Views and other metadata-only ops are counted too (they
cost a dispatch, not a kernel). ``--only-selfmod`` counts the selfmod op alone (on the
normed input of the first block), without the CMS chain, embedding and head.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

import nestlearn
from bench.opcount import count, timed

SPEC = Path(__file__).resolve().parent.parent / "models" / "hope.yaml"


def table(title: str, ops: Counter[str], chunks: int, top: int) -> None:
    total = sum(ops.values())
    print(f"\n## {title}: {total} ops, {total / chunks:.1f} per main-memory chunk ({chunks} chunks)")
    for name, n in ops.most_common(top):
        print(f"{name:<48} {n:>7} {n / chunks:>8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--reps", type=int, default=0, help="also time a forward+backward (median)")
    ap.add_argument("--only-selfmod", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], help="more spec overrides (key=value)")
    a = ap.parse_args()
    torch.manual_seed(0)
    overrides = [f"model.dim={a.dim}", f"model.depth={a.depth}", f"model.heads={a.heads}", *a.set]
    model = nestlearn.compile(SPEC, overrides)
    spec = model.spec
    period = int(spec.levels["selfmod"].period)
    vocab = spec.model.vocab
    x = torch.randint(0, vocab, (a.batch, a.seq))
    forward: Callable[[], torch.Tensor] = lambda: model(x)[0]  # noqa: E731
    if a.only_selfmod:
        from nestlearn.compile.selfmod import SelfModOp

        op = next(m for m in model.modules() if isinstance(m, SelfModOp))
        h = torch.randn(a.batch, a.seq, a.dim)
        forward = lambda: op([h], {}, None)[0]  # noqa: E731
        params = list(op.parameters())
    else:
        params = list(model.parameters())
    forward()  # warm-up: lazily built masks, ...
    chunks = -(-a.seq // period) * (1 if a.only_selfmod else a.depth)
    f, b = count(forward, params)
    what = "selfmod op" if a.only_selfmod else "model"
    print(f"hope {what}: dim {a.dim} depth {a.depth} heads {a.heads}, {a.batch}x{a.seq}, main chunk {period}; "
          f"per-chunk = total / {chunks} (main-memory chunks over all blocks)")
    table("forward", f, chunks, a.top)
    table("backward", b, chunks, a.top)
    ft, bt = sum(f.values()), sum(b.values())
    print(f"\ntotal fwd {ft} bwd {bt}; per chunk fwd {ft / chunks:.1f} bwd {bt / chunks:.1f}")
    if a.reps:
        ts = timed(forward, params, a.reps)
        print(f"fwd+bwd median of {a.reps}: {statistics.median(ts) * 1e3:.1f} ms "
              f"({', '.join(f'{t * 1e3:.0f}' for t in ts)})")


if __name__ == "__main__":
    main()
