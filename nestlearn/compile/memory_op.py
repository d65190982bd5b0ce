"""The parametric memory op: projections, short convolution, heads, gates, and one
in-context level's inner loop (sequential, chunked or dual-form) with its carried state."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.compile.basic import CausalConv, Op
from nestlearn.compile.hypers import Hypers
from nestlearn.compile.levels import Level
from nestlearn.loops import MemoryProblem, init_state, run
from nestlearn.memories import LinearMemory, MemoryArch, MLPMemory
from nestlearn.spec.schema import MemorySpec


def build_arch(mem: MemorySpec, d_in: int, d_out: int, heads: int) -> MemoryArch:
    if mem.type == "linear":
        return LinearMemory(d_in, d_out, heads, bias=mem.bias)
    if mem.type in ("ttt-linear", "ttt-mlp"):  # an nn.Module too: its LN scale/shift are outer params
        from nestlearn.memories.ttt import TTTMemory
        return TTTMemory(d_in, d_out, heads, core=mem.type[4:], expand=mem.expand, act=mem.act, bias=mem.bias)
    return MLPMemory(d_in, d_out, heads, expand=mem.expand, depth=mem.depth, act=mem.act,
                     residual=mem.residual and d_in == d_out, bias=mem.bias)


class MemoryOp(Op):
    def __init__(
        self, dim: int, heads: int, level: Level, mem: MemorySpec, *, query: str = "proj",
        key: str = "proj", value: str = "proj", qk_norm: bool = True, conv: int = 0,
        learned_init: bool = True, out_proj: bool = True,
    ):
        super().__init__()
        self.dim, self.heads, self.dh = dim, heads, dim // heads
        self.level = level
        self.qk_norm = qk_norm
        self.roles = {"q": query, "k": key, "v": value}
        self.sources = tuple(s for s in self.roles.values() if s not in ("proj", "input"))
        self.proj = nn.ModuleDict({r: nn.Linear(dim, dim, bias=False) for r, s in self.roles.items() if s == "proj"})
        self.convs = nn.ModuleDict({r: CausalConv(dim, conv) for r in self.roles} if conv else {})
        self.arch = build_arch(mem, self.dh, self.dh, heads)
        init = self.arch.init_params()
        if learned_init:
            self.init = nn.ParameterDict({k: nn.Parameter(v) for k, v in init.items()})
        else:
            self.init = nn.ParameterDict({k: nn.Parameter(v, requires_grad=False) for k, v in init.items()})
            for p in self.init.values():
                p.zero_()
        self.hypers = Hypers(level.rule.hypers, dim, heads)
        self.out = nn.Linear(dim, dim, bias=False) if out_proj else nn.Identity()

    def _role(self, role: str, x: Tensor, src: dict[str, Tensor]) -> Tensor:
        s = self.roles[role]
        if s == "proj":
            return self.proj[role](x)  # type: ignore[no-any-return]
        if s == "input":
            return x
        return src[s]

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.dh).transpose(1, 2)

    def forward(self, xs: list[Tensor], src: dict[str, Tensor], state: Any) -> tuple[Tensor, Any]:
        x = xs[0]
        b, t, d = x.shape
        state = state or {}
        qkv, conv_state = {}, {}
        for role in ("q", "k", "v"):
            h = self._role(role, x, src)
            if role in self.convs:
                h, conv_state[role] = self.convs[role](h, state.get("conv", {}).get(role))
            qkv[role] = self._heads(h)
        q, k, v = qkv["q"], qkv["k"], qkv["v"]
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        rule = self.level.rule
        mem_state = state.get("mem")
        if mem_state is None:
            init = {n: p.to(x.dtype) for n, p in self.init.items()}
            mem_state = init_state(self.arch, rule, init, b)
        period = int(self.level.period)
        hp, chunk_hp = self.hypers(rule.hypers, x, mem_state["offset"], period, state.get("chunk_hp"))
        pb = MemoryProblem(self.arch, rule, self.level.objective, q, k, v, hp, period, self.level.grad,
                           self.level.name)
        y, mem_state = run(pb, mem_state, self.level.executor)
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.out(y), {"mem": mem_state, "conv": conv_state, "chunk_hp": chunk_hp}


