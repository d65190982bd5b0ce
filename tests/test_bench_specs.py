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


def test_whole_spec_rows_train_as_nestlearn_run_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``bf16-amp`` row (every whole-spec row on CUDA) keeps fp32 weights and runs the forward
    under bf16 autocast, as ``nestlearn run`` trains: ``loops.run`` then hands the executors fp32
    problems and HOPE's levels take their fp32 kernels (bf16 weights had sent them to the bf16
    closed forms). On the CPU through CPU autocast, seen where the memory ops call ``loops.run``."""
    import sys

    from bench.run import compiled_step

    memory_op = sys.modules["nestlearn.compile.memory_op"]
    compile_pkg = sys.modules["nestlearn.compile"]
    seen: list[torch.dtype | None] = []
    models: list[torch.nn.Module] = []
    real_compile, real_run = compile_pkg.compile_spec, memory_op.run

    def spy_compile(*a: object, **kw: object) -> torch.nn.Module:
        models.append(real_compile(*a, **kw))
        return models[-1]

    def spy_run(*a: object, **kw: object) -> object:
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real_run(*a, **kw)

    monkeypatch.setattr(compile_pkg, "compile_spec", spy_compile)
    monkeypatch.setattr(memory_op, "run", spy_run)
    doc = specs.hope(32, 1, 2)
    assert doc is not None
    doc["levels"]["cms_mid"]["period"], doc["levels"]["cms_slow"]["period"] = 32, 64
    compiled_step(doc, 1, 64, "bf16-amp", torch.device("cpu"))()()
    assert models and all(p.dtype == torch.float32 for p in models[0].parameters())
    assert seen == [torch.bfloat16] * 3  # c1, c2, c3 under bf16 autocast
