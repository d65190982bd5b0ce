"""Muon-style rule: momentum whose matrix output is orthogonalised by Newton-Schulz.

    m_t = beta m_{t-1} + g_t;   W_t = W_{t-1} - lr * NS(m_t)   (vectors: W - lr m)

NS is the quintic Newton-Schulz iteration with the coefficients (3.4445, -4.7750, 2.0315)
published with Muon (K. Jordan et al., 2024), scaled by sqrt(max(1, rows/cols)).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from nestlearn.rules.base import HyperValue, Params, Rule, State, bcast

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(m: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately ``U V^T`` of ``m = U S V^T`` over the last two dims (batched)."""
    a, b, c = NS_COEFFS
    transpose = m.shape[-2] > m.shape[-1]
    x = m.transpose(-1, -2) if transpose else m
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        xx = x @ x.transpose(-1, -2)
        x = a * x + (b * xx + c * xx @ xx) @ x
    x = x.transpose(-1, -2) if transpose else x
    return x * max(1.0, m.shape[-2] / m.shape[-1]) ** 0.5


@dataclass
class Muon(Rule):
    ns_steps: int = 5
    name = "muon"
    fixed_size_step = True

    def init(self, params: Params) -> State:
        return {"m": {k: torch.zeros_like(p) for k, p in params.items()}}

    def step(
        self,
        params: Params,
        state: State,
        grads: Params,
        hp: Mapping[str, Tensor | float],
        inputs: Mapping[str, Tensor] | None = None,
    ) -> tuple[Params, State]:
        lr, beta = hp["lr"], hp.get("beta", 0.95)
        new_p: Params = {}
        new_m: Params = {}
        for k, p in params.items():
            m = bcast(beta, p) * state["m"][k] + grads[k]
            # parameters are [B, H, ...]: matrices have two trailing dims beyond those
            u = newton_schulz(m, self.ns_steps) if p.dim() >= 4 else m
            new_p[k] = p - bcast(lr, p) * u
            new_m[k] = m
        return new_p, {"m": new_m}


def muon(lr: HyperValue = 0.02, beta: HyperValue = 0.95, ns_steps: int = 5) -> Muon:
    return Muon({"lr": lr, "beta": beta}, ns_steps=ns_steps)
