"""Guarantee 1: every executor equals the plain token-by-token reference (float64), for
every rule and both objectives, at period 1 and at period C (the mini-batch recurrence)."""

from __future__ import annotations

import zlib

import pytest
import torch
import torchopt

from nestlearn import objectives, rules
from nestlearn.loops import GradMode, MemoryProblem, init_state, run
from nestlearn.memories import LinearMemory, MLPMemory
from tests import reference as ref

B, H, T, D = 2, 2, 9, 3
DT = torch.float64


def make_rule(name: str) -> rules.Rule:
    return {
        "sgd": lambda: rules.sgd(0.0, 0.0),
        "sgd-nodecay": lambda: rules.sgd(0.0, 0.0),
        "momentum": lambda: rules.momentum(0.0, 0.0, 0.0),
        "momentum-nodecay": lambda: rules.momentum(0.0, 0.0, 0.0),
        "adam": lambda: rules.adam(0.05),
        "dgd": lambda: rules.dgd(0.0, 0.0, 0.0),
        "dgd-proj": lambda: rules.dgd(0.0, 0.0, 0.0, proj=0.0),
    }[name]()


def hypers(name: str, g: torch.Generator) -> dict[str, torch.Tensor | float]:
    r = lambda s: torch.rand(B, H, T, generator=g, dtype=DT) * s  # noqa: E731
    if name == "sgd":
        return {"lr": r(0.2), "decay": r(0.1)}
    if name == "sgd-nodecay":  # HOPE's CMS levels: no forgetting (the closed form skips its coefficients)
        return {"lr": r(0.2)}
    if name == "momentum-nodecay":
        return {"lr": r(0.2), "beta": r(0.9), "decay": 0.0}
    if name == "momentum":
        return {"lr": r(0.2), "beta": r(0.9), "decay": r(0.1)}
    if name == "adam":
        return {"lr": 0.05}
    if name == "dgd-proj":  # the projection's own rate up to 1.9: eigenvalues 1 - decay - proj down to -1
        return {"lr": r(0.1), "decay": r(0.1), "beta": r(0.5), "proj": r(1.9)}
    return {"lr": r(0.1), "decay": r(0.1), "beta": r(0.5)}  # larger rates diverge for the MLP


@pytest.mark.parametrize("mem", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["sgd", "sgd-nodecay", "momentum", "momentum-nodecay", "adam", "dgd", "dgd-proj"])
@pytest.mark.parametrize("obj", ["l2", "dot"])
@pytest.mark.parametrize("period", [1, 4])
def test_executors_match_reference(mem: str, rule: str, obj: str, period: int) -> None:
    g = torch.Generator().manual_seed(zlib.crc32(f"{mem}/{rule}/{obj}/{period}".encode()))
    arch = LinearMemory(D, D, H, init_std=0.5) if mem == "linear" else MLPMemory(D, D, H, expand=2)
    init = {n: torch.randn(p.shape, generator=g, dtype=DT) * 0.5 for n, p in arch.init_params().items()}
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=DT) for _ in range(3))
    hp = hypers(rule, g)
    y_ref, w_ref = ref.batched_inner_loop(mem, rule.split("-")[0], obj, init, q, k, v, hp, period)
    r = make_rule(rule)
    pb = MemoryProblem(arch, r, objectives.BUILTIN[obj], q, k, v, hp, period, GradMode())
    for executor in ("sequential", "auto", "scan"):
        y, st = run(pb, init_state(arch, r, init, B), executor)  # type: ignore[arg-type]
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10, msg=f"{executor} outputs")
        for n in w_ref:
            torch.testing.assert_close(st["params"][n], w_ref[n], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mem", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["sgd", "momentum", "adam", "dgd"])
@pytest.mark.parametrize("period", [1, 4])
def test_clip_matches_reference(mem: str, rule: str, period: int) -> None:
    """The level's ``clip`` (each token's inner gradient scaled to at most that norm, all weights
    together) in every executor == the plain reference that clips by hand; outer gradients too."""
    g = torch.Generator().manual_seed(zlib.crc32(f"clip/{mem}/{rule}/{period}".encode()))
    arch = LinearMemory(D, D, H, init_std=0.5) if mem == "linear" else MLPMemory(D, D, H, expand=2)
    init = {n: torch.randn(p.shape, generator=g, dtype=DT) * 0.5 for n, p in arch.init_params().items()}
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=DT) for _ in range(3))
    hp = hypers(rule, g)
    clip = 1.5  # between the smallest and the largest token gradient here: both branches run
    y_ref, w_ref = ref.batched_inner_loop(mem, rule, "l2", init, q, k, v, hp, period, clip=clip)
    y_free, _ = ref.batched_inner_loop(mem, rule, "l2", init, q, k, v, hp, period)
    assert not torch.allclose(y_free, y_ref), "the clip must be active in this test"
    r = make_rule(rule)
    grads = {}
    for executor in ("sequential", "auto", "scan"):
        kk = k.clone().requires_grad_()
        pb = MemoryProblem(arch, r, objectives.l2, q, kk, v, hp, period, GradMode(), clip=clip)
        y, st = run(pb, init_state(arch, r, init, B), executor)  # type: ignore[arg-type]
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10, msg=f"{executor} outputs")
        for n in w_ref:
            torch.testing.assert_close(st["params"][n], w_ref[n], rtol=1e-9, atol=1e-10)
        (grads[executor],) = torch.autograd.grad(y.pow(2).sum(), kk)
    torch.testing.assert_close(grads["auto"], grads["sequential"], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(grads["scan"], grads["sequential"], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mem", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["sgd", "momentum", "dgd"])
@pytest.mark.parametrize("period,clip", [(1, None), (4, None), (4, 1.5)])
def test_max_gain_matches_reference(mem: str, rule: str, period: int, clip: float | None) -> None:
    """The level's ``max_gain`` (each token's inner gradient scaled so that its chunk gain,
    ``S lr c`` with ``c`` the memory's curvature along the token's error, is at most that; after
    the clip where there is one) in every executor == the plain reference that caps by hand;
    outer gradients (through the cap: it depends on the keys, values and rates) too."""
    g = torch.Generator().manual_seed(zlib.crc32(f"max_gain/{mem}/{rule}/{period}/{clip}".encode()))
    arch = LinearMemory(D, D, H, init_std=0.5) if mem == "linear" else MLPMemory(D, D, H, expand=2)
    init = {n: torch.randn(p.shape, generator=g, dtype=DT) * 0.5 for n, p in arch.init_params().items()}
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=DT) for _ in range(3))
    hp = hypers(rule, g)
    steps, cap = 2.5, 0.05  # an arbitrary S; a cap that binds here (asserted below)
    y_ref, w_ref = ref.batched_inner_loop(mem, rule, "l2", init, q, k, v, hp, period, clip=clip,
                                          max_gain=cap, steps=steps)
    y_free, _ = ref.batched_inner_loop(mem, rule, "l2", init, q, k, v, hp, period, clip=clip)
    assert not torch.allclose(y_free, y_ref), "the cap must be active in this test"
    r = make_rule(rule)
    grads = {}
    for executor in ("sequential", "auto", "scan"):
        kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
        lr = hp["lr"].clone().requires_grad_()  # type: ignore[union-attr]
        pb = MemoryProblem(arch, r, objectives.l2, q, kk, vv, {**hp, "lr": lr}, period, GradMode(), clip=clip,
                           max_gain=cap, gain_steps=steps)
        y, st = run(pb, init_state(arch, r, init, B), executor)  # type: ignore[arg-type]
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10, msg=f"{executor} outputs")
        for n in w_ref:
            torch.testing.assert_close(st["params"][n], w_ref[n], rtol=1e-9, atol=1e-10)
        grads[executor] = torch.autograd.grad(y.pow(2).sum(), (kk, vv, lr))
    for executor in ("auto", "scan"):
        for got, want in zip(grads[executor], grads["sequential"]):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("period", [1, 3])
def test_torchopt_rule_matches_torchopt_directly(period: int) -> None:
    """A torchopt transformation as the inner rule == applying torchopt by hand."""
    g = torch.Generator().manual_seed(3)
    arch = LinearMemory(D, D, H, init_std=0.5)
    init = {"W": torch.randn(H, D, D, generator=g, dtype=DT)}
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=DT) for _ in range(3))
    tx = torchopt.adam(0.05)
    r = rules.from_torchopt(torchopt.adam(0.05))
    pb = MemoryProblem(arch, r, objectives.l2, q, k, v, {}, period, GradMode())
    for executor in ("sequential", "scan"):
        y, st = run(pb, init_state(arch, r, init, B), executor)  # type: ignore[arg-type]
        # by hand: torchopt on the batched weights, per-(b, h) gradients from the plain loss
        W = init["W"].unsqueeze(0).expand(B, H, D, D).clone()
        opt_state = tx.init({"W": W})
        anchor = W
        ys = []
        for t in range(T):
            if t % period == 0:
                anchor = W.clone().requires_grad_()
            loss = ((torch.einsum("bhoi,bhi->bho", anchor, k[:, :, t]) - v[:, :, t]) ** 2).sum()
            (gw,) = torch.autograd.grad(loss, anchor)
            upd, opt_state = tx.update({"W": gw}, opt_state, params={"W": W}, inplace=False)
            W = W + upd["W"]
            ys.append(torch.einsum("bhoi,bhi->bho", W, q[:, :, t]))
        torch.testing.assert_close(y, torch.stack(ys, 2), rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(st["params"]["W"], W, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("momentum", [False, True])
def test_no_forgetting_coefficients_equal_a_zero_decay_to_the_bit(momentum: bool) -> None:
    """``dual.coefficients`` without a decay (the rule forgets nothing) skips the ``n x n``
    forgetting products; what it returns must be what a decay of exactly 0 gives."""
    from nestlearn.loops.dual import coefficients

    g = torch.Generator().manual_seed(3)
    lr = torch.rand(2, 3, 5, 16, generator=g, dtype=DT)
    beta = torch.rand(2, 3, 5, 16, generator=g, dtype=DT) if momentum else None
    general = coefficients(lr, beta, torch.zeros_like(lr))
    skipped = coefficients(lr, beta, None)
    assert general.keys() == skipped.keys()
    for name in general:
        assert torch.equal(general[name], skipped[name]), name
