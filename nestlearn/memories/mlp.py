"""The deep MLP memory of Titans / HOPE, optionally in the residual form of Eq. 89:

    M(x) = x + W_L act(... act(W_1 x))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from nestlearn.memories.base import ACT_VJPS, ACTS, Layer, Lin, MemoryArch, Signals, plain_lin


class MLPMemory(MemoryArch):
    def __init__(
        self, d_in: int, d_out: int, heads: int, expand: float = 4.0, depth: int = 2,
        act: str = "gelu", residual: bool = True, bias: bool = False,
    ):
        if residual and d_in != d_out:
            raise ValueError("a residual MLP memory needs equal input and output widths")
        self.d_in, self.d_out, self.heads = d_in, d_out, heads
        self.hidden = max(1, int(round(d_in * expand)))
        self.depth, self.act, self.residual, self.bias = depth, act, residual, bias
        widths = [d_in] + [self.hidden] * (depth - 1) + [d_out]
        self.widths = widths
        self.layers = [Layer(f"W{i}", f"b{i}" if bias else None) for i in range(depth)]

    def init_params(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        p: dict[str, Tensor] = {}
        for i, (a, b) in enumerate(zip(self.widths[:-1], self.widths[1:])):
            p[f"W{i}"] = torch.randn(self.heads, b, a, dtype=dtype) / math.sqrt(a)
            if self.bias:
                p[f"b{i}"] = torch.zeros(self.heads, b, dtype=dtype)
        return p

    def apply(self, params: dict[str, Tensor], x: Tensor, lin: Lin = plain_lin) -> Tensor:
        h = x
        act = ACTS[self.act]
        for i, layer in enumerate(self.layers):
            h = lin(layer.weight, params[layer.weight], h, params.get(layer.bias or ""))
            if i < self.depth - 1:
                h = act(h)
        return x + h if self.residual else h

    def error_signals(self, params: dict[str, Tensor], x: Tensor,
                      dloss: Callable[[Tensor], Tensor]) -> Signals | None:
        act, act_vjp = ACTS[self.act], ACT_VJPS[self.act]
        inputs: dict[str, Tensor] = {}
        zs: list[Tensor] = []
        h = x
        for i, layer in enumerate(self.layers):
            inputs[layer.weight] = h
            z = plain_lin(layer.weight, params[layer.weight], h, params.get(layer.bias or ""))
            zs.append(z)
            h = act(z) if i < self.depth - 1 else z
        delta = dloss(x + h if self.residual else h)  # the residual passes dL/dpred to the last layer
        deltas: dict[str, Tensor] = {}
        for i in range(self.depth - 1, -1, -1):
            name = self.layers[i].weight
            deltas[name] = delta
            if i > 0:
                delta = act_vjp(delta @ params[name], zs[i - 1])
        return deltas, inputs
