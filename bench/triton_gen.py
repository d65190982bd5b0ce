"""``python -m bench.triton_gen [--batch 8] [--seq 2048] [--reps 20]``: HOPE's generators over a
call (``models/hope.yaml``: 8 heads of 64, generator chunk 64), no gradient, on the fused kernel
(``nestlearn/loops/triton/gen_dgd.py``) against the op's chunk loop it replaces
(``SelfModOp._generate``), eagerly and replayed from a CUDA graph, same process. Median of
``--reps`` CUDA-event timings after warm-up; tokens/s counts ``batch x seq``; the last column is
the largest error against the eager loop (over k, v and both gates), relative to each one's
largest entry. The first kernel row includes nothing of its compile (warm-up runs it)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import nestlearn
from bench.triton_cms import table
from bench.triton_dgd import graphed
from nestlearn.compile.selfmod import SelfModOp
from nestlearn.loops import gen_triton

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = nestlearn.compile(ROOT / "models" / "hope.yaml", ["model.depth=1"]).cuda()
    op = next(m for m in model.modules() if isinstance(m, SelfModOp))
    xh = torch.randn(a.batch, op.heads, a.seq, op.dh, device="cuda")
    st = op._initial(a.batch, torch.float32)["gen"]
    beta = {"beta": float(op.level.rule.hypers["beta"])}

    def run(kernel: bool) -> Callable[[], tuple[torch.Tensor, ...]]:
        def fn() -> tuple[torch.Tensor, ...]:
            real = gen_triton.device_ok
            if not kernel:
                gen_triton.device_ok = lambda x: False  # type: ignore[assignment]
            try:
                with torch.no_grad():
                    return op._generate(xh, st, beta)[:4]
            finally:
                gen_triton.device_ok = real  # type: ignore[assignment]
        return fn

    ref = run(False)()
    rows: list[tuple[str, Callable[[], Any]]] = [
        ("chunk loop, eager", lambda: run(False)),
        ("chunk loop, CUDA graph", lambda: graphed_tuple(run(False))),
        ("Triton kernel", lambda: run(True)),
        ("Triton kernel, CUDA graph", lambda: graphed_tuple(run(True))),
    ]
    print(f"# HOPE's generators: batch {a.batch} x {a.seq} tokens, {op.heads} heads of {op.dh}, chunk {op.gen_period},"
          f" {torch.cuda.get_device_name()}")
    table("generators, no gradient", rows, ref, a.batch * a.seq, a.seq // int(op.gen_period or 64), a.warmup, a.reps)


def graphed_tuple(fn: Callable[[], tuple[torch.Tensor, ...]]) -> Callable[[], tuple[torch.Tensor, ...]]:
    """``graphed`` for a function returning a tuple."""
    return graphed(fn)  # type: ignore[arg-type,return-value]


if __name__ == "__main__":
    main()
