"""Titans' Memory as Context (MAC; Behrouz et al., arXiv:2501.00663, Sec. 4.1, Eq. 21-25) as one op.

The stream is cut into segments ``S^(t)`` of ``C`` tokens, ``C`` = the memory level's period.
For each segment, with the neural memory ``M`` (the LMM of Sec. 3: l2 objective, the level's
rule, chunk = segment) and learned persistent tokens ``P = [p_1 .. p_Np]`` (Eq. 19):

    q_t  = S^(t) W_Q                     h_t = M*_{t-1}(q_t)                   (Eq. 21)
    S~^(t) = P || h_t || S^(t)                                                 (Eq. 22)
    y_t  = Attn(S~^(t))   (queries: the segment's tokens)                     (Eq. 23)
    M_t  = M_{t-1}(y_t)   (keys and values projected from y_t)                (Eq. 24)
    o_t  = y_t (x) M*_t(y_t)                                                   (Eq. 25)

``M*`` is a read without an update. The memory's projections follow Sec. 4.4: q, k, v =
SiLU(conv(W x)) per role, q and k L2-normalised per head. Choices the paper leaves open:

- Causality: segment token ``i`` attends to every persistent token, to ``h_t[j]`` and
  ``S^(t)[j]`` for ``j <= i`` (``h_t[j]`` is read with token ``j``'s query, so a later ``h``
  would leak a future token).
- ``M_t`` is the mini-batch update of Sec. 3.2 with the segment as the chunk: every gradient
  of the segment at ``M_{t-1}``; ``M*_t(y_t)[i]`` is read after token ``i``'s update (causal).
  It is run by the level's executor (``nestlearn.loops.run``, period ``C``).
- ``M*_t(y_t)`` reads through the memory's own query map: ``q = SiLU(conv(W_Q y))``.
- ``(x)``: ``RMSNorm(y) * sigmoid(RMSNorm(M*_t(y)))`` (MAG's gate, Sec. 4.2).
- ``rope``: queries and keys rotated by their index in ``S~^(t)``: ``p_j`` at ``j``,
  ``h_t[i]`` at ``Np + i``, ``S^(t)[i]`` at ``Np + C + i``.

Speed: everything that reads only the input (the attention's projections of the segment and
persistent tokens, the retrieval queries and their convolution) is computed for the whole call
at once; only what depends on the memory state is per segment (the retrieval, its keys and
values, one attention call over ``Np + 2C`` keys, and the segment's memory update). Segments
cannot be batched: ``h_{t+1}`` needs ``M_t``, which needs ``y_t``.

State carried across calls: the memory's executor state (its ``offset`` is the position in the
current segment; its ``anchor`` is ``M_{t-1}``), the convolution tails of the four streams,
carried chunk gates, and the rotated keys and values of the current segment's earlier tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.compile.attention import rope
from nestlearn.compile.basic import Op, RMSNorm
from nestlearn.compile.levels import Level
from nestlearn.compile.memory_op import MemoryOp
from nestlearn.loops import init_state, run
from nestlearn.loops.chunks import segments
from nestlearn.loops.common import detach_tree
from nestlearn.spec.schema import MACNode, MemorySpec

__all__ = ["MACOp"]


class MACOp(Op):
    """See the module docstring. Parameters: ``memory`` (the LMM: ``W_Q``, ``W_K``, ``W_V``,
    convolutions, gates, meta-learned ``M_0``), ``qkv`` / ``out`` (the attention), ``persistent``
    (``P``, ``[Np, D]``) and the two norms of the output gate."""

    def __init__(
        self, dim: int, heads: int, level: Level, mem: MemorySpec, *, persistent: int = 0, conv: int = 4,
        qk_norm: bool = True, use_rope: bool = False, learned_init: bool = True,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"mac: heads {heads} does not divide the width {dim}")
        self.dim, self.heads, self.dh = dim, heads, dim // heads
        self.level, self.qk_norm, self.use_rope = level, qk_norm, use_rope
        if use_rope and self.dh % 2:
            raise ValueError(f"mac: rope needs an even head width, got {self.dh}")
        self.memory = MemoryOp(dim, heads, level, mem, qk_norm=qk_norm, conv=conv, learned_init=learned_init,
                               out_proj=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.persistent = nn.Parameter(torch.randn(persistent, dim)) if persistent else None
        self.norm_y, self.norm_m = RMSNorm(dim), RMSNorm(dim)

    @classmethod
    def build(cls, node: MACNode, dim: int, heads: int, levels: dict[str, Level]) -> MACOp:
        """The op of a ``mac`` spec node (``heads`` defaults to the model's)."""
        return cls(dim, node.heads or heads, levels[node.level], node.memory, persistent=node.persistent,
                   conv=node.conv, qk_norm=node.qk_norm, use_rope=node.rope, learned_init=node.init != "zeros")

    # ------------------------------------------------------------------ pieces

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.dh).transpose(1, 2)

    def _merge(self, y: Tensor) -> Tensor:
        b, h, t, dh = y.shape
        return y.transpose(1, 2).reshape(b, t, h * dh)

    def _features(self, role: str, x: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The memory's ``q``/``k``/``v`` of ``x``: SiLU(conv(W x)) per head (q, k normalised)."""
        z = self.memory.proj[role](x)
        if role in self.memory.convs:
            z, tail = self.memory.convs[role](z, tail)
        z = self._heads(F.silu(z))
        if self.qk_norm and role in ("q", "k"):
            z = F.normalize(z, dim=-1)
        return z, tail

    def _rope(self, x: Tensor, start: int, n: int) -> Tensor:
        if not self.use_rope:
            return x
        return rope(x, torch.arange(start, start + n, device=x.device))

    # ------------------------------------------------------------------ forward

    def forward(self, xs: list[Tensor], src: dict[str, Tensor], state: Any) -> tuple[Tensor, Any]:
        x = xs[0]
        b, t, d = x.shape
        if t == 0:
            return x, state
        state = state or {}
        mem, level = self.memory, self.level
        rule, period = level.rule, int(level.period)
        tails: dict[str, Tensor | None] = dict(state.get("conv", {}))
        mem_state = state.get("mem")
        if mem_state is None:
            mem_state = init_state(mem.arch, rule, {n: p.to(x.dtype) for n, p in mem.init.items()}, b)
        chunk_hp = state.get("chunk_hp")
        cache: dict[str, Tensor] | None = state.get("cache") if mem_state["offset"] else None

        # ---- everything that reads only the segment's tokens, for the whole call at once
        q_ret, tails["q"] = self._features("q", x, tails.get("q"))          # q_t of Eq. 21
        qa, ka, va = self.qkv(x).view(b, t, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
        n_p = 0 if self.persistent is None else self.persistent.shape[0]
        if self.use_rope:  # S^(t)[i] sits at N_p + C + i in S~^(t)
            pos = n_p + period + (mem_state["offset"] + torch.arange(t, device=x.device)) % period
            qa, ka = rope(qa, pos), rope(ka, pos)
        pk = pv = x.new_zeros(b, self.heads, 0, self.dh)
        if self.persistent is not None:
            _, pk, pv = self.qkv(self.persistent.to(x.dtype)).view(n_p, 3, self.heads, self.dh).permute(1, 2, 0, 3)
            pk, pv = self._rope(pk, 0, n_p).expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1)
        w_kv = self.qkv.weight[d:]

        outs = []
        for t0, t1 in segments(mem_state["offset"], period, t):
            i0, n = mem_state["offset"], t1 - t0  # position in the segment, tokens in this span
            # Eq. 21: retrieve with the state at the segment's start (read only)
            start = mem_state["anchor"] if i0 else mem_state["params"]
            if level.grad.kind == "stop":
                start = detach_tree(start)
            h = self._merge(mem.arch.apply(start, q_ret[:, :, t0:t1]))
            hk, hv = F.linear(h, w_kv).view(b, n, 2, self.heads, self.dh).permute(2, 0, 3, 1, 4)
            hk = self._rope(hk, n_p + i0, n)
            sk, sv = ka[:, :, t0:t1], va[:, :, t0:t1]
            if i0 and cache is not None:  # the segment's earlier tokens (from the previous call)
                hk, hv = torch.cat([cache["hk"], hk], 2), torch.cat([cache["hv"], hv], 2)
                sk, sv = torch.cat([cache["sk"], sk], 2), torch.cat([cache["sv"], sv], 2)
            # Eq. 22-23: attention over P || h_t || S^(t), causal in the segment's token order
            causal = torch.ones(n, i0 + n, dtype=torch.bool, device=x.device).tril(i0)
            mask = torch.cat([causal.new_ones(n, n_p), causal, causal], dim=1)
            att = F.scaled_dot_product_attention(
                qa[:, :, t0:t1], torch.cat([pk, hk, sk], 2), torch.cat([pv, hv, sv], 2), attn_mask=mask)
            y = self.out(self._merge(att))
            cache = {"hk": hk, "hv": hv, "sk": sk, "sv": sv}
            # Eq. 24: write y_t (keys and values projected from it); Eq. 25's read at q(y_t)
            k, tails["k"] = self._features("k", y, tails.get("k"))
            v, tails["v"] = self._features("v", y, tails.get("v"))
            q_y, tails["qy"] = self._features("q", y, tails.get("qy"))
            hp, chunk_hp = mem.hypers(rule.hypers, y, i0, period, chunk_hp)
            pb = level.problem(mem.arch, q_y, k, v, hp, period)
            m, mem_state = run(pb, mem_state, level.executor)
            # Eq. 25: o_t = y_t (x) M*_t(y_t)
            gate = torch.sigmoid(self.norm_m([self._merge(m)], {}, None)[0])
            outs.append(self.norm_y([y], {}, None)[0] * gate)

        new_state = {"mem": mem_state, "conv": tails, "chunk_hp": chunk_hp,
                     "cache": cache if mem_state["offset"] else None}
        return torch.cat(outs, dim=1), new_state
