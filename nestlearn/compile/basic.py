"""Stateless and short-memory ops of a block: norms, projections, convolution, arithmetic, FFN.

Every op has the same call shape: ``op(inputs, sources, state) -> (output, new_state)``;
``sources`` holds other nodes' outputs used as generate edges, ``state`` what the op
carries across calls (only the convolution and the memories carry anything).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.memories.base import ACTS

OpState = Any


class Op(nn.Module):
    sources: tuple[str, ...] = ()

    @property
    def carries_across_batches(self) -> bool:
        """Does this op's state go on from one training batch to the next under
        ``--carry-state``? (An op whose carried state would grow without bound says no.)"""
        return True

    def forward(self, xs: list[Tensor], src: dict[str, Tensor], state: OpState) -> tuple[Tensor, OpState]:
        raise NotImplementedError


class RMSNorm(Op):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, xs, src, state):
        x = xs[0]
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight, None


class LayerNorm(Op):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, xs, src, state):
        return self.norm(xs[0]), None


class L2Norm(Op):
    def forward(self, xs, src, state):
        return F.normalize(xs[0], dim=-1), None


class Linear(Op):
    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, xs, src, state):
        return self.proj(xs[0]), None


class CausalConv(nn.Module):
    """Depth-wise causal convolution over time; carries its last ``width - 1`` inputs."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.zeros(dim, 1, width))
        with torch.no_grad():  # start as the identity so a fresh model is well-behaved
            self.weight[:, 0, -1] = 1.0
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor]:
        b, t, d = x.shape
        if tail is None:
            tail = x.new_zeros(b, self.width - 1, d)
        full = torch.cat([tail, x], dim=1)  # [B, W-1+T, D]
        y = F.conv1d(full.transpose(1, 2), self.weight, self.bias, groups=d).transpose(1, 2)
        return y, full[:, full.shape[1] - (self.width - 1) :]


class Conv(Op):
    def __init__(self, dim: int, width: int):
        super().__init__()
        self.conv = CausalConv(dim, width)

    def forward(self, xs, src, state):
        return self.conv(xs[0], state)


class Add(Op):
    def forward(self, xs, src, state):
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out, None


class Mul(Op):
    def forward(self, xs, src, state):
        out = xs[0]
        for x in xs[1:]:
            out = out * x
        return out, None


class Act(Op):
    def __init__(self, fn: str):
        super().__init__()
        self.fn = fn

    def forward(self, xs, src, state):
        x = xs[0]
        if self.fn == "identity":
            return x, None
        if self.fn == "sigmoid":
            return torch.sigmoid(x), None
        return ACTS[self.fn](x), None


class FeedForward(Op):
    """The outer-level MLP: a Transformer's FFN (CMS with one level)."""

    def __init__(self, dim: int, expand: float, act: str):
        super().__init__()
        hidden = max(1, int(round(dim * expand)))
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.act = ACTS[act]

    def forward(self, xs, src, state):
        return self.down(self.act(self.up(xs[0]))), None
