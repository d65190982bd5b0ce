"""Adam's ``eps_root`` (torchopt / optax): ``lr * m_hat / (sqrt(v_hat + eps_root) + eps)``.

``eps_root = 0`` keeps the torch.optim.Adam trajectory; ``eps_root > 0`` equals a plain loop
written here (and torchopt's own adam) and keeps unrolled gradients finite where a gradient
entry is exactly zero, where ``eps_root = 0`` gives NaN (DESIGN.md Sec. 7).
"""

from __future__ import annotations

import pytest
import torch
import torchopt
from torch import Tensor

import nestlearn
from nestlearn import objectives
from nestlearn.loops import GradMode, MemoryProblem, init_state, run
from nestlearn.memories import LinearMemory
from nestlearn.spec.schema import AdamRule, AdamWRule

DT = torch.float64


def _data(seed: int, zero_key_dim: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    W0, k, v = (torch.randn(3, 4, generator=g, dtype=DT), torch.randn(10, 4, generator=g, dtype=DT),
                torch.randn(10, 3, generator=g, dtype=DT))
    if zero_key_dim:
        k[:, 2] = 0.0  # column 2 of every gradient is exactly zero
    return W0, k, v


def _ours(rule: nestlearn.rules.Rule, W0: Tensor, k: Tensor, v: Tensor) -> list[Tensor]:
    arch = LinearMemory(4, 3, 1)
    state = init_state(arch, rule, {"W": W0[None]}, 1)
    out = []
    for t in range(k.shape[0]):
        sl = slice(t, t + 1)
        pb = MemoryProblem(arch, rule, objectives.l2, k[None, None, sl], k[None, None, sl], v[None, None, sl],
                           {}, 1, GradMode())
        _, state = run(pb, state)
        out.append(state["params"]["W"][0, 0])
    return out


def _plain_adam(W0: Tensor, k: Tensor, v: Tensor, lr: float, b1: float, b2: float, eps: float,
                eps_root: float) -> list[Tensor]:
    W, m, s, out = W0.clone(), torch.zeros_like(W0), torch.zeros_like(W0), []
    for t in range(k.shape[0]):
        g = 2 * torch.outer(W @ k[t] - v[t], k[t])  # grad of ||W k - v||^2
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * g * g
        m_hat, s_hat = m / (1 - b1 ** (t + 1)), s / (1 - b2 ** (t + 1))
        W = W - lr * m_hat / (torch.sqrt(s_hat + eps_root) + eps)
        out.append(W)
    return out


def test_eps_root_zero_keeps_torch_optim_adam_parity() -> None:
    W0, k, v = _data(0)
    rule = nestlearn.rules.from_spec(AdamRule.model_validate({"name": "adam", "lr": 0.01, "b1": 0.8, "b2": 0.99}))
    assert isinstance(rule, nestlearn.rules.Adam) and rule.eps_root == 0.0
    ours = _ours(rule, W0, k, v)
    W = torch.nn.Parameter(W0.clone())
    opt = torch.optim.Adam([W], lr=0.01, betas=(0.8, 0.99), eps=1e-8)
    for t in range(k.shape[0]):
        opt.zero_grad()
        ((W @ k[t] - v[t]) ** 2).sum().backward()
        opt.step()
        torch.testing.assert_close(ours[t], W.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eps_root", [1e-8, 1e-3, 0.5])
def test_eps_root_matches_plain_reference_and_torchopt(eps_root: float) -> None:
    W0, k, v = _data(1)
    spec = AdamRule.model_validate({"name": "adam", "lr": 0.02, "b1": 0.9, "b2": 0.95, "eps": 1e-6, "eps_root": eps_root})
    ours = _ours(nestlearn.rules.from_spec(spec), W0, k, v)
    plain = _plain_adam(W0, k, v, 0.02, 0.9, 0.95, 1e-6, eps_root)
    theirs = _ours(nestlearn.rules.from_torchopt(torchopt.adam(0.02, (0.9, 0.95), 1e-6, eps_root=eps_root)), W0, k, v)
    for a, b, c in zip(ours, plain, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        # torchopt agrees to float32 precision only: its bias corrections pow(b, count) with an int64
        # count come out in the default float32 dtype
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    assert (ours[-1] - _ours(nestlearn.rules.adam(0.02, 0.9, 0.95, 1e-6), W0, k, v)[-1]).abs().max() > 0


def test_eps_root_keeps_unrolled_gradients_finite_at_zero_gradients() -> None:
    W0, k, v = _data(2, zero_key_dim=True)

    def final_loss(eps_root: float, W0: Tensor) -> Tensor:
        W = _ours(nestlearn.rules.adam(0.05, eps_root=eps_root), W0, k, v)[-1]
        return (W ** 2).sum()

    leaf = W0.clone().requires_grad_()
    (g0,) = torch.autograd.grad(final_loss(0.0, leaf), leaf)
    assert not torch.isfinite(g0).all()  # 0 * inf where v_hat = 0
    (g1,) = torch.autograd.grad(final_loss(1e-8, leaf), leaf)
    assert torch.isfinite(g1).all()
    assert torch.autograd.gradcheck(lambda w: final_loss(1e-3, w), (leaf,), eps=1e-6, atol=1e-6)


def test_adamw_spec_carries_eps_root() -> None:
    r = nestlearn.rules.from_spec(AdamWRule.model_validate({"name": "adamw", "eps_root": 1e-10}))
    assert isinstance(r, nestlearn.rules.Adam) and r.decoupled and r.eps_root == 1e-10
    with pytest.raises(ValueError):
        AdamRule.model_validate({"name": "adam", "eps_root": -1.0})
