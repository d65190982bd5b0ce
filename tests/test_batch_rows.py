"""Every rule x memory type x executor at batch > 1: a batched call equals the per-row calls
(each sequence's inner loop is its own; nothing may broadcast across the batch)."""

from __future__ import annotations

import pytest
import torch

import nestlearn
import nestlearn.rules
from nestlearn.compile.model import CompiledModel
from nestlearn.spec import schema
from nestlearn.spec.document import load_document
from nestlearn.spec.messages import validate_document

B, T, DIM, HEADS = 3, 10, 8, 2
RULES: dict[str, dict[str, object]] = {
    "sgd": {"lr": {"gate": "token", "max": 0.1}},
    "momentum": {"lr": {"gate": "token", "max": 0.1}, "decay": {"gate": "chunk", "max": 0.05}},
    "adam": {"lr": 0.01, "eps_root": 1e-8},
    "adamw": {"lr": 0.01, "eps_root": 1e-8},
    "dgd": {"lr": {"gate": "token", "max": 0.1}, "beta": 0.5, "decay": {"gate": "token", "max": 0.05}},
    "dmgd": {"lr": 0.1, "beta": 0.9, "expand": 1.0},
    "muon": {"lr": 0.02},
    "m3": {"lr": 0.02, "every": [2]},
    "torchopt": {"fn": "sgd", "args": {"lr": 0.05}},
}
MEMORIES = ["linear", "mlp", "ttt-linear", "ttt-mlp"]
EXECUTORS = ["auto", "sequential", "chunked", "scan"]


def test_every_rule_and_memory_is_covered() -> None:
    assert set(RULES) == set(nestlearn.rules.RULES)
    mem_types = schema.MemorySpec.model_fields["type"].annotation.__args__  # type: ignore[union-attr]
    assert set(MEMORIES) == set(mem_types)


def build(rule: str, memory: str) -> CompiledModel:
    doc = {
        "nestlearn": 1, "name": f"{rule}-{memory}",
        "model": {"vocab": 32, "dim": DIM, "depth": 1, "heads": HEADS},
        "levels": {"outer": {"period": "outer", "rule": {"name": "adamw"}},
                   "memory": {"period": 4, "objective": "l2", "rule": {"name": rule, **RULES[rule]}}},
        "block": [{"id": "mem", "op": "memory", "in": "x", "level": "memory", "memory": {"type": memory}}],
    }
    _, smap = load_document("{}")
    spec = validate_document(doc, smap)
    torch.manual_seed(0)
    return nestlearn.compile(spec).double()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 32, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("rule", sorted(RULES))
def test_batch_equals_rows(rule: str, memory: str, tokens: torch.Tensor) -> None:
    model = build(rule, memory)
    for executor in EXECUTORS:
        model.set_executor(executor)
        with torch.no_grad():
            whole, _ = model(tokens)
            rows = torch.cat([model(tokens[i:i + 1])[0] for i in range(B)])
        torch.testing.assert_close(whole, rows, rtol=1e-9, atol=1e-10, msg=lambda m, e=executor: f"{e}: {m}")
