"""A hand-written torch.func loop of the benchmarked Titans memory, for the "within 5%" check.

The same math as the compiled ``memory`` op (projections, l2-normalised q/k, token or chunk
gates, residual 2-layer MLP memory, momentum + decay over chunks of ``period`` tokens, each token
read with its own in-chunk weights), written as one function with no spec, hooks or
dictionaries: q/k/v and the gates split into chunks once before the loop, error signals by
``torch.func.vjp``, closed-form chunk coefficients, dual-form reads. It shares the compiled
model's parameters, so its outputs must match.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp

from nestlearn.compile.basic import RMSNorm
from nestlearn.compile.memory_op import MemoryOp
from nestlearn.compile.model import Block, CompiledModel
from nestlearn.spec.schema import Gate


def _ratios(logx: Tensor) -> tuple[Tensor, Tensor]:
    """``R[t, s] = prod_{r=s+1..t} x_r`` (lower triangle, 0 above) and ``P[t] = prod_{r<=t} x_r``."""
    n = logx.shape[-1]
    c = torch.cumsum(logx, -1)
    mask = torch.ones(n, n, dtype=torch.bool, device=logx.device).tril()
    diff = (c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(~mask, float("-inf"))
    return torch.exp(diff), torch.exp(c)


class HandTitans(nn.Module):
    def __init__(self, model: CompiledModel):
        super().__init__()
        self.model = model  # the compiled model (input: embeddings, one memory op, an RMS norm)
        block = model.blocks[0]
        assert isinstance(block, Block)
        op = block.ops["mem"]
        assert isinstance(op, MemoryOp), f"expected the Titans memory op, got {type(op).__name__}"
        assert isinstance(model.norm, RMSNorm), "the hand-written loop ends in an RMS norm"
        self.op = op
        self.H, self.dh, self.C = op.heads, op.dh, int(op.level.period)
        gates: dict[str, Gate] = {}
        for n in ("lr", "beta", "decay"):
            h = op.level.rule.hypers[n]
            assert isinstance(h, Gate), f"the hand-written loop gates {n} (got {h!r})"
            gates[n] = h
        self.max = {n: float(g.max) for n, g in gates.items()}
        self.per_chunk = {n: g.gate == "chunk" for n, g in gates.items()}

    def _gates(self, x: Tensor, n: str) -> list[Tensor]:
        """Gate ``n`` per chunk, ``[B, H, len]``: per token, or (``gate: chunk``) the chunk's
        first-token value for all its tokens."""
        C, t = self.C, x.shape[1]
        if not self.per_chunk[n]:
            return list((self.max[n] * torch.sigmoid(self.op.hypers.gates[n](x)).transpose(1, 2)).split(C, -1))
        g = self.max[n] * torch.sigmoid(self.op.hypers.gates[n](x[:, ::C])).transpose(1, 2)  # [B, H, chunks]
        return [gc.unsqueeze(-1).expand(*gc.shape, min(C, t - i * C)) for i, gc in enumerate(g.unbind(-1))]

    def forward(self, x: Tensor) -> Tensor:
        op, H, dh, C = self.op, self.H, self.dh, self.C
        b, t, d = x.shape
        heads = lambda z: z.view(b, t, H, dh).transpose(1, 2)  # noqa: E731
        # q/k/v and the gates split into chunks once (no per-chunk slice of the full tensors)
        qs = F.normalize(heads(op.proj["q"](x)), dim=-1).split(C, 2)
        ks = F.normalize(heads(op.proj["k"](x)), dim=-1).split(C, 2)
        vs = heads(op.proj["v"](x)).split(C, 2)
        lrs, betas, decays = (self._gates(x, n) for n in ("lr", "beta", "decay"))
        w1 = op.init["W0"].to(x.dtype).expand(b, *op.init["W0"].shape)
        w2 = op.init["W1"].to(x.dtype).expand(b, *op.init["W1"].shape)
        s1, s2 = torch.zeros_like(w1), torch.zeros_like(w2)
        ys = []
        for qc, kc, vc, lr, beta, decay in zip(qs, ks, vs, lrs, betas, decays):
            # error signals at the chunk-start weights
            h = kc @ w1.transpose(-1, -2)
            # vjp's return type is a union over has_aux; without it, (output, vjp_fn)
            a, gelu_vjp = cast(tuple[Tensor, Callable[[Tensor], tuple[Tensor]]], vjp(F.gelu, h))
            d2 = 2.0 * (kc + a @ w2.transpose(-1, -2) - vc)
            (d1,) = gelu_vjp(d2 @ w2)
            # closed-form coefficients: W_t = A_t W + s_t S + sum_s c_ts g_s
            keep, a_t = _ratios(torch.log1p(-decay))
            carry, b0 = _ratios(torch.log(beta))
            cts = -(keep @ carry) * lr.unsqueeze(-2)
            s_t = (keep @ b0.unsqueeze(-1)).squeeze(-1)
            # dual reads
            z1 = (a_t.unsqueeze(-1) * (qc @ w1.transpose(-1, -2)) + s_t.unsqueeze(-1) * (qc @ s1.transpose(-1, -2))
                  + ((qc @ kc.transpose(-1, -2)) * cts) @ d1)
            r = F.gelu(z1)
            z2 = (a_t.unsqueeze(-1) * (r @ w2.transpose(-1, -2)) + s_t.unsqueeze(-1) * (r @ s2.transpose(-1, -2))
                  + ((r @ a.transpose(-1, -2)) * cts) @ d2)
            ys.append(qc + z2)
            # chunk-end weights and momentum
            c_end, a_end, s_end = cts[..., -1, :], a_t[..., -1, None, None], s_t[..., -1, None, None]
            mc = (-carry[..., -1, :] * lr).unsqueeze(-1)
            mb = b0[..., -1, None, None]
            nw1 = a_end * w1 + s_end * s1 + (d1 * c_end.unsqueeze(-1)).transpose(-1, -2) @ kc
            nw2 = a_end * w2 + s_end * s2 + (d2 * c_end.unsqueeze(-1)).transpose(-1, -2) @ a
            s1 = mb * s1 + (d1 * mc).transpose(-1, -2) @ kc
            s2 = mb * s2 + (d2 * mc).transpose(-1, -2) @ a
            w1, w2 = nw1, nw2
        y = torch.cat(ys, 2).transpose(1, 2).reshape(b, t, d)
        out = op.out(y)
        norm = self.model.norm
        assert isinstance(norm, RMSNorm)
        return out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
