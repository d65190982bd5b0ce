"""Delta gradient descent (DGD), the HOPE rule (Nested Learning, Eq. 56-57), with momentum.

For a weight matrix used as ``z = W a`` with layer input ``a`` at this token:

    m_t = beta_t m_{t-1} + g_t
    W_t = W_{t-1} ((1 - decay_t) I - proj_t a_t a_t^T) - lr_t m_t,    a_t unit-norm

The ``a a^T`` term makes the step depend on the current weights along the input direction
(for a linear memory with the l2 objective and beta = 0 it is the delta rule with an extra
data-dependent forgetting). Vectors (biases) get ``(1 - decay) b - lr m``. ``proj`` is ``lr``
(the paper's DGD) unless the rule is given its own ``proj`` hyper-parameter: the projection's
rate sets the transition's eigenvalue along ``a`` (``1 - decay - proj``, negative above
``1 - decay``), the gradient step's rate ``lr`` how far one error moves the weights, and the
two want different ranges (docs/results.md: parity needs the first near 2, stability at long
sequences keeps the second small).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from nestlearn.rules.base import HyperValue, Params, Rule, State, bcast


@dataclass
class DGD(Rule):
    name = "dgd"
    needs_inputs = True
    sums_gradients = True

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
        lr, decay, beta = hp["lr"], hp.get("decay", 0.0), hp.get("beta", 0.0)
        proj = hp.get("proj", lr)
        new_p: Params = {}
        new_m: Params = {}
        for k, p in params.items():
            m = bcast(beta, p) * state["m"][k] + grads[k]
            lr_k = bcast(lr, p)
            w = (1 - bcast(decay, p)) * p
            a = None if inputs is None else inputs.get(k)
            if a is not None and p.dim() == a.dim() + 1:
                # W a a^T with a unit-norm a (the paper's derivation assumes normalised inputs,
                # which keeps (1-decay) I - lr a a^T contractive for lr <= 2 - decay)
                a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                wa = torch.einsum("...oi,...i->...o", p, a)
                w = w - bcast(proj, p) * torch.einsum("...o,...i->...oi", wa, a)
            new_p[k] = w - lr_k * m
            new_m[k] = m
        return new_p, {"m": new_m}


def dgd(lr: HyperValue = 0.1, decay: HyperValue = 0.0, beta: HyperValue = 0.0,
        proj: HyperValue | None = None) -> DGD:
    """DGD; ``proj``: the projection term's own rate (None: ``lr``, the paper's rule)."""
    hypers: dict[str, HyperValue] = {"lr": lr, "decay": decay, "beta": beta}
    if proj is not None:
        hypers["proj"] = proj
    return DGD(hypers)
