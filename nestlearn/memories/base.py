"""Parametric memories as pure functions of their (batched) parameters.

A memory is written once, as ``apply(params, x, lin)``, where every weight matrix is
applied through the hook ``lin(name, W, a, b)``. The plain hook multiplies; the chunked
executor swaps in hooks that record layer inputs and error signals, or that read the
in-chunk weights in their dual (attention-like) form, without a second implementation of
the memory. Parameters are ``[B, H, ...]``; inputs ``[B, H, N, d]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Lin = Callable[[str, Tensor, Tensor, "Tensor | None"], Tensor]


def plain_lin(name: str, w: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
    z = a @ w.transpose(-1, -2)  # [B,H,n,i] x [B,H,o,i] -> [B,H,n,o] (one batched matmul)
    return z if b is None else z + b.unsqueeze(-2)


ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "relu": torch.relu,
    "tanh": torch.tanh,
}


@dataclass
class Layer:
    weight: str
    bias: str | None


class MemoryArch:
    """Base: subclasses set ``layers`` and implement ``init_params`` / ``apply``."""

    d_in: int
    d_out: int
    heads: int
    layers: list[Layer]

    def init_params(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        raise NotImplementedError

    def apply(self, params: dict[str, Tensor], x: Tensor, lin: Lin = plain_lin) -> Tensor:
        raise NotImplementedError

    def state_numel(self) -> int:
        return sum(p.numel() for p in self.init_params().values())
