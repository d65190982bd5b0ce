"""DGD's projection rate ``proj``, apart from its gradient step's ``lr``:
``W <- W((1 - decay) I - proj u u^T) - lr m``. The executors' exactness with it is in
tests/test_executors.py (against the plain reference, ``dgd-proj``) and tests/test_dgd_dual.py
(outer gradients, ``proj`` included). Here: HOPE's self-modifying memory generating it, the
spec's identity and the Triton kernel declining it."""

from __future__ import annotations

import torch

import nestlearn
from nestlearn import objectives, rules
from nestlearn.compile import compile_spec
from nestlearn.loops import GradMode, MemoryProblem
from nestlearn.memories import MLPMemory

DT = torch.float64
SMALL = ["model.dim=16", "model.depth=1", "model.heads=2", "levels.cms_mid.period=32", "levels.cms_slow.period=64"]


def selfmod_output(*overrides: str, executor: str = "auto") -> torch.Tensor:
    spec = nestlearn.load_spec("models/hope.yaml", overrides=[*SMALL, *overrides])
    torch.manual_seed(0)
    model = compile_spec(spec, dtype=DT)
    op = model.blocks[0].ops["sm"]
    op.level.executor = executor
    x = torch.randn(2, 40, 16, dtype=DT, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, _ = op([x], {}, None)
    return y


def test_selfmod_generates_proj_with_lrs_gate() -> None:
    """``proj`` at lr's maximum is the paper's DGD exactly; a larger maximum changes the output,
    and the closed form still equals the token-by-token executor."""
    base = selfmod_output()
    same = selfmod_output("levels.selfmod.rule.proj={gate: token, max: 0.002}")
    torch.testing.assert_close(same, base, rtol=1e-12, atol=1e-12)
    wide = selfmod_output("levels.selfmod.rule.proj={gate: token, max: 1.9}")
    assert (wide - base).abs().max() > 1e-4
    seq = selfmod_output("levels.selfmod.rule.proj={gate: token, max: 1.9}", executor="sequential")
    torch.testing.assert_close(wide, seq, rtol=1e-9, atol=1e-10)


def test_spec_identity_leaves_an_absent_proj_out() -> None:
    from nestlearn.train.checkpoint import spec_data, spec_hash

    plain = nestlearn.load_spec("models/hope.yaml")
    assert "proj" not in spec_data(plain)["levels"]["selfmod"]["rule"]
    given = nestlearn.load_spec("models/hope.yaml", overrides=["levels.selfmod.rule.proj={gate: token, max: 2.0}"])
    assert spec_data(given)["levels"]["selfmod"]["rule"]["proj"]["max"] == 2.0
    assert spec_hash(given) != spec_hash(plain)
    assert "proj" not in nestlearn.compile(plain).levels["selfmod"].rule.hypers


def test_the_triton_kernel_declines_a_separate_proj() -> None:
    from nestlearn.loops import dgd_triton

    x = torch.randn(1, 2, 32, 16)
    arch = MLPMemory(16, 16, 2, expand=1, depth=2, act="gelu", residual=True, bias=False)
    hp = {"lr": torch.full((1, 2, 32), 0.01), "beta": 0.9}

    def pb(rule: rules.Rule, extra: dict[str, torch.Tensor]) -> MemoryProblem:
        return MemoryProblem(arch, rule, objectives.l2, x, x, x, {**hp, **extra}, 16, GradMode("unroll"))

    assert dgd_triton._shape_ok(pb(rules.dgd(0.0, 0.0, 0.0), {}))
    assert not dgd_triton._shape_ok(pb(rules.dgd(0.0, 0.0, 0.0, proj=0.0), {"proj": torch.full((1, 2, 32), 1.5)}))
