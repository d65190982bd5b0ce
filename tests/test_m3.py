"""M3 (multi-scale momentum Muon, Nested Learning Sec. 7.2, Alg. 1) against a plain reference.

The reference below is written from the equations, per sequence and per head, with its own
Newton-Schulz; with no slow scale (or a zero slow weight) M3 is the ``muon`` rule exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import nestlearn
from nestlearn import objectives
from nestlearn.loops import GradMode, MemoryProblem, init_state, run
from nestlearn.memories import MLPMemory
from nestlearn.spec.schema import M3Rule
from tests import reference as ref

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def plain_m3(
    init: dict[str, Tensor], k: Tensor, v: Tensor, q: Tensor, hp: dict[str, Tensor], period: int,
    every: list[int], slow_beta: float, b1: float, b2: float | None, b3: float, eps: float, ns_steps: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A residual MLP memory ``x + W1 gelu(W0 x + b0) + b1`` on the l2 objective in mini-batches of
    ``period`` tokens, trained by M3. Steps t = 1..T, O = NS for matrices, identity for vectors:

        M1 = beta_t M1 + b1 g_t;   V = V + b2 g_t^2
        W  = W - lr_t (O(M1) + alpha_t sum_s O_s) / (sqrt(V) + eps)      (denominator 1 without b2)
        then for each slow scale s: A_s += g_t; if t % C_s == 0:
            M_s = slow_beta M_s + b3 A_s;  O_s = O(M_s);  A_s = 0
    """

    def mem(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return x + p["W1"] @ F.gelu(p["W0"] @ x + p["b0"]) + p["bias1"]

    def ortho(x: Tensor) -> Tensor:
        return ref.newton_schulz5(x, ns_steps) if x.dim() == 2 else x

    W = {("bias1" if n == "b1" else n): w.clone() for n, w in init.items()}
    M1 = {n: torch.zeros_like(w) for n, w in W.items()}
    V = {n: torch.zeros_like(w) for n, w in W.items()}
    slow = [{n: {"A": torch.zeros_like(w), "M": torch.zeros_like(w), "O": torch.zeros_like(w)} for n, w in W.items()}
            for _ in every]
    ys, anchor = [], W
    for i in range(k.shape[0]):
        t = i + 1
        if i % period == 0:
            anchor = {n: w.detach().clone().requires_grad_() for n, w in W.items()}
        loss = ((mem(anchor, k[i]) - v[i]) ** 2).sum()
        names = list(anchor)
        grads = dict(zip(names, torch.autograd.grad(loss, [anchor[n] for n in names])))
        lr, beta, alpha = hp["lr"][i], hp["beta"][i], hp["alpha"][i]
        for n in W:
            g = grads[n]
            M1[n] = beta * M1[n] + b1 * g
            update = ortho(M1[n])
            if every:
                update = update + alpha * sum(s[n]["O"] for s in slow)
            if b2 is not None:
                V[n] = V[n] + b2 * g * g
                update = update / (V[n].sqrt() + eps)
            W[n] = W[n] - lr * update
            for s, C in zip(slow, every):
                s[n]["A"] = s[n]["A"] + g
                if t % C == 0:
                    s[n]["M"] = slow_beta * s[n]["M"] + b3 * s[n]["A"]
                    s[n]["O"] = ortho(s[n]["M"])
                    s[n]["A"] = torch.zeros_like(g)
        ys.append(mem(W, q[i]).detach())
    return torch.stack(ys), {("b1" if n == "bias1" else n): w for n, w in W.items()}


def _problem(seed: int) -> tuple[MLPMemory, dict[str, Tensor], Tensor, Tensor, Tensor, dict[str, Tensor]]:
    torch.manual_seed(seed)
    B, H, T, d = 2, 2, 13, 3
    arch = MLPMemory(d, d, H, expand=2, bias=True)  # W0: 6x3 (tall), W1: 3x6 (wide), b0, b1
    init = {n: p + 0.1 * torch.randn_like(p) for n, p in arch.init_params(DT).items()}
    q, k, v = (torch.randn(B, H, T, d, dtype=DT) for _ in range(3))
    k = F.normalize(k, dim=-1)
    hp = {"lr": 0.01 + 0.02 * torch.rand(B, H, T, dtype=DT), "beta": 0.8 + 0.15 * torch.rand(B, H, T, dtype=DT),
          "alpha": 0.3 + torch.rand(B, H, T, dtype=DT)}
    return arch, init, q, k, v, hp


CONFIGS = {
    # two slow scales, decaying momenta, gains and the second moment
    "general": dict(every=[3, 5], slow_beta=0.9, b1=0.7, b2=0.3, b3=0.5, eps=1e-3, ns_steps=5),
    # Algorithm 1 as printed: running sums (beta = slow_beta = 1; beta_t overridden below), one slow scale
    "algorithm1": dict(every=[4], slow_beta=1.0, b1=0.9, b2=0.999, b3=0.9, eps=1e-8, ns_steps=5),
    # no second moment, a slow scale every step
    "no_v": dict(every=[1], slow_beta=0.5, b1=1.0, b2=None, b3=1.0, eps=1e-8, ns_steps=3),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("period", [1, 4])
@pytest.mark.parametrize("executor", ["sequential", "chunked"])
def test_m3_equals_plain_loop(config: str, period: int, executor: str) -> None:
    cfg = CONFIGS[config]
    arch, init, q, k, v, hp = _problem(3)
    if config == "algorithm1":
        hp["beta"] = torch.ones_like(hp["beta"])
    rule = nestlearn.rules.m3(**cfg)  # type: ignore[arg-type]
    state = init_state(arch, rule, init, q.shape[0])
    ys = []
    for t0, t1 in ((0, 7), (7, 13)):  # fed in two calls with the carried state
        sl = slice(t0, t1)
        pb = MemoryProblem(arch, rule, objectives.l2, q[:, :, sl], k[:, :, sl], v[:, :, sl],
                           {n: h[..., sl] for n, h in hp.items()}, period, GradMode())
        y, state = run(pb, state, executor)
        ys.append(y)
    y = torch.cat(ys, 2)
    assert state["opt"]["t"] == 13
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            ref_y, ref_w = plain_m3({n: p[h] for n, p in init.items()}, k[b, h], v[b, h], q[b, h],
                                    {n: x[b, h] for n, x in hp.items()}, period, **cfg)  # type: ignore[arg-type]
            torch.testing.assert_close(y[b, h], ref_y, rtol=1e-10, atol=1e-10)
            for n, w in ref_w.items():
                torch.testing.assert_close(state["params"][n][b, h], w, rtol=1e-10, atol=1e-10)


def _trajectory(rule: nestlearn.rules.Rule, period: int) -> tuple[Tensor, dict[str, Tensor]]:
    arch, init, q, k, v, hp = _problem(4)
    hp = {n: h for n, h in hp.items() if n != "alpha"}  # per-token lr and beta; alpha: the rule's constant
    state = init_state(arch, rule, init, q.shape[0])
    pb = MemoryProblem(arch, rule, objectives.l2, q, k, v, hp, period, GradMode())
    y, state = run(pb, state, "chunked")
    return y, state["params"]


@pytest.mark.parametrize("period", [1, 4])
def test_one_momentum_scale_is_muon_exactly(period: int) -> None:
    y_muon, w_muon = _trajectory(nestlearn.rules.muon(ns_steps=5), period)
    y_m3, w_m3 = _trajectory(nestlearn.rules.m3(every=()), period)
    assert torch.equal(y_m3, y_muon)
    assert all(torch.equal(w_m3[n], w_muon[n]) for n in w_muon)
    # slow scales present but weighted by zero: still muon, bit for bit
    y_zero, _ = _trajectory(nestlearn.rules.m3(alpha=0.0, every=(2, 3), slow_beta=0.9), period)
    assert torch.equal(y_zero, y_muon)
    # and a non-zero weight does change the trajectory
    y_slow, _ = _trajectory(nestlearn.rules.m3(alpha=0.5, every=(2,)), period)
    assert (y_slow - y_muon).abs().max() > 1e-6


def test_slow_term_is_stale_by_one_chunk_as_in_algorithm_1() -> None:
    """The slow momentum is zero for the whole first chunk (steps 1..C) and, from step C + 1,
    is the orthogonalised sum of g_1..g_C: the first C steps are muon's, step C + 1 is not."""
    C = 3
    y_muon, _ = _trajectory(nestlearn.rules.muon(), 1)
    y_m3, _ = _trajectory(nestlearn.rules.m3(alpha=1.0, every=(C,)), 1)
    assert torch.equal(y_m3[:, :, :C], y_muon[:, :, :C])
    assert (y_m3[:, :, C] - y_muon[:, :, C]).abs().max() > 1e-6


def test_m3_spec_entry_and_constructor() -> None:
    spec = M3Rule.model_validate({"name": "m3", "every": 64, "b2": 0.99, "alpha": {"learned": 0.5}})
    assert spec.every == [64]
    r = nestlearn.rules.from_spec(spec)
    assert isinstance(r, nestlearn.rules.M3) and r.every == (64,) and r.b2 == 0.99
    assert set(r.hypers) == {"lr", "beta", "alpha"}
    assert "m3(" in r.describe() and "every=[64]" in r.describe()
    for bad in ({"every": [0]}, {"b2": 0.0}, {"ns_steps": 0}, {"slow_beta": 1.5}, {"typo": 1}):
        with pytest.raises(ValueError):
            M3Rule.model_validate({"name": "m3", **bad})


def test_m3_spec_compiles_and_trains() -> None:
    path = ROOT / "specs" / "m3-memory.yaml"
    spec = nestlearn.load_spec(path)
    assert isinstance(spec.levels["memory"].rule, M3Rule)
    spec = nestlearn.load_spec(path, overrides=["model.dim=16", "model.depth=2", "model.heads=2",
                                                "levels.memory.period=4", "levels.memory.rule.every=[3, 8]"])
    torch.manual_seed(0)
    model = nestlearn.compile(spec, dtype=DT)
    assert isinstance(model.levels["memory"].rule, nestlearn.rules.M3)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, _ = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
