"""The parametric memory op: projections, short convolution, heads, gates, and one
in-context level's inner loop (sequential, chunked or dual-form) with its carried state.

A node whose ``init`` names a slower *in-context* level ``S`` is a nested Continuum Memory
System level (Nested Learning, Eq. 72): its initial state ``Φ`` is a state of ``S`` that ``S``
meta-learns in context. See :class:`NestedInit`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.compile.basic import CausalConv, Op
from nestlearn.compile.hypers import Hypers
from nestlearn.compile.levels import Level
from nestlearn.loops import MemoryProblem, init_state, run
from nestlearn.loops.chunks import segments
from nestlearn.loops.common import GradMode, MemoryState, Params, detach_tree, hp_at, start_state, with_rule_constants
from nestlearn.memories import build_arch
from nestlearn.spec.schema import MemorySpec


class MemoryOp(Op):
    def __init__(
        self, dim: int, heads: int, level: Level, mem: MemorySpec, *, query: str = "proj",
        key: str = "proj", value: str = "proj", qk_norm: bool = True, conv: int = 0,
        learned_init: bool = True, out_proj: bool = True, nest: Level | None = None, kv_norm: bool = False,
    ):
        super().__init__()
        self.dim, self.heads, self.dh = dim, heads, dim // heads
        self.level = level
        self.qk_norm = qk_norm
        self.kv_norm = kv_norm
        """RMS-normalise k and v per head (no gain): the inner objective's scale is fixed, so the
        outer level cannot grow the level's effective rate through its projections (a CMS level)."""
        self.roles = {"q": query, "k": key, "v": value}
        self.sources = tuple(s for s in self.roles.values() if s not in ("proj", "input"))
        self.proj = nn.ModuleDict({r: nn.Linear(dim, dim, bias=False) for r, s in self.roles.items() if s == "proj"})
        self.convs = nn.ModuleDict({r: CausalConv(dim, conv) for r in self.roles} if conv else {})
        self.arch = build_arch(mem, self.dh, self.dh, heads, unit_keys=qk_norm)
        init = self.arch.init_params()
        if learned_init:
            self.init = nn.ParameterDict({k: nn.Parameter(v) for k, v in init.items()})
        else:
            self.init = nn.ParameterDict({k: nn.Parameter(v, requires_grad=False) for k, v in init.items()})
            for p in self.init.values():
                p.zero_()
        self.hypers = Hypers(level.rule.hypers, dim, heads)
        self.out = nn.Linear(dim, dim, bias=False) if out_proj else nn.Identity()
        self.nest = NestedInit(nest, dim, heads) if nest is not None else None
        """The nested init (Eq. 72): ``self.init`` is then the slow level's initial ``Φ``."""

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
        if self.kv_norm:
            k, v = F.rms_norm(k, (self.dh,)), F.rms_norm(v, (self.dh,))
        rule = self.level.rule
        mem_state = state.get("mem")
        if mem_state is None and self.nest is None:
            init = {n: p.to(x.dtype) for n, p in self.init.items()}
            mem_state = init_state(self.arch, rule, init, b)
        period = int(self.level.period)
        offset = mem_state["offset"] if mem_state is not None else 0
        hp, chunk_hp = self.hypers(rule.hypers, x, offset, period, state.get("chunk_hp"))
        pb = self.level.problem(self.arch, q, k, v, hp, period)
        new: dict[str, Any] = {}
        if self.nest is None:
            y, mem_state = run(pb, mem_state, self.level.executor)
        else:
            init = {n: p.to(x.dtype) for n, p in self.init.items()}
            y, mem_state, new["nest"], new["nest_hp"] = self.nest(
                pb, self.level, init, x, mem_state, state.get("nest"), state.get("nest_hp"))
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.out(y), {"mem": mem_state, "conv": conv_state, "chunk_hp": chunk_hp, **new}


class NestedInit(nn.Module):
    """A nested CMS level's initial state, meta-learned in context by a slower level (Eq. 72).

    For a memory ``F`` (this node's level, period ``C_F``) whose ``init`` names an in-context
    level ``S`` (period ``C_S``, a multiple of ``C_F``), ``S`` owns a state ``Φ`` shaped like
    ``F``'s parameters (per sequence and head), starting each stream from the node's outer
    parameter ``init``:

    - at the start of every chunk of ``S`` (every ``C_S`` tokens, i.e. after ``C_S / C_F``
      updates of ``F``), ``F`` is re-initialised: ``θ^F ← Φ`` and ``F``'s rule state is reset;
    - within the chunk ``F`` learns by its own rule and objective (Eq. 71, unchanged);
    - at the chunk's end ``S`` takes one step of its rule on the meta-gradient
      ``∇_Φ ℓ``, ``ℓ(Φ) = Σ_t L_F(M(k_t; θ^F_{a(t)}(Φ)), v_t)`` summed over the chunk's tokens,
      ``θ^F_{a(t)}`` the state at which ``F`` took token ``t``'s gradient (its chunk start):
      the losses ``F``'s own inner loop differentiates, as functions of its initial state.

    The meta-gradient differentiates through ``F``'s unrolled updates when ``F``'s ``grad`` is
    ``unroll`` (exact, MAML), through their linear path only when ``F`` is ``first_order`` or
    ``stop`` (the sum of ``F``'s inner gradients). ``S``'s own ``grad`` says how the outer loss
    sees ``Φ``'s updates: ``unroll`` (through the meta-gradient too), ``first_order`` (the
    meta-gradient is a constant), ``truncate:N`` (cut every N chunks of ``S``) or ``stop``.
    ``S``'s hyper-parameters for a step are read at the token closing the chunk (a chunk gate
    at its first token).
    """

    def __init__(self, level: Level, dim: int, heads: int):
        super().__init__()
        self.level = level
        self.hypers = Hypers(level.rule.hypers, dim, heads)

    def forward(
        self, pb: MemoryProblem, fast: Level, init: Params, x: Tensor, mem_state: MemoryState | None,
        nest: dict[str, Any] | None, nest_hp: dict[str, Tensor] | None,
    ) -> tuple[Tensor, MemoryState, dict[str, Any], dict[str, Tensor]]:
        slow = self.level
        rule = slow.rule
        c_s, c_f = int(slow.period), pb.period  # a multiple (the level graph checked it)
        b = x.shape[0]
        outside = torch.is_grad_enabled()
        if nest is None:
            phi = {n: p.unsqueeze(0).expand(b, *p.shape) for n, p in init.items()}
            nest = {"params": phi, "opt": rule.init(phi), "offset": 0, "chunks": 0, "grad": None}
        hp, nest_hp = self.hypers(rule.hypers, x, nest["offset"], c_s, nest_hp)
        hp = with_rule_constants(rule, hp)
        phi, opt = nest["params"], nest["opt"]
        s_off, chunks, acc = nest["offset"], nest["chunks"], nest["grad"]
        f_off = mem_state["offset"] if mem_state is not None else 0
        mode: GradMode = slow.grad
        create = outside and mode.create_graph
        ys = []
        with torch.enable_grad():
            for t0, t1 in segments(f_off, c_f, pb.q.shape[2]):  # F's chunks (S's are whole numbers of them)
                if s_off == 0 and (mode.kind == "stop" or not outside or mode.cuts_at(chunks)):
                    phi, opt = detach_tree(phi), detach_tree(opt)
                if not all(p.requires_grad for p in phi.values()):
                    # ∇_Φ ℓ needs Φ in the graph: a detached Φ (cut at a chunk start, or carried
                    # in detached from an earlier call mid-chunk) enters as a new leaf
                    phi = {n: p.detach().requires_grad_() for n, p in phi.items()}
                if s_off == 0:  # a new chunk of S: F starts again from Φ (Eq. 72)
                    mem_state = start_state(fast.rule, phi)
                    chunks += 1
                assert mem_state is not None  # set above: the first token of a stream starts a chunk of S
                # ℓ over these tokens: F's inner losses at the state their gradients are taken at
                # (the chunk-start state; read here, as not every executor carries it back)
                start = mem_state["params"] if f_off == 0 else mem_state["anchor"]
                cut = f_off == 0 and pb.grad.cuts_at(mem_state["chunks"])
                anchor = {n: a if a.requires_grad and not cut else phi[n] + (a - phi[n]).detach()
                          for n, a in start.items()}
                seg = pb.slice(t0, t1)
                y, mem_state = run(seg, mem_state, fast.executor)
                ys.append(y)
                loss = pb.objective(pb.arch.apply(anchor, seg.k), seg.v).sum()
                names = list(phi)
                gs = torch.autograd.grad(loss, [phi[n] for n in names], retain_graph=True, create_graph=create,
                                         allow_unused=True)
                g = {n: (gi if gi is not None else torch.zeros_like(phi[n])) for n, gi in zip(names, gs)}
                acc = g if acc is None else {n: acc[n] + g[n] for n in names}
                s_off += t1 - t0
                f_off = (f_off + t1 - t0) % c_f
                if s_off == c_s:  # S's chunk is complete: one step of S's rule on ∇_Φ ℓ
                    grads = acc if create else detach_tree(acc)
                    phi, opt = rule.step(phi, opt, grads, hp_at(hp, t1 - 1))
                    if not outside or mode.kind == "stop":
                        phi, opt = detach_tree(phi), detach_tree(opt)
                    s_off, acc = 0, None
        y_all = torch.cat(ys, dim=2)
        if not outside:
            y_all = y_all.detach()
        assert mem_state is not None
        new_nest = {"params": phi, "opt": opt, "offset": s_off, "chunks": chunks, "grad": acc}
        return y_all, mem_state, new_nest, nest_hp

