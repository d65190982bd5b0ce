"""Deep momentum gradient descent (DMGD): the momentum is itself a memory trained in context.

Nested Learning (Behrouz et al., 2025), arXiv version, Sec. 4.2 and 4.4. Momentum (Eq. 33)

    W_{i+1} = W_i + m_{i+1},    m_{i+1} = alpha_{i+1} m_i - eta_{i+1} grad L(W_i; x_i)

is one gradient step on the inner objective ``<m, u_i>`` (Eq. 34; NeurIPS version Eq. 18:
``<m u_i^T, I>``) with a decay ``alpha``: a linear memory of the gradients ``u_i``. DMGD
(Eq. 50; NeurIPS Eq. 23) replaces that linear memory by an MLP ``m_phi``:

    W_{i+1} = W_i + m_{phi_{i+1}}(.),   phi_{i+1} = alpha_{i+1} phi_i - eta_{i+1} grad_phi L2(phi_i; u_i)

How the memory meets a gradient matrix (the paper leaves it open; this is our choice). For a
weight ``W`` of shape ``[o, i]`` used as ``z = W a``, the momentum memory maps R^i -> R^o and is
keyed by the *input coordinates*: key ``e_j`` (column j of the identity I_i) stores column j
of the update. Its read is therefore the matrix ``m_phi(I) = [m_phi(e_1) ... m_phi(e_i)]``, and
its context (the values it compresses) is the stream of negative gradients ``-u_t``:

    dot (the paper's choice):  L2(phi; u) = <m_phi(I), u>          = -<m_phi(I), -u>
    l2:                        L2(phi; u) = ||m_phi(I) + u||_F^2    (nestlearn's l2: not halved)

which are nestlearn's ``dot`` / ``l2`` objectives with keys ``I`` and values ``-u``. With a
linear memory ``m(x) = M x`` the read is ``M`` itself and the dot step is ``M <- alpha M - eta u``:
exactly the ``momentum`` rule (and torch.optim.SGD(momentum=alpha), with M = -lr * buf). The
paper's literal ``m_{i+1}(u_i)`` (the memory applied to the current gradient) cannot reduce to
momentum for any linear memory -- the read would vanish whenever ``u_i`` does, while momentum
keeps moving -- so the gradient enters as the memory's context, not its read key.

The MLP memory is ``m_phi(x) = D act(U x)`` with ``U: [h, i]``, ``D: [o, h]``,
``h = round(expand * i)`` (no residual: a residual ``x`` would add ``I`` to every update). Its
read and the gradient of the inner objective are closed-form:

    Z = U,  out = D act(Z),  G = dL2/d out  (u for dot, 2 (out + u) for l2)
    grad_D = G act(Z)^T,     grad_U = act'(Z) * (D^T G)

and the fast weight takes the read of the updated memory, with optional forgetting:
``W_{i+1} = (1 - decay) W_i + m_{phi_{i+1}}(I)``. Biases and other vectors use the linear memory
with the same objective (with ``dot``: ordinary momentum). ``D`` starts at zero (the first read is zero, like SGD's empty buffer);
``U`` starts from a seeded normal draw (``init_std``, ``seed``) -- deterministic, identical for
every sequence and head. The memory's initial state is not meta-learned (a rule owns no
parameters of the outer level); ``grad: unroll`` still differentiates through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from nestlearn.memories.base import ACT_VJPS, ACTS
from nestlearn.rules.base import HyperValue, Params, Rule, State, bcast


@dataclass
class DMGD(Rule):
    """DMGD with a ``linear`` or ``mlp`` momentum memory and a ``dot`` or ``l2`` inner objective."""

    momentum: str = "mlp"
    momentum_objective: str = "dot"
    expand: float = 1.0
    act: str = "gelu"
    init_std: float = 1.0
    seed: int = 0

    name = "dmgd"

    def __post_init__(self) -> None:
        if self.momentum not in ("linear", "mlp"):
            raise ValueError(f"dmgd: momentum must be 'linear' or 'mlp', not {self.momentum!r}")
        if self.momentum_objective not in ("dot", "l2"):
            raise ValueError(f"dmgd: momentum_objective must be 'dot' or 'l2', not {self.momentum_objective!r}")
        if self.act not in ACTS:
            raise ValueError(f"dmgd: act must be one of {sorted(ACTS)}, not {self.act!r}")
        if self.expand <= 0 or self.init_std <= 0:
            raise ValueError("dmgd: expand and init_std must be positive")

    def _deep(self, p: Tensor) -> bool:
        return self.momentum == "mlp" and p.dim() >= 4

    def hidden(self, d_in: int) -> int:
        return max(1, int(round(self.expand * d_in)))

    def init(self, params: Params) -> State:
        gen = torch.Generator().manual_seed(self.seed)
        mem: dict[str, Params] = {}
        for k, p in params.items():
            if not self._deep(p):
                mem[k] = {"M": torch.zeros_like(p)}
                continue
            o, i = p.shape[-2], p.shape[-1]
            up = torch.randn(self.hidden(i), i, generator=gen, dtype=torch.float64) * self.init_std
            up = up.to(dtype=p.dtype, device=p.device).expand(*p.shape[:-2], -1, -1)
            mem[k] = {"U": up, "D": torch.zeros(*p.shape[:-2], o, self.hidden(i), dtype=p.dtype, device=p.device)}
        return {"mem": mem}

    def read(self, mem: Params) -> Tensor:
        """The momentum ``m_phi(I)`` the fast weight adds (``M`` for a linear memory)."""
        if "M" in mem:
            return mem["M"]
        act = ACTS[self.act]
        return mem["D"] @ act(mem["U"])

    def step(
        self,
        params: Params,
        state: State,
        grads: Params,
        hp: Mapping[str, Tensor | float],
        inputs: Mapping[str, Tensor] | None = None,
    ) -> tuple[Params, State]:
        lr, beta, decay = hp["lr"], hp.get("beta", 0.9), hp.get("decay", 0.0)
        new_p: Params = {}
        new_mem: dict[str, Params] = {}
        for k, p in params.items():
            u, mem = grads[k], state["mem"][k]
            a, e = bcast(beta, p), bcast(lr, p)
            if "M" in mem:
                g_out = u if self.momentum_objective == "dot" else 2 * (mem["M"] + u)
                upd = {"M": a * mem["M"] - e * g_out}
            else:
                act, act_vjp = ACTS[self.act], ACT_VJPS[self.act]
                z, d = mem["U"], mem["D"]
                h = act(z)
                g_out = u if self.momentum_objective == "dot" else 2 * (d @ h + u)
                grad_d = g_out @ h.transpose(-1, -2)
                grad_u = act_vjp(d.transpose(-1, -2) @ g_out, z)
                upd = {"U": a * z - e * grad_u, "D": a * d - e * grad_d}
            new_mem[k] = upd
            new_p[k] = (1 - bcast(decay, p)) * p + self.read(upd)
        return new_p, {"mem": new_mem}

    def describe(self) -> str:
        base = super().describe()[:-1]
        mem = f"mlp x{self.expand:g} {self.act}" if self.momentum == "mlp" else "linear"
        return f"{base}, momentum={mem}, objective={self.momentum_objective})"


def dmgd(
    lr: HyperValue = 0.1, beta: HyperValue = 0.9, decay: HyperValue = 0.0, *, momentum: str = "mlp",
    momentum_objective: str = "dot", expand: float = 1.0, act: str = "gelu", init_std: float = 1.0,
    seed: int = 0,
) -> DMGD:
    """Deep momentum gradient descent (Nested Learning Eq. 50).

    ``lr`` is the momentum memory's inner learning rate (eta), ``beta`` the decay of its
    parameters (alpha), ``decay`` the fast weights' forgetting. ``momentum="linear"`` with the
    ``dot`` objective is exactly the ``momentum`` rule.
    """
    return DMGD({"lr": lr, "beta": beta, "decay": decay}, momentum=momentum,
                momentum_objective=momentum_objective, expand=expand, act=act, init_std=init_std, seed=seed)
