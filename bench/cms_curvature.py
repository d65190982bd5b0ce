"""``python -m bench.cms_curvature [SPEC] [--node c1] [--scales 1 1.5 2 2.5 3]``: the chunk gain of
an in-context ``mlp`` node's inner step (docs/training-health.md, sections 1 and 7) at the
spec's initial weights, and with the first layer's initial weights ``W0`` scaled, as outer
training can grow them.

For the ``l2`` objective a chunk of ``S`` tokens pushing the same way multiplies the memory's error
by ``1 - 2 lr S c``, ``c`` the curvature along the step. Second layer (``W1``, input
``h = gelu(W0 k)``): ``c = |h|^2``; first layer (``W0``, input ``k``): ``c = |k|^2 ||W1 diag(gelu'(z))||^2``
(spectral norm). The gain ``lr S c`` must stay below 1. Keys are random with RMS 1 (what
``kv_norm`` gives), ``lr`` the level's maximum, ``S`` its period (SGD: no momentum).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import nestlearn
from nestlearn.compile.memory_op import MemoryOp
from nestlearn.compile.model import Block

SPEC = Path(__file__).resolve().parent.parent / "models" / "hope.yaml"


def gains(w0: torch.Tensor, w1: torch.Tensor, lr: float, period: int, tokens: int = 4096,
          probe: int = 16) -> tuple[float, float, float]:
    """``(mean, largest)`` second-layer gain over ``tokens`` random RMS-1 keys, and the largest
    first-layer gain over the first ``probe`` of them."""
    g = torch.Generator().manual_seed(1)
    k = F.rms_norm(torch.randn(tokens, w0.shape[-1], generator=g, dtype=w0.dtype), (w0.shape[-1],))
    z = k @ w0.T
    h = F.gelu(z)
    second = lr * period * (h * h).sum(-1)
    slope = torch.func.vmap(torch.func.grad(lambda x: F.gelu(x).sum()))(z[:probe])  # gelu'(z) per token
    first = torch.stack([torch.linalg.matrix_norm(w1 * s[None, :], ord=2) ** 2 for s in slope])
    first = lr * period * w0.shape[-1] * first
    return float(second.mean()), float(second.max()), float(first.max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cms_curvature", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", nargs="?", default=str(SPEC))
    p.add_argument("--node", default="c1", help="the mlp node of the first block (default c1, HOPE's cms_fast)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 2.5, 3.0])
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = nestlearn.compile(a.spec)
    block = model.blocks[0]
    assert isinstance(block, Block)
    op = block.ops[a.node] if a.node in block.ops else None
    if not isinstance(op, MemoryOp) or set(op.init) != {"W0", "W1"}:
        print(f"error: {a.spec}: block 0 has no in-context mlp node {a.node!r}", file=sys.stderr)
        return 2
    init = op.init
    level: Any = op.level
    lr = level.spec.rule.lr.max if hasattr(level.spec.rule.lr, "max") else float(level.spec.rule.lr)
    period = int(level.period)
    w0 = init["W0"].detach()[0].double()
    w1 = init["W1"].detach()[0].double()
    print(f"# {model.spec.name} node {a.node} (level {level.name}): {w0.shape[1]} -> {w0.shape[0]} -> {w1.shape[0]}, "
          f"lr {lr:g}, period {period}; gain lr * period * curvature (stable below 1)")
    print(f"{'W0 x':>5} {'row norm':>9} {'2nd layer mean':>15} {'2nd layer max':>14} {'1st layer max':>14}")
    for scale in a.scales:
        mean, top, first = gains(scale * w0, w1, lr, period)
        print(f"{scale:>5g} {float((scale * w0).norm(dim=-1).mean()):>9.3f} {mean:>15.3f} {top:>14.3f} {first:>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
