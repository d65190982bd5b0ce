"""The benchmark's Titans specs stay finite (outputs and fwd+bwd gradients) with the gates the
bench uses, and the hand-written baseline (bench/handwritten.py) computes the compiled model's
function."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench import specs
from bench.handwritten import HandTitans
from bench.run import _randomise_gates
from nestlearn.compile import compile_spec


def _build(doc: dict, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = compile_spec(specs.validate(doc)).to(dtype=dtype)
    _randomise_gates(model)  # as bench/run.py::compiled_step
    return model


def _assert_finite_grads(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert p.grad.isfinite().all(), name


def test_titans_gates_follow_titans_pytorch_defaults() -> None:
    for chunk in (16, 64):
        g = specs.titans_gates(chunk)
        assert g["lr"] == {"gate": "token", "max": 1.0 / 128}  # max_lr 1.0 on a loss averaged over 128 features
        assert g["beta"]["gate"] == g["decay"]["gate"] == "chunk"
        assert g["beta"]["max"] == g["decay"]["max"] == 1.0 and g["beta"].get("bias", 0.0) == 0.0
        decay = 1.0 / (1.0 + math.exp(-g["decay"]["bias"]))
        assert (1.0 - decay) ** chunk == pytest.approx(0.5)  # retention 0.5 per chunk at the start


def test_titans_memory_stays_finite() -> None:
    # the former gates (lr max 0.1, per-token beta max 1 bias 2, decay max 0.1 bias -2) went to NaN here
    model = _build(specs.titans_memory(64, 4, 16))
    x = torch.randn(2, 1024, 64, generator=torch.Generator().manual_seed(1))
    y = model(x)[0]
    assert y.isfinite().all()
    y.square().mean().backward()
    _assert_finite_grads(model)


def test_titans_stack_stays_finite() -> None:
    model = _build(specs.titans_stack(64, 4, 4, 16))
    tok = torch.randint(0, 256, (1, 1025), generator=torch.Generator().manual_seed(1))
    logits = model(tok[:, :-1])[0]
    assert logits.isfinite().all()
    F.cross_entropy(logits.flatten(0, 1), tok[:, 1:].flatten()).backward()
    _assert_finite_grads(model)


@pytest.mark.parametrize("gate", ["chunk", "token"])  # the bench's beta/decay gates, and per-token ones
@pytest.mark.parametrize("t", [128, 70])  # whole chunks, and a partial last chunk
def test_handwritten_equals_compiled(t: int, gate: str) -> None:
    doc = specs.titans_memory(32, 4, 16)
    for name in ("beta", "decay"):
        doc["levels"]["memory"]["rule"][name]["gate"] = gate
    model = _build(doc, torch.float64)
    x = torch.randn(2, t, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    y, y_hand = model(x)[0], HandTitans(model)(x)
    assert (y - y_hand).abs().max().item() < 1e-10
    grads = torch.autograd.grad(y.square().mean(), params)
    grads_hand = torch.autograd.grad(y_hand.square().mean(), params)
    for g, gh in zip(grads, grads_hand):
        assert (g - gh).abs().max().item() < 1e-10
