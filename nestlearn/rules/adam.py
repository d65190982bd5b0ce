"""Adam and AdamW as inner rules (Adam is the optimal L2 memory of gradients, paper App. B).

Written to match ``torch.optim.Adam`` / ``AdamW`` step for step (bias corrections, eps
outside the square root, L2 vs decoupled weight decay). ``eps_root`` is torchopt's (and
optax's): the step is ``lr * m_hat / (sqrt(v_hat + eps_root) + eps)`` with the bias-corrected
moments. ``eps_root = 0`` is torch.optim's update; ``eps_root > 0`` keeps the step
differentiable where ``v_hat = 0`` (a gradient entry that has been exactly zero so far), which
``grad: unroll`` needs (d sqrt(v)/dv is infinite at 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from nestlearn.rules.base import HyperValue, Params, Rule, State, bcast


@dataclass
class Adam(Rule):
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    eps_root: float = 0.0

    name = "adam"
    usable_as_outer = True

    def init(self, params: Params) -> State:
        like = next(iter(params.values()))
        return {
            "m": {k: torch.zeros_like(p) for k, p in params.items()},
            "v": {k: torch.zeros_like(p) for k, p in params.items()},
            "t": torch.zeros((), dtype=like.dtype, device=like.device),
        }

    def step(
        self,
        params: Params,
        state: State,
        grads: Params,
        hp: Mapping[str, Tensor | float],
        inputs: Mapping[str, Tensor] | None = None,
    ) -> tuple[Params, State]:
        lr = hp["lr"]
        t = state["t"] + 1
        bc1 = 1 - self.b1**t
        bc2 = 1 - self.b2**t
        new_p: Params = {}
        new_m: Params = {}
        new_v: Params = {}
        for k, p in params.items():
            g = grads[k]
            lr_k = bcast(lr, p)
            if self.weight_decay and self.decoupled:
                p = p * (1 - lr_k * self.weight_decay)
            elif self.weight_decay:
                g = g + self.weight_decay * p
            m = self.b1 * state["m"][k] + (1 - self.b1) * g
            v = self.b2 * state["v"][k] + (1 - self.b2) * g * g
            if self.eps_root:
                denom = (v / bc2 + self.eps_root).sqrt() + self.eps  # torchopt / optax
            else:
                denom = v.sqrt() / bc2.sqrt() + self.eps  # torch.optim.Adam, op for op
            new_p[k] = p - lr_k * (m / bc1) / denom
            new_m[k], new_v[k] = m, v
        return new_p, {"m": new_m, "v": new_v, "t": t}


def adam(
    lr: HyperValue = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    weight_decay: float = 0.0, eps_root: float = 0.0,
) -> Adam:
    """``torch.optim.Adam`` as an inner rule. ``eps_root > 0`` keeps it differentiable at g = 0."""
    return Adam({"lr": lr}, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, eps_root=eps_root)


def adamw(
    lr: HyperValue = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    weight_decay: float = 0.01, eps_root: float = 0.0,
) -> Adam:
    """``torch.optim.AdamW`` as an inner rule (decoupled weight decay)."""
    r = Adam({"lr": lr}, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, decoupled=True,
             eps_root=eps_root)
    r.name = "adamw"
    return r
