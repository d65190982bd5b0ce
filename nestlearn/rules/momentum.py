"""SGD and momentum with forgetting: the Titans surprise rule and its special cases.

    S_t = beta_t S_{t-1} - lr_t g_t          (surprise with momentum; beta = 0: plain SGD)
    W_t = (1 - decay_t) W_{t-1} + S_t        (forgetting gate)

The update is linear in the gradients with scalar per-token coefficients, so the chunked
executor has an exact closed form for it (loops/dual.py); ``step`` is the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from nestlearn.rules.base import HyperValue, Params, Rule, State, bcast


@dataclass
class Momentum(Rule):
    name = "momentum"
    linear = True
    sums_gradients = True
    usable_as_outer = True

    @property
    def has_momentum(self) -> bool:
        return "beta" in self.hypers

    def init(self, params: Params) -> State:
        if not self.has_momentum:
            return {}
        return {"S": {k: torch.zeros_like(p) for k, p in params.items()}}

    def step(
        self,
        params: Params,
        state: State,
        grads: Params,
        hp: Mapping[str, Tensor | float],
        inputs: Mapping[str, Tensor] | None = None,
    ) -> tuple[Params, State]:
        lr, decay = hp["lr"], hp.get("decay", 0.0)
        new_params: Params = {}
        new_S: Params = {}
        for k, p in params.items():
            u = -bcast(lr, p) * grads[k]
            if self.has_momentum:
                u = bcast(hp["beta"], p) * state["S"][k] + u
                new_S[k] = u
            new_params[k] = (1 - bcast(decay, p)) * p + u
        return new_params, ({"S": new_S} if self.has_momentum else {})


def sgd(lr: HyperValue = 0.1, decay: HyperValue = 0.0) -> Momentum:
    """``W <- (1 - decay) W - lr g``."""
    r = Momentum({"lr": lr, "decay": decay})
    r.name = "sgd"
    return r


def momentum(lr: HyperValue = 0.1, beta: HyperValue = 0.9, decay: HyperValue = 0.0) -> Momentum:
    """Titans' rule: ``S <- beta S - lr g``, ``W <- (1 - decay) W + S``.

    With constant ``lr`` and ``decay = 0`` this is ``torch.optim.SGD(momentum=beta)``.
    """
    return Momentum({"lr": lr, "beta": beta, "decay": decay})
