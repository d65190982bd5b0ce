"""Softmax attention: the non-parametric memory. It has no fast weights to learn; its
"state" is the context it reads (a KV cache, bounded by the window), carried across calls."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.compile.basic import Op


def rope(x: Tensor, pos: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding on ``x [B, H, T, d]`` at absolute positions ``pos [T]``."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=x.dtype) / d)
    ang = pos.to(x.dtype)[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2)


class Attention(Op):
    def __init__(self, dim: int, heads: int, window: int | None, persistent: int, use_rope: bool):
        super().__init__()
        self.heads, self.dh = heads, dim // heads
        self.window, self.use_rope = window, use_rope
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.persistent = nn.Parameter(torch.randn(2, heads, persistent, self.dh) * 0.02) if persistent else None

    @property
    def carries_across_batches(self) -> bool:
        """Only a windowed attention carries its cache from batch to batch: without a window the
        cache (and each step's cost) would grow with every batch, an unbounded context no
        Transformer is trained with; each batch then starts a fresh context, as without carry."""
        return self.window is not None

    def forward(self, xs, src, state):
        x = xs[0]
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
        pos0 = 0 if state is None else state["pos"]
        if self.use_rope:
            pos = torch.arange(pos0, pos0 + t, device=x.device)
            q, k = rope(q, pos), rope(k, pos)
        past = 0
        if state is not None and state["k"].shape[2] > 0:
            past = state["k"].shape[2]
            k = torch.cat([state["k"], k], dim=2)
            v = torch.cat([state["v"], v], dim=2)
        keep = k.shape[2] if self.window is None else min(k.shape[2], self.window - 1)
        new_state = {"k": k[:, :, k.shape[2] - keep :], "v": v[:, :, v.shape[2] - keep :], "pos": pos0 + t}
        n_p = 0
        if self.persistent is not None:
            n_p = self.persistent.shape[2]
            pk, pv = (p.unsqueeze(0).expand(b, -1, -1, -1).to(x.dtype) for p in self.persistent)
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        if past == 0 and self.window is None and n_p == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            qi = torch.arange(t, device=x.device)[:, None] + past
            kj = torch.arange(k.shape[2] - n_p, device=x.device)[None, :]
            mask = kj <= qi
            if self.window is not None:
                mask = mask & (qi - kj < self.window)
            mask = torch.cat([mask.new_ones(t, n_p), mask], dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, d)), new_state
