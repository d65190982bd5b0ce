"""Guarantees 5 and 6: momentum / Adam levels reproduce torch.optim step by step, and a rule
swapped through the API yields exactly that rule's trajectory."""

from __future__ import annotations

from pathlib import Path

import torch
import torchopt
import yaml

import nestlearn
from nestlearn import objectives
from nestlearn.compile import compile_spec
from nestlearn.loops import GradMode, MemoryProblem, init_state, run
from nestlearn.memories import LinearMemory
from nestlearn.spec.schema import Spec
from tests import reference as ref

DT = torch.float64


def drive(rule: nestlearn.rules.Rule, W0: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """Fast weights after each token of a period-1 linear memory (one sequence, one head)."""
    arch = LinearMemory(W0.shape[1], W0.shape[0], 1)
    state = init_state(arch, rule, {"W": W0[None]}, 1)
    out = []
    for t in range(k.shape[0]):
        pb = MemoryProblem(arch, rule, objectives.l2, k[None, None, t : t + 1], k[None, None, t : t + 1],
                           v[None, None, t : t + 1], {}, 1, GradMode())
        _, state = run(pb, state)
        out.append(state["params"]["W"][0, 0].detach())
    return out


def torch_optim_trajectory(make_opt, W0: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    W = torch.nn.Parameter(W0.clone())
    opt = make_opt([W])
    out = []
    for t in range(k.shape[0]):
        opt.zero_grad()
        ((W @ k[t] - v[t]) ** 2).sum().backward()
        opt.step()
        out.append(W.detach().clone())
    return out


def data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 4, generator=g, dtype=DT), torch.randn(12, 4, generator=g, dtype=DT),
            torch.randn(12, 3, generator=g, dtype=DT))


def test_momentum_level_is_torch_sgd_momentum() -> None:
    W0, k, v = data(0)
    ours = drive(nestlearn.rules.momentum(lr=0.05, beta=0.9), W0, k, v)
    theirs = torch_optim_trajectory(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), W0, k, v)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_adam_level_is_torch_adam() -> None:
    W0, k, v = data(1)
    ours = drive(nestlearn.rules.adam(lr=0.01, b1=0.8, b2=0.99, eps=1e-8), W0, k, v)
    theirs = torch_optim_trajectory(lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-8), W0, k, v)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_adamw_level_is_torch_adamw() -> None:
    W0, k, v = data(2)
    ours = drive(nestlearn.rules.adamw(lr=0.01, weight_decay=0.1), W0, k, v)
    theirs = torch_optim_trajectory(lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), W0, k, v)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


SPEC = """
nestlearn: 1
name: swap
model: {vocab: 16, dim: 4, depth: 1, heads: 1}
levels:
  outer: {period: outer, rule: {name: adamw}}
  mem: {period: 1, objective: l2, rule: {name: sgd, lr: 0.1}}
block:
  - {id: m, op: memory, in: x, level: mem, qk_norm: false, out_proj: false}
"""


def _fast_weights_after_swap(rule: object) -> tuple[torch.Tensor, torch.Tensor, dict]:
    torch.manual_seed(0)
    model = compile_spec(Spec.model_validate(yaml.safe_load(SPEC)), dtype=DT)
    with torch.no_grad():
        model.blocks[0].ops["m"].init["W"].normal_(0, 0.5)
    model.levels["mem"].rule = rule
    x = torch.randn(1, 9, 4, dtype=DT)
    op = model.blocks[0].ops["m"]
    y, st = op([x], {}, None)
    weights = {n: p.detach() for n, p in op.named_parameters()}
    return x, y, {"st": st, "w": weights}


def _reference_with(rule_name: str, x: torch.Tensor, w: dict, hp: dict) -> torch.Tensor:
    q, k, v = (x[0] @ w[f"proj.{r}.weight"].T for r in "qkv")
    y, _ = ref.inner_loop("linear", rule_name, "l2", {"W": w["init.W"][0]}, q, k, v, hp, 1)
    return y


def test_swapping_to_our_adam_gives_adams_trajectory() -> None:
    x, y, aux = _fast_weights_after_swap(nestlearn.rules.adam(lr=0.05))
    expected = _reference_with("adam", x, aux["w"], {"lr": 0.05})
    torch.testing.assert_close(y[0], expected, rtol=1e-10, atol=1e-10)
    assert "m" in aux["st"]["mem"]["opt"] and "v" in aux["st"]["mem"]["opt"]


def test_swapping_to_a_torchopt_transformation() -> None:
    x, y, aux = _fast_weights_after_swap(torchopt.sgd(0.2, momentum=0.5))
    # torchopt's SGD momentum == S <- 0.5 S - 0.2 g; W <- W + S
    expected = _reference_with("momentum", x, aux["w"], {"lr": 0.2, "beta": 0.5})
    torch.testing.assert_close(y[0], expected, rtol=1e-10, atol=1e-10)


def test_swap_takes_effect_on_next_forward_and_is_visible() -> None:
    model = compile_spec(Spec.model_validate(yaml.safe_load(SPEC)), dtype=DT)
    x = torch.randint(0, 16, (1, 7))
    before, _ = model(x)
    model.levels["mem"].rule = nestlearn.rules.momentum(lr=0.3, beta=0.5)
    after, _ = model(x)
    assert (before - after).abs().max() > 1e-6
    assert "momentum" in model.levels["mem"].rule.describe()
    assert Path(__file__).exists()
