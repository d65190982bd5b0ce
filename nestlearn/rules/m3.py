"""M3, multi-scale momentum Muon: a Continuum Memory System of momenta inside the optimizer.

Nested Learning (Behrouz et al., 2025), arXiv version, Sec. 7.2, Eq. 75 and Algorithm 1. A fast
momentum is updated every step; a slow momentum is updated once every ``C`` steps from the
gradients accumulated since its last update (the CMS rule Eq. 71 applied to the momentum);
each is orthogonalised by Newton-Schulz, and they are combined by a weighted sum (the
independent CMS variant, Eq. 74, with ``Agg`` = weights ``1, alpha``), divided by an
Adam-style second moment. Algorithm 1, per step t (chunk k covers t = kC+1 .. (k+1)C):

    once per chunk:  M2 = M2 + b3 * sum_{i=(k-1)C+1}^{kC} g_i;   O2 = NS(M2)
    every step:      M1_t = M1_{t-1} + b1 g_t;   V_t = V_{t-1} + b2 g_t^2;   O1_t = NS(M1_t)
                     W_t = W_{t-1} - lr (O1_t + alpha O2) / (sqrt(V_t) + eps)

What this rule computes (a superset of Algorithm 1): every step t = 1, 2, ...

    M1_t = beta_t M1_{t-1} + b1 g_t                      (fast momentum; Alg. 1: beta = 1)
    V_t  = V_{t-1} + b2 g_t^2                            (only when b2 is set; Alg. 1's V)
    W_t  = W_{t-1} - lr_t (NS(M1_t) + alpha_t sum_s O_s) / D_t,   D_t = sqrt(V_t) + eps, or 1
    for each slow scale s with period C_s:  A_s += g_t, and when t % C_s == 0:
        M_s = slow_beta M_s + b3 A_s;   O_s = NS(M_s);   A_s = 0      (Alg. 1: slow_beta = 1)

so, as in Algorithm 1, the slow term refreshed at the end of step kC (with g_{(k-1)C+1..kC})
is used from step kC + 1 on, and is zero during the first chunk. Several slow scales
(``every: [C_1, C_2, ...]``) share ``alpha``, ``slow_beta`` and ``b3``. NS is the quintic
Newton-Schulz of :mod:`nestlearn.rules.muon`, applied to matrices; vectors use the momenta
directly. With no slow scale (or ``alpha = 0``), ``b1 = 1`` and no second moment this is
exactly the ``muon`` rule. The step counter is a Python int in the state, so the slow
updates are scheduled without reading any tensor on the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nestlearn.rules.base import HyperValue, Params, Rule, State, bcast
from nestlearn.rules.muon import newton_schulz


@dataclass
class M3(Rule):
    every: tuple[int, ...] = field(default_factory=lambda: (16,))
    slow_beta: float = 1.0
    b1: float = 1.0
    b3: float = 1.0
    b2: float | None = None
    eps: float = 1e-8
    ns_steps: int = 5

    name = "m3"
    fixed_size_step = True

    def __post_init__(self) -> None:
        self.every = tuple(int(c) for c in self.every)
        if any(c < 1 for c in self.every):
            raise ValueError(f"m3: every slow period must be >= 1 (got {list(self.every)})")
        if self.ns_steps < 1:
            raise ValueError("m3: ns_steps must be >= 1")

    def _ortho(self, m: Tensor) -> Tensor:
        # parameters are [B, H, ...]: matrices have two trailing dims beyond those (as in muon)
        return newton_schulz(m, self.ns_steps) if m.dim() >= 4 else m

    def init(self, params: Params) -> State:
        def zeros() -> Params:
            return {k: torch.zeros_like(p) for k, p in params.items()}

        state: State = {"t": 0, "m": zeros(), "slow": [{"acc": zeros(), "M": zeros(), "O": zeros()}
                                                         for _ in self.every]}
        if self.b2 is not None:
            state["v"] = zeros()
        return state

    def step(
        self,
        params: Params,
        state: State,
        grads: Params,
        hp: Mapping[str, Tensor | float],
        inputs: Mapping[str, Tensor] | None = None,
    ) -> tuple[Params, State]:
        lr, beta, alpha = hp["lr"], hp.get("beta", 0.95), hp.get("alpha", 1.0)
        t = int(state["t"]) + 1
        new_p: Params = {}
        new_m: Params = {}
        new_v: Params = {}
        for k, p in params.items():
            g = grads[k]
            m = bcast(beta, p) * state["m"][k] + (g if self.b1 == 1.0 else self.b1 * g)
            u = self._ortho(m)
            if self.every:
                o = state["slow"][0]["O"][k]
                for s in state["slow"][1:]:
                    o = o + s["O"][k]
                u = u + bcast(alpha, p) * o
            if self.b2 is not None:
                v = state["v"][k] + self.b2 * g * g
                u = u / (v.sqrt() + self.eps)
                new_v[k] = v
            new_p[k] = p - bcast(lr, p) * u
            new_m[k] = m
        new_slow = [self._slow_step(s, c, t, grads) for s, c in zip(state["slow"], self.every)]
        new_state: State = {"t": t, "m": new_m, "slow": new_slow}
        if self.b2 is not None:
            new_state["v"] = new_v
        return new_p, new_state

    def _slow_step(self, s: dict[str, Params], every: int, t: int, grads: Params) -> dict[str, Params]:
        acc = {k: a + grads[k] for k, a in s["acc"].items()}
        if t % every:
            return {"acc": acc, "M": s["M"], "O": s["O"]}
        M = {k: self.slow_beta * s["M"][k] + (a if self.b3 == 1.0 else self.b3 * a) for k, a in acc.items()}
        return {"acc": {k: torch.zeros_like(a) for k, a in acc.items()}, "M": M,
                "O": {k: self._ortho(m) for k, m in M.items()}}

    def describe(self) -> str:
        extra = f", every={list(self.every)}, slow_beta={self.slow_beta:g}"
        if self.b2 is not None:
            extra += f", b2={self.b2:g}"
        return super().describe()[:-1] + extra + ")"


def m3(
    lr: HyperValue = 0.02, beta: HyperValue = 0.95, alpha: HyperValue = 1.0, every: Sequence[int] = (16,),
    *, slow_beta: float = 1.0, b1: float = 1.0, b3: float = 1.0, b2: float | None = None,
    eps: float = 1e-8, ns_steps: int = 5,
) -> M3:
    """Multi-scale momentum Muon (Nested Learning Alg. 1). ``every=()`` is ``muon(lr, beta)``.

    Algorithm 1 itself: ``beta=1, slow_beta=1`` with its ``b1, b2, b3, alpha, eps`` and ``every=(f,)``.
    """
    return M3({"lr": lr, "beta": beta, "alpha": alpha}, every=tuple(every), slow_beta=slow_beta,
              b1=b1, b3=b3, b2=b2, eps=eps, ns_steps=ns_steps)
