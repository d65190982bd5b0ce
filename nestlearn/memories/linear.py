"""The matrix memory ``M(k) = W k`` (linear attention, DeltaNet, TTT-Linear's core)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from nestlearn.memories.base import Layer, Lin, MemoryArch, Signals, plain_lin


class LinearMemory(MemoryArch):
    def __init__(self, d_in: int, d_out: int, heads: int, bias: bool = False, init_std: float = 0.0):
        self.d_in, self.d_out, self.heads = d_in, d_out, heads
        self.bias = bias
        self.init_std = init_std
        self.layers = [Layer("W", "b" if bias else None)]

    def init_params(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        w = torch.randn(self.heads, self.d_out, self.d_in, dtype=dtype) * self.init_std
        p = {"W": w}
        if self.bias:
            p["b"] = torch.zeros(self.heads, self.d_out, dtype=dtype)
        return p

    def apply(self, params: dict[str, Tensor], x: Tensor, lin: Lin = plain_lin) -> Tensor:
        return lin("W", params["W"], x, params.get("b"))

    def error_signals(self, params: dict[str, Tensor], x: Tensor,
                      dloss: Callable[[Tensor], Tensor]) -> Signals | None:
        return {"W": dloss(self.apply(params, x))}, {"W": x}
