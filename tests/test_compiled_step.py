"""``CompiledModel.compile_chunk_steps`` / ``MemoryProblem.compiled``: HOPE's DGD chunk step
through torch.compile == eager; off by default."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import nestlearn
from nestlearn.loops import chunks, dgd_dual, dual

HOPE = Path(__file__).resolve().parents[1] / "models" / "hope.yaml"


def test_hope_with_compiled_chunk_steps_equals_eager() -> None:
    torch.manual_seed(0)
    model = nestlearn.compile(HOPE, ["model.dim=32", "model.depth=1", "model.heads=2"])
    x = torch.randint(0, 256, (1, 80))
    params = [p for p in model.parameters() if p.requires_grad]
    assert not any(lv.compile_chunk_steps for lv in model.levels.values())  # off by default
    y0 = model(x)[0]
    g0 = torch.autograd.grad(y0.square().mean(), params, allow_unused=True)
    model.compile_chunk_steps(True)
    assert not model.levels["outer"].compile_chunk_steps and model.levels["selfmod"].compile_chunk_steps
    calls: list[int] = []
    real = chunks.compiled

    def counting(eager: Any) -> Any:  # count the compiled DGD step's calls
        fn = real(eager)
        return (lambda *a: calls.append(1) or fn(*a)) if eager is dgd_dual._segment else fn

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunks, "compiled", counting)
        y1 = model(x)[0]
        g1 = torch.autograd.grad(y1.square().mean(), params, allow_unused=True)
    assert calls, "the DGD executor did not take the compiled step"
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    model.compile_chunk_steps(False)
    assert not any(lv.compile_chunk_steps for lv in model.levels.values())


def test_untraceable_steps_stay_eager_and_exact() -> None:
    """A user objective (its inner grad would lose its graph under dynamo) and a memory without
    an explicit backward (TTT) keep the eager step: same outputs and gradients as sequential."""
    from nestlearn import objectives, rules
    from nestlearn.loops import GradMode, MemoryProblem, init_state, run
    from nestlearn.memories import LinearMemory

    torch.manual_seed(0)
    dt = torch.float64
    arch = LinearMemory(3, 3, 1, init_std=0.5)
    init = {n: (torch.randn(p.shape, dtype=dt) * 0.5).requires_grad_() for n, p in arch.init_params().items()}
    q, k, v = (torch.randn(1, 1, 8, 3, dtype=dt, requires_grad=True) for _ in range(3))
    user_objective = lambda p, t: (p - t).pow(4)  # noqa: E731
    pb = MemoryProblem(arch, rules.sgd(0.05, 0.0), user_objective, q, k, v, {"lr": 0.05}, 4, GradMode())
    assert not chunks.traceable_step(pb)
    assert chunks.traceable_step(MemoryProblem(arch, pb.rule, objectives.BUILTIN["l2"], q, k, v, {}, 4, GradMode()))
    leaves = [q, k, v, *init.values()]

    def go(executor: str = "auto") -> list[torch.Tensor]:
        y, _ = run(pb, init_state(arch, pb.rule, init, 1), executor)  # type: ignore[arg-type]
        return [y, *torch.autograd.grad(y.sum(), leaves)]

    ref = go("sequential")
    pb = replace(pb, compiled=True)
    assert chunks.chunk_step(pb, dual._segment) is dual._segment  # asked for, but not traceable: eager
    got = go()
    ttt = nestlearn.compile(Path(__file__).resolve().parents[1] / "specs" / "ttt-linear.yaml",
                            ["model.dim=16", "model.depth=1", "model.heads=2"])
    ttt.compile_chunk_steps(True)
    ttt(torch.randint(0, 256, (1, 40)))[0].sum().backward()  # runs (was: an error inside the step)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
