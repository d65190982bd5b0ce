"""TTT's inner model (Sun et al. 2024, "Learning to (Learn at Test Time)"), layer-norm residual form:

    f(x) = x + LN(f_res(x))     f_res(x) = W x + b                      (TTT-Linear)
                                f_res(x) = W_1 gelu(W_0 x + b_0) + b_1   (TTT-MLP)

The fast weights (the state the inner loop trains) are the ``W`` and ``b`` of ``f_res``; every
weight is applied through the ``lin`` hook, so the closed-form chunked executor reads this
memory in its dual form like any other. The layer norm's scale and shift are *outer*
parameters (per head), as in TTT: this arch is also an ``nn.Module``, so the op that owns it
registers them, moves them with ``.to()`` and trains them with the rest of the model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nestlearn.memories.base import ACTS, Layer, Lin, MemoryArch, plain_lin


class TTTMemory(nn.Module, MemoryArch):
    def __init__(
        self, d_in: int, d_out: int, heads: int, core: str = "linear", expand: float = 4.0,
        act: str = "gelu", bias: bool = True, eps: float = 1e-6, init_std: float | None = None,
        key_rms: float = 1.0,
    ):
        nn.Module.__init__(self)
        if d_in != d_out:
            raise ValueError("a TTT memory is residual: it needs equal input and output widths")
        if core not in ("linear", "mlp"):
            raise ValueError(f"unknown TTT core {core!r}: use 'linear' or 'mlp'")
        self.d_in, self.d_out, self.heads = d_in, d_out, heads
        self.core, self.act, self.bias, self.eps, self.init_std = core, act, bias, eps, init_std
        self.key_rms = key_rms
        """RMS of the keys this memory reads (1/sqrt(d) for L2-normalised keys): sets the fan-in
        init when ``init_std`` is None."""
        self.hidden = max(1, int(round(d_in * expand))) if core == "mlp" else d_out
        self.widths = [d_in, self.hidden, d_out] if core == "mlp" else [d_in, d_out]
        n = len(self.widths) - 1
        self.layers = [Layer(f"W{i}", f"b{i}" if bias else None) for i in range(n)]
        self.ln_weight = nn.Parameter(torch.ones(heads, d_out))
        self.ln_bias = nn.Parameter(torch.zeros(heads, d_out))

    def init_params(self, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        p: dict[str, Tensor] = {}
        for i, (a, b) in enumerate(zip(self.widths[:-1], self.widths[1:])):
            p[f"W{i}"] = torch.randn(self.heads, b, a, dtype=dtype) * self.layer_std(i)
            if self.bias:
                p[f"b{i}"] = torch.zeros(self.heads, b, dtype=dtype)
        return p

    def layer_std(self, i: int) -> float:
        """Layer ``i``'s initial std: ``init_std``, or fan-in scaled to its input's RMS (the keys'
        for the first layer, about 1 after it), so the pre-norm activations start with a spread
        of order 1 and the layer norm does not magnify the inner gradients."""
        if self.init_std is not None:
            return self.init_std
        fan_in = self.widths[i]
        return 1.0 / (math.sqrt(fan_in) * (self.key_rms if i == 0 else 1.0))

    def apply(self, params: dict[str, Tensor], x: Tensor, lin: Lin = plain_lin) -> Tensor:  # type: ignore[override]
        h = x
        for i, layer in enumerate(self.layers):
            h = lin(layer.weight, params[layer.weight], h, params.get(layer.bias or ""))
            if i < len(self.layers) - 1:
                h = ACTS[self.act](h)
        mu = h.mean(-1, keepdim=True)
        var = (h - mu).pow(2).mean(-1, keepdim=True)
        hn = (h - mu) * torch.rsqrt(var + self.eps)
        # x: [B, H, N, d]; the per-head scale and shift broadcast as [H, 1, d]
        return x + hn * self.ln_weight.unsqueeze(-2) + self.ln_bias.unsqueeze(-2)
