"""DMGD (deep momentum gradient descent, Nested Learning Eq. 50) against plain references.

(a) a linear momentum memory starting at zero with the dot objective is torch.optim.SGD with
    momentum, trajectory for trajectory;
(b) an MLP momentum memory, stepped by the sequential and the chunked executors, equals a
    per-sequence, per-head loop written here from the equations (inner gradients by autograd);
(c) the shipped spec validates, compiles, and trains (finite outer gradients), and its memory
    op equals the plain loop fed with the op's own projections.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

import nestlearn
from nestlearn import objectives
from nestlearn.compile import compile_spec
from nestlearn.loops import GradMode, MemoryProblem, init_state, run
from nestlearn.memories import LinearMemory, MemoryArch, MLPMemory
from nestlearn.spec.schema import DmgdRule, Spec

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]
ACTS = {"gelu": F.gelu, "silu": F.silu}


# ----------------------------------------------------------------------------- (a) torch.optim


def _fast_memory_trajectory(
    rule: nestlearn.rules.Rule, arch: MemoryArch, init: dict[str, Tensor], k: Tensor, v: Tensor,
) -> list[dict[str, Tensor]]:
    """Period 1, one sequence, one head, one token per call (the carried state in between)."""
    state = init_state(arch, rule, {n: w[None] for n, w in init.items()}, 1)
    out = []
    for t in range(k.shape[0]):
        sl = slice(t, t + 1)
        pb = MemoryProblem(arch, rule, objectives.l2, k[None, None, sl], k[None, None, sl], v[None, None, sl],
                           {}, 1, GradMode())
        _, state = run(pb, state, "chunked")
        out.append({n: w[0, 0].detach().clone() for n, w in state["params"].items()})
    return out


def test_linear_dot_dmgd_is_torch_sgd_momentum_on_a_matrix_memory() -> None:
    g = torch.Generator().manual_seed(0)
    W0, k, v = (torch.randn(3, 4, generator=g, dtype=DT), torch.randn(15, 4, generator=g, dtype=DT),
                torch.randn(15, 3, generator=g, dtype=DT))
    rule = nestlearn.rules.dmgd(lr=0.05, beta=0.9, momentum="linear", momentum_objective="dot")
    ours = _fast_memory_trajectory(rule, LinearMemory(4, 3, 1), {"W": W0}, k, v)

    W = torch.nn.Parameter(W0.clone())
    opt = torch.optim.SGD([W], lr=0.05, momentum=0.9)
    for t in range(k.shape[0]):
        opt.zero_grad()
        ((W @ k[t] - v[t]) ** 2).sum().backward()
        opt.step()
        torch.testing.assert_close(ours[t]["W"], W.detach(), rtol=1e-10, atol=1e-10)


def test_linear_dot_dmgd_is_torch_sgd_momentum_on_an_mlp_memory_with_biases() -> None:
    """Every parameter (matrices and bias vectors) of a residual MLP memory follows SGD(momentum)."""
    torch.manual_seed(1)
    arch = MLPMemory(4, 4, 1, expand=2, bias=True)
    init = {n: p[0] + 0.1 * torch.randn_like(p[0]) for n, p in arch.init_params(DT).items()}
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(12, 4, generator=g, dtype=DT), torch.randn(12, 4, generator=g, dtype=DT)
    rule = nestlearn.rules.dmgd(lr=0.03, beta=0.8, momentum="linear")
    ours = _fast_memory_trajectory(rule, arch, init, k, v)

    P = {n: torch.nn.Parameter(w.clone()) for n, w in init.items()}
    opt = torch.optim.SGD(list(P.values()), lr=0.03, momentum=0.8)
    for t in range(k.shape[0]):
        opt.zero_grad()
        y = k[t] + P["W1"] @ F.gelu(P["W0"] @ k[t] + P["b0"]) + P["b1"]
        ((y - v[t]) ** 2).sum().backward()
        opt.step()
        for n in P:
            torch.testing.assert_close(ours[t][n], P[n].detach(), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- (b) MLP momentum


def plain_dmgd(
    init: dict[str, Tensor], k: Tensor, v: Tensor, q: Tensor, hp: dict[str, Tensor], period: int,
    act: str, objective: str, expand: float, init_std: float, seed: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One sequence and head of a residual MLP memory ``x + W1 gelu(W0 x + b0) + b1`` (l2 objective,
    mini-batches of ``period`` tokens) trained by DMGD, straight from the equations:

        u_t = grad of ||M(k_t) - v_t||^2 at the chunk-start weights
        matrices:  phi = (U, D), read m(I) = D act(U)
                   phi <- beta_t phi - lr_t grad_phi L2(phi; u_t),  L2 = <m(I), u> | ||m(I) + u||^2
                   W <- (1 - decay_t) W + D act(U)
        vectors:   S <- beta_t S - lr_t grad_S L2(S; g),  L2 = <S, g> | ||S + g||^2,  b <- (1 - decay_t) b + S
    with U_0 a seeded normal draw (one generator, parameters in order), D_0 = 0, S_0 = 0.
    """
    sigma = ACTS[act]

    def mem(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return x + p["W1"] @ F.gelu(p["W0"] @ x + p["b0"]) + p["b1"]

    W = {n: w.clone() for n, w in init.items()}
    gen = torch.Generator().manual_seed(seed)
    phi: dict[str, dict[str, Tensor]] = {}
    for n, w in W.items():
        if w.dim() == 2:
            hdim = max(1, int(round(expand * w.shape[1])))
            phi[n] = {"U": torch.randn(hdim, w.shape[1], generator=gen, dtype=DT) * init_std,
                      "D": torch.zeros(w.shape[0], hdim, dtype=DT)}
        else:
            phi[n] = {"S": torch.zeros_like(w)}
    ys, anchor = [], W
    for t in range(k.shape[0]):
        if t % period == 0:
            anchor = {n: w.detach().clone().requires_grad_() for n, w in W.items()}
        loss = ((mem(anchor, k[t]) - v[t]) ** 2).sum()
        names = list(anchor)
        grads = dict(zip(names, torch.autograd.grad(loss, [anchor[n] for n in names])))
        lr, beta, decay = hp["lr"][t], hp["beta"][t], hp["decay"][t]
        new = {}
        for n, w in W.items():
            u = grads[n]
            if w.dim() == 2:
                U = phi[n]["U"].detach().requires_grad_()
                D = phi[n]["D"].detach().requires_grad_()
                read = D @ sigma(U)
                inner = (read * u).sum() if objective == "dot" else ((read + u) ** 2).sum()
                gU, gD = torch.autograd.grad(inner, [U, D])
                phi[n] = {"U": beta * U.detach() - lr * gU, "D": beta * D.detach() - lr * gD}
                new[n] = (1 - decay) * w + phi[n]["D"] @ sigma(phi[n]["U"])
            else:
                S = phi[n]["S"].detach().requires_grad_()
                inner = (S * u).sum() if objective == "dot" else ((S + u) ** 2).sum()
                (gS,) = torch.autograd.grad(inner, [S])
                phi[n] = {"S": beta * S.detach() - lr * gS}
                new[n] = (1 - decay) * w + phi[n]["S"]
        W = new
        ys.append(mem(W, q[t]).detach())
    return torch.stack(ys), W


def _problem(seed: int) -> tuple[MLPMemory, dict[str, Tensor], Tensor, Tensor, Tensor, dict[str, Tensor]]:
    torch.manual_seed(seed)
    B, H, T, d = 2, 2, 10, 3
    arch = MLPMemory(d, d, H, expand=2, bias=True)
    init = {n: p + 0.1 * torch.randn_like(p) for n, p in arch.init_params(DT).items()}  # [H, ...]
    q, k, v = (torch.randn(B, H, T, d, dtype=DT) for _ in range(3))
    k = F.normalize(k, dim=-1)
    hp = {"lr": 0.05 + 0.1 * torch.rand(B, H, T, dtype=DT), "beta": 0.5 + 0.4 * torch.rand(B, H, T, dtype=DT),
          "decay": 0.05 * torch.rand(B, H, T, dtype=DT)}
    return arch, init, q, k, v, hp


CASES = [("gelu", "dot", 1.0, 1), ("silu", "l2", 1.5, 4), ("gelu", "dot", 0.5, 3)]


@pytest.mark.parametrize("act,objective,expand,period", CASES)
@pytest.mark.parametrize("executor", ["sequential", "chunked"])
def test_mlp_momentum_memory_equals_plain_loop(act: str, objective: str, expand: float, period: int,
                                               executor: str) -> None:
    arch, init, q, k, v, hp = _problem(2)
    rule = nestlearn.rules.dmgd(momentum="mlp", momentum_objective=objective, expand=expand, act=act,
                                init_std=0.7, seed=3)
    # one call over 10 tokens, fed as 6 + 4 with the carried state
    state = init_state(arch, rule, init, q.shape[0])
    ys = []
    for t0, t1 in ((0, 6), (6, 10)):
        sl = slice(t0, t1)
        pb = MemoryProblem(arch, rule, objectives.l2, q[:, :, sl], k[:, :, sl], v[:, :, sl],
                           {n: h[..., sl] for n, h in hp.items()}, period, GradMode())
        y, state = run(pb, state, executor)
        ys.append(y)
    y = torch.cat(ys, 2)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            ref_y, ref_w = plain_dmgd({n: p[h] for n, p in init.items()}, k[b, h], v[b, h], q[b, h],
                                      {n: x[b, h] for n, x in hp.items()}, period, act, objective, expand, 0.7, 3)
            torch.testing.assert_close(y[b, h], ref_y, rtol=1e-10, atol=1e-10)
            for n, w in ref_w.items():
                torch.testing.assert_close(state["params"][n][b, h], w, rtol=1e-10, atol=1e-10)


def test_deterministic_init_and_zero_first_read() -> None:
    rule = nestlearn.rules.dmgd(momentum="mlp", expand=2.0, init_std=0.5, seed=7)
    params = {"W": torch.randn(2, 3, 4, 5, dtype=DT), "b": torch.randn(2, 3, 4, dtype=DT)}
    a, b = rule.init(params), rule.init(params)
    expected_U = torch.randn(10, 5, generator=torch.Generator().manual_seed(7), dtype=DT) * 0.5
    assert a["mem"]["W"]["U"].shape == (2, 3, 10, 5) and a["mem"]["W"]["D"].shape == (2, 3, 4, 10)
    torch.testing.assert_close(a["mem"]["W"]["U"][1, 2], expected_U, rtol=0, atol=0)
    assert torch.equal(a["mem"]["W"]["U"], b["mem"]["W"]["U"])
    assert not a["mem"]["W"]["D"].any() and not a["mem"]["b"]["M"].any()
    assert not rule.read(a["mem"]["W"]).any()


def test_outer_gradients_through_unrolled_dmgd_match_finite_differences() -> None:
    """Guarantee 3 for this rule: gradients of the reads w.r.t. the initial fast weights, keys and
    values flow through the MLP momentum memory's unrolled steps (gradcheck, float64)."""
    torch.manual_seed(5)
    arch = LinearMemory(3, 2, 1)
    rule = nestlearn.rules.dmgd(lr=0.2, beta=0.7, momentum="mlp", momentum_objective="l2", act="silu")
    W0 = torch.randn(1, 2, 3, dtype=DT, requires_grad=True)
    q = torch.randn(1, 1, 5, 3, dtype=DT)
    k = torch.randn(1, 1, 5, 3, dtype=DT, requires_grad=True)
    v = torch.randn(1, 1, 5, 2, dtype=DT, requires_grad=True)

    def f(W0: Tensor, k: Tensor, v: Tensor) -> Tensor:
        state = init_state(arch, rule, {"W": W0}, 1)
        pb = MemoryProblem(arch, rule, objectives.l2, q, k, v, {}, 2, GradMode())
        y, _ = run(pb, state, "chunked")
        return y

    assert torch.autograd.gradcheck(f, (W0, k, v), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- (c) the spec

SPEC_PATH = ROOT / "specs" / "dmgd-memory.yaml"


def test_spec_validates_compiles_and_trains() -> None:
    spec = nestlearn.load_spec(SPEC_PATH)
    rule_spec = spec.levels["memory"].rule
    assert isinstance(rule_spec, DmgdRule) and rule_spec.momentum == "mlp"
    spec = nestlearn.load_spec(SPEC_PATH, overrides=["model.dim=16", "model.depth=2", "model.heads=2",
                                                     "levels.memory.period=4"])
    torch.manual_seed(0)
    model = nestlearn.compile(spec, dtype=DT)
    assert isinstance(model.levels["memory"].rule, nestlearn.rules.DMGD)
    assert "dmgd(" in model.levels["memory"].rule.describe()
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, _ = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # the memory's meta-learned initial state is reached through the unrolled DMGD steps
    assert any(n.endswith("init.W0") and g is not None and g.abs().sum() > 0 for n, g in grads.items())


def test_rule_spec_errors_and_python_constructor_agree() -> None:
    with pytest.raises(ValueError):
        DmgdRule.model_validate({"name": "dmgd", "momentum": "deep"})
    with pytest.raises(ValueError):
        DmgdRule.model_validate({"name": "dmgd", "expand": 0})
    with pytest.raises(ValueError):
        DmgdRule.model_validate({"name": "dmgd", "lr": 0.1, "typo": 1})
    r = nestlearn.rules.from_spec(DmgdRule.model_validate(
        {"name": "dmgd", "lr": {"learned": 0.2}, "beta": 0.5, "momentum": "linear", "momentum_objective": "l2"}))
    assert isinstance(r, nestlearn.rules.DMGD) and r.momentum == "linear" and r.momentum_objective == "l2"
    assert set(r.hypers) == {"lr", "beta", "decay"} and r.hypers["beta"] == 0.5


OP_SPEC = """
nestlearn: 1
name: dmgd-op
model: {vocab: 16, dim: 4, depth: 1, heads: 1}
levels:
  outer: {period: outer, rule: {name: adamw}}
  mem: {period: 3, objective: l2, rule: {name: dmgd, lr: 0.1, beta: 0.8, decay: 0.02,
                                         momentum: mlp, momentum_objective: dot, expand: 1.5, seed: 4}}
block:
  - {id: m, op: memory, in: x, level: mem, qk_norm: false, out_proj: false,
     memory: {type: mlp, expand: 2, bias: true}}
"""


def test_compiled_memory_op_equals_plain_loop() -> None:
    torch.manual_seed(0)
    model = compile_spec(Spec.model_validate(yaml.safe_load(OP_SPEC)), dtype=DT)
    op = model.blocks[0].ops["m"]
    with torch.no_grad():
        for p in op.init.values():
            p.normal_(0, 0.4)
    x = torch.randn(1, 8, 4, dtype=DT)
    y, _ = op([x], {}, None)
    w = {n: p.detach() for n, p in op.named_parameters()}
    q, k, v = (x[0] @ w[f"proj.{r}.weight"].T for r in "qkv")
    T = x.shape[1]
    hp = {"lr": torch.full((T,), 0.1, dtype=DT), "beta": torch.full((T,), 0.8, dtype=DT),
          "decay": torch.full((T,), 0.02, dtype=DT)}
    init = {n[len("init."):]: p[0] for n, p in w.items() if n.startswith("init.")}
    expected, _ = plain_dmgd(init, k, v, q, hp, 3, "gelu", "dot", 1.5, 1.0, 4)
    torch.testing.assert_close(y[0], expected, rtol=1e-10, atol=1e-10)
