"""SGD and momentum with forgetting: the Titans surprise rule and its special cases.

    S_t = beta_t S_{t-1} - lr_t g_t          (surprise with momentum; beta = 0: plain SGD)
    W_t = (1 - decay_t) W_{t-1} + S_t        (forgetting gate; decay_to: zero, the papers' form)
    W_t = W_0 + (1 - decay_t)(W_{t-1} - W_0) + S_t                   (decay_to: init)

``decay_to: init`` forgets toward the level's initial (meta-learned) state ``W_0``, which the
rule's state carries as ``home``: the same recurrence on ``W - W_0``. Forgetting toward zero
drives a deep memory toward ``W = 0``, where every layer's gradient vanishes with the others'
weights, so the updates that should refill it shrink too (docs/training-health.md).

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
    decay_to: str = "zero"
    """``zero``: ``W <- (1 - decay) W + S``; ``init``: ``W <- W_0 + (1 - decay)(W - W_0) + S``."""

    @property
    def decays_home(self) -> bool:
        return self.decay_to == "init"

    @property
    def has_momentum(self) -> bool:
        return "beta" in self.hypers

    def init(self, params: Params) -> State:
        state: State = {}
        if self.has_momentum:
            state["S"] = {k: torch.zeros_like(p) for k, p in params.items()}
        if self.decays_home:  # the start state itself, so the outer gradient reaches W_0 through it too
            state["home"] = dict(params)
        return state

    def describe(self) -> str:
        text = super().describe()
        return text[:-1] + ", decay_to=init)" if self.decays_home else text

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
        home = state.get("home")
        for k, p in params.items():
            u = -bcast(lr, p) * grads[k]
            if self.has_momentum:
                u = bcast(hp["beta"], p) * state["S"][k] + u
                new_S[k] = u
            if home is None:
                new_params[k] = (1 - bcast(decay, p)) * p + u
            else:
                new_params[k] = home[k] + (1 - bcast(decay, p)) * (p - home[k]) + u
        new_state: State = {"S": new_S} if self.has_momentum else {}
        if home is not None:
            new_state["home"] = home
        return new_params, new_state


def sgd(lr: HyperValue = 0.1, decay: HyperValue = 0.0, decay_to: str = "zero") -> Momentum:
    """``W <- (1 - decay) W - lr g`` (``decay_to="init"``: forget toward the initial state)."""
    r = Momentum({"lr": lr, "decay": decay}, decay_to=_checked(decay_to))
    r.name = "sgd"
    return r


def momentum(lr: HyperValue = 0.1, beta: HyperValue = 0.9, decay: HyperValue = 0.0,
             decay_to: str = "zero") -> Momentum:
    """Titans' rule: ``S <- beta S - lr g``, ``W <- (1 - decay) W + S`` (``decay_to="init"``:
    ``W <- W_0 + (1 - decay)(W - W_0) + S``).

    With constant ``lr`` and ``decay = 0`` this is ``torch.optim.SGD(momentum=beta)``.
    """
    return Momentum({"lr": lr, "beta": beta, "decay": decay}, decay_to=_checked(decay_to))


def _checked(decay_to: str) -> str:
    if decay_to not in ("zero", "init"):
        raise ValueError(f"decay_to must be 'zero' or 'init', not {decay_to!r}")
    return decay_to
