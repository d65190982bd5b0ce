"""``dual.compile_chunk_steps``: HOPE's DGD chunk step through torch.compile == eager."""

from __future__ import annotations

from pathlib import Path

import torch

import nestlearn
from nestlearn.loops import dgd_dual, dual

HOPE = Path(__file__).resolve().parents[1] / "models" / "hope.yaml"


def test_hope_with_compiled_chunk_steps_equals_eager() -> None:
    torch.manual_seed(0)
    model = nestlearn.compile(HOPE, ["model.dim=32", "model.depth=1", "model.heads=2"])
    x = torch.randint(0, 256, (1, 80))
    params = [p for p in model.parameters() if p.requires_grad]
    y0 = model(x)[0]
    g0 = torch.autograd.grad(y0.square().mean(), params, allow_unused=True)
    dual.compile_chunk_steps(True)
    try:
        calls: list[int] = []
        real = dgd_dual.compiled_segment
        assert real is not None
        dgd_dual.compiled_segment = lambda *a: calls.append(1) or real(*a)
        y1 = model(x)[0]
        g1 = torch.autograd.grad(y1.square().mean(), params, allow_unused=True)
    finally:
        dual.compile_chunk_steps(False)
    assert calls, "the DGD executor did not take the compiled step"
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    assert dual._compiled_segment is None and dgd_dual.compiled_segment is None
