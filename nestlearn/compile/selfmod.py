"""HOPE's self-modifying memory (Nested Learning §8, Eq. 83-90), chunk-wise.

Per head, with ``x`` the (short-convolved) input and ``A`` the chunk-start state:

    k_t = normalize(M_k,A(x_t))     v_t = M_v,A(x_t)                 (generated keys / values)
    lr_t = max_lr sigmoid(M_lr,A(x_t))   decay_t = max_decay sigmoid(M_decay,A(x_t))
    q_t = normalize(W_q x_t)                                          (q: a fixed projection)

Every memory ``M_s`` (s in k, v, lr, decay, and the main memory) then learns in context from
a value it generates itself, ``vhat_s,t = M_s,A(normalize(v_t))`` (the main memory's value is ``v_t``),
with the level's objective ``L(M_s; k_t, vhat_s,t)`` and rule (DGD with decay and momentum
in HOPE), using the shared generated ``lr_t`` and ``decay_t``. Output ``y_t = M_main,t(q_t)``.
Generation uses the state of the previous chunk's end, so a chunk is parallel; with period 1
this is the token-by-token self-modifying recurrence.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.compile.basic import CausalConv, Op
from nestlearn.compile.levels import Level
from nestlearn.compile.memory_op import build_arch
from nestlearn.loops import MemoryProblem, init_state, run
from nestlearn.loops.chunked import segments
from nestlearn.memories import LinearMemory, MemoryArch
from nestlearn.spec.schema import Gate, Learned, MemorySpec

GENERATORS = ("k", "v", "lr", "decay")


class SelfModOp(Op):
    def __init__(self, dim: int, heads: int, level: Level, mem: MemorySpec, conv: int, learned_init: bool = True):
        super().__init__()
        self.dim, self.heads, self.dh = dim, heads, dim // heads
        self.level = level
        dh = self.dh
        self.archs: dict[str, MemoryArch] = {
            "k": LinearMemory(dh, dh, heads, init_std=1 / math.sqrt(dh)),
            "v": LinearMemory(dh, dh, heads, init_std=1 / math.sqrt(dh)),
            "lr": LinearMemory(dh, 1, heads, init_std=1 / math.sqrt(dh)),
            "decay": LinearMemory(dh, 1, heads, init_std=1 / math.sqrt(dh)),
            "main": build_arch(mem, dh, dh, heads),
        }
        self.init = nn.ParameterDict()
        for name, arch in self.archs.items():
            for pname, p in arch.init_params().items():
                self.init[f"{name}__{pname}"] = nn.Parameter(p, requires_grad=learned_init)
        self.q = nn.Linear(dim, dim, bias=False)
        self.conv_x = CausalConv(dim, conv) if conv else None
        self.conv_q = CausalConv(dim, conv) if conv else None
        hyp = level.rule.hypers
        self.max_lr = _max_of(hyp.get("lr", 0.1))
        self.max_decay = _max_of(hyp.get("decay", 0.0))
        self.gen_bias = nn.ParameterDict({
            "lr": nn.Parameter(torch.zeros(heads)), "decay": nn.Parameter(torch.full((heads,), -6.0)),
        })
        beta = hyp.get("beta")
        self.beta = nn.Parameter(torch.tensor(float(beta.learned))) if isinstance(beta, Learned) else None
        self.out = nn.Linear(dim, dim, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.dh).transpose(1, 2)

    def _init_params(self, name: str, dtype: torch.dtype) -> dict[str, Tensor]:
        pre = f"{name}__"
        return {k[len(pre):]: p.to(dtype) for k, p in self.init.items() if k.startswith(pre)}

    def forward(self, xs: list[Tensor], src: dict[str, Tensor], state: Any) -> tuple[Tensor, Any]:
        x = xs[0]
        b, t, d = x.shape
        state = state or {}
        rule, lv = self.level.rule, self.level
        period = int(lv.period)
        conv_state: dict[str, Tensor] = {}
        xc, qc = x, self.q(x)
        if self.conv_x is not None and self.conv_q is not None:
            xc, conv_state["x"] = self.conv_x(x, state.get("conv", {}).get("x"))
            qc, conv_state["q"] = self.conv_q(qc, state.get("conv", {}).get("q"))
        xh = self._heads(xc)
        qh = F.normalize(self._heads(qc), dim=-1)
        mems = state.get("mems") or {
            n: init_state(a, rule, self._init_params(n, x.dtype), b) for n, a in self.archs.items()
        }
        beta: dict[str, Tensor | float] = {}
        if "beta" in rule.hypers:
            beta["beta"] = self.beta.to(x.dtype) if self.beta is not None else float(rule.hypers["beta"])  # type: ignore[arg-type]
        ys = []
        offset = mems["main"]["offset"]
        for t0, t1 in segments(offset, period, t):
            anchors = {n: (m["params"] if m["offset"] == 0 else m["anchor"]) for n, m in mems.items()}
            xs_seg, q_seg = xh[:, :, t0:t1], qh[:, :, t0:t1]
            gen = {n: self.archs[n].apply(anchors[n], xs_seg) for n in GENERATORS}
            k = F.normalize(gen["k"], dim=-1)
            v = gen["v"]
            hp: dict[str, Tensor | float] = dict(beta)
            hp["lr"] = self.max_lr * torch.sigmoid(gen["lr"][..., 0] + self.gen_bias["lr"].to(x.dtype)[:, None])
            if self.max_decay > 0:
                hp["decay"] = self.max_decay * torch.sigmoid(gen["decay"][..., 0] + self.gen_bias["decay"].to(x.dtype)[:, None])
            v_unit = F.normalize(v, dim=-1)  # bounded inputs keep the self-reference stable
            for n, arch in self.archs.items():
                target = v if n == "main" else arch.apply(anchors[n], v_unit)
                query = q_seg if n == "main" else xs_seg
                pb = MemoryProblem(arch, rule, lv.objective, query, k, target, hp, period, lv.grad, lv.name)
                y, mems[n] = run(pb, mems[n], lv.executor)
                if n == "main":
                    ys.append(y)
        y = torch.cat(ys, dim=2).transpose(1, 2).reshape(b, t, d)
        return self.out(y), {"mems": mems, "conv": conv_state}


def _max_of(h: Any) -> float:
    if isinstance(h, Gate):
        return h.max
    if isinstance(h, Learned):
        return float(h.learned)
    return float(h)
