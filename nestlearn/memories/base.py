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


ACT_VJPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    # (dL/d act(z), z) -> dL/dz: autograd's own backward kernels where they are differentiable
    # again (the outer loss differentiates through them): one fused kernel each
    "silu": lambda g, z: g * torch.sigmoid(z) * (1.0 + z * (1.0 - torch.sigmoid(z))),  # silu_backward has no derivative
    "gelu": lambda g, z: torch.ops.aten.gelu_backward(g, z),
    "relu": lambda g, z: torch.ops.aten.threshold_backward(g, z, 0),
    "tanh": lambda g, z: torch.ops.aten.tanh_backward(g, torch.tanh(z)),
}
"""Each activation's vector-Jacobian product, for memories that backpropagate by hand."""

Signals = tuple[dict[str, Tensor], dict[str, Tensor]]
"""``(deltas, inputs)``: per weight name, ``dL/dz`` of the layer's output and the layer's input."""


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

    def error_signals(self, params: dict[str, Tensor], x: Tensor,
                      dloss: Callable[[Tensor], Tensor]) -> Signals | None:
        """Every layer's error signal and input for the loss whose gradient at the prediction
        is ``dloss(pred)``, by an explicit backward pass (no ``torch.autograd.grad``: such a pass
        composes with checkpointing and compilers); ``None`` where a memory has none, and the
        executors differentiate ``apply`` instead."""
        return None
