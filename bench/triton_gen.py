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
from nestlearn.loops.triton.gen_dgd import gen_dgd_fwd

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
    beta_h = op.level.rule.hypers["beta"]
    if not isinstance(beta_h, (int, float)):  # the op's learned beta would be a parameter, not this constant
        raise SystemExit(f"bench.triton_gen times a constant beta; models/hope.yaml has {beta_h!r}")
    beta: dict[str, torch.Tensor | float] = {"beta": float(beta_h)}
    beta_t = torch.full((a.batch, op.heads, a.seq), float(beta_h), device="cuda")
    bias = torch.stack([op.gen_bias["lr"], op.gen_bias["decay"]], -1).detach()
    gen_lr = op.gen_lr_max if op.gen_lr_max is not None else op.max_lr
    period = int(op.gen_period or op.level.period)

    def loop() -> tuple[torch.Tensor, ...]:
        """The op's chunk loop (the kernel's reference and the path of training)."""
        with torch.no_grad():
            return op._generate_loop(xh, st, beta, bias, gen_lr, period)[:4]

    def kernel() -> tuple[torch.Tensor, ...]:
        """The kernel itself, called directly: ``gen_triton`` keeps the loop inside a graph's
        capture, and this bench times the kernel there too."""
        out = gen_dgd_fwd(xh, st["params"]["W"], st["opt"]["m"]["W"], bias, beta_t, chunk=period,
                          lr_scale=gen_lr, decay_scale=op.max_decay, clip=op.level.spec.clip)
        return out.k, out.v, out.lr_raw, out.decay_raw

    ref = loop()
    rows: list[tuple[str, Callable[[], Any]]] = [
        ("chunk loop, eager", lambda: loop),
        ("chunk loop, CUDA graph", lambda: graphed(loop)),  # type: ignore[arg-type]
        ("Triton kernel", lambda: kernel),
        ("Triton kernel, CUDA graph", lambda: graphed(kernel)),  # type: ignore[arg-type]
    ]
    print(f"# HOPE's generators: batch {a.batch} x {a.seq} tokens, {op.heads} heads of {op.dh}, chunk {op.gen_period},"
          f" {torch.cuda.get_device_name()}")
    table("generators, no gradient", rows, ref, a.batch * a.seq, a.seq // period, a.warmup, a.reps)


if __name__ == "__main__":
    main()
