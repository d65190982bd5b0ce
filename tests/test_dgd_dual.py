"""The closed-form DGD chunk executor (loops/dgd_dual.py) against the token-by-token
executor, which tests/test_executors.py checks against the plain reference: outputs, final
weights and momentum, outer gradients through every input, grad modes, state in pieces."""

from __future__ import annotations

import pytest
import torch

from nestlearn import objectives, rules
from nestlearn.loops import GradMode, MemoryProblem, init_state, run
from nestlearn.loops.dgd_dual import supports
from nestlearn.memories import LinearMemory, MLPMemory

B, H, T, D = 2, 2, 11, 4
DT = torch.float64


def problem(mem: str, period: int, grad: str = "unroll", seed: int = 0, proj: bool = False):
    g = torch.Generator().manual_seed(seed)
    arch = (LinearMemory(D, D, H, init_std=0.5, bias=True) if mem == "linear"
            else MLPMemory(D, D, H, expand=2, residual=True, bias=True))
    init = {n: (torch.randn(p.shape, generator=g, dtype=DT) * 0.4).requires_grad_()
            for n, p in arch.init_params().items()}
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=DT).requires_grad_() for _ in range(3))
    hp = {"lr": (torch.rand(B, H, T, generator=g, dtype=DT) * 0.1).requires_grad_(),
          "decay": (torch.rand(B, H, T, generator=g, dtype=DT) * 0.1).requires_grad_(),
          "beta": (torch.rand(B, H, T, generator=g, dtype=DT) * 0.9).requires_grad_()}
    if proj:  # the projection's own rate, up to 1.9 (negative eigenvalues along the input)
        hp["proj"] = (torch.rand(B, H, T, generator=g, dtype=DT) * 1.9).requires_grad_()
    rule = rules.dgd(0.0, 0.0, 0.0, proj=0.0 if proj else None)
    pb = MemoryProblem(arch, rule, objectives.l2, q, k, v, hp, period, GradMode.parse(grad))
    leaves = [*init.values(), q, k, v, *hp.values()]
    return pb, init, leaves


def run_all(pb: MemoryProblem, init: dict, executor: str):
    st = init_state(pb.arch, pb.rule, init, B)
    y, st = run(pb, st, executor)  # type: ignore[arg-type]
    return y, st


@pytest.mark.parametrize("mem", ["linear", "mlp"])
@pytest.mark.parametrize("period", [1, 4, T])
@pytest.mark.parametrize("grad", ["unroll", "first_order", "truncate:2", "stop"])
@pytest.mark.parametrize("proj", [False, True])
def test_dgd_dual_equals_sequential(mem: str, period: int, grad: str, proj: bool) -> None:
    """Outputs, final weights and momentum, and every outer gradient (the rates', ``proj``'s
    included where the rule has its own projection rate)."""
    pb, init, leaves = problem(mem, period, grad, proj=proj)
    assert supports(pb)
    outs = {}
    for ex in ("sequential", "auto"):
        y, st = run_all(pb, init, ex)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
        loss = (y * w).sum() + sum((p * p).sum() for p in st["params"].values())
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        outs[ex] = (y, st, grads)
    (y0, s0, g0), (y1, s1, g1) = outs["sequential"], outs["auto"]
    torch.testing.assert_close(y1, y0, rtol=1e-9, atol=1e-11)
    for n in s0["params"]:
        torch.testing.assert_close(s1["params"][n], s0["params"][n], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(s1["opt"]["m"][n], s0["opt"]["m"][n], rtol=1e-9, atol=1e-11)
    for a, b in zip(g0, g1):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
        else:
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("cuts", [[3, 9], [1, 2, 7], [5]])
def test_dgd_dual_in_pieces_equals_one_call(cuts: list[int]) -> None:
    pb, init, _ = problem("mlp", 4)
    y_full, st_full = run_all(pb, init, "auto")
    st = init_state(pb.arch, pb.rule, init, B)
    ys, bounds = [], [0, *cuts, T]
    for t0, t1 in zip(bounds[:-1], bounds[1:]):
        sl = slice(t0, t1)
        part = MemoryProblem(pb.arch, pb.rule, pb.objective, pb.q[:, :, sl], pb.k[:, :, sl], pb.v[:, :, sl],
                             {n: h[..., sl] for n, h in pb.hp.items()}, pb.period, pb.grad)
        y, st = run(part, st)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 2), y_full, rtol=1e-10, atol=1e-12)
    for n in st["params"]:
        torch.testing.assert_close(st["params"][n], st_full["params"][n], rtol=1e-10, atol=1e-12)


def test_constant_hypers_and_no_momentum() -> None:
    """Float hyper-parameters (HOPE's constant beta) and beta = 0 take the same path."""
    pb, init, _ = problem("mlp", 4)
    for hp in ({"lr": 0.05, "decay": 0.02, "beta": 0.9}, {"lr": 0.05, "decay": 0.0, "beta": 0.0}):
        one = MemoryProblem(pb.arch, pb.rule, pb.objective, pb.q, pb.k, pb.v, hp, 4, pb.grad)
        y0, s0 = run_all(one, init, "sequential")
        y1, s1 = run_all(one, init, "auto")
        torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-12)
        for n in s0["params"]:
            torch.testing.assert_close(s1["params"][n], s0["params"][n], rtol=1e-10, atol=1e-12)


def test_inner_loop_runs_in_fp32_under_autocast() -> None:
    """bf16 autocast around the model leaves the inner loop in fp32: same result as without."""
    pb, init, _ = problem("mlp", 4)
    f32 = MemoryProblem(pb.arch, pb.rule, pb.objective, pb.q.detach().float(), pb.k.detach().float(),
                        pb.v.detach().float(), {n: h.detach().float() for n, h in pb.hp.items()}, 4, pb.grad)
    init32 = {n: p.detach().float() for n, p in init.items()}
    y_ref, st_ref = run(f32, init_state(pb.arch, pb.rule, init32, B))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, st = run(f32, init_state(pb.arch, pb.rule, init32, B))
    assert y.dtype == torch.float32 and all(p.dtype == torch.float32 for p in st["params"].values())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
