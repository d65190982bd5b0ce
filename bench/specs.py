"""The benchmarked specs, inline (validated by ``Spec.model_validate``), plus ``models/hope.yaml``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from nestlearn.spec.schema import Spec

ROOT = Path(__file__).resolve().parent.parent
OUTER = {"period": "outer", "rule": {"name": "adamw", "lr": 1.0e-3}}


def titans_memory(dim: int = 512, heads: int = 4, chunk: int = 64) -> dict[str, Any]:
    """One Titans memory op (MLP memory depth 2, momentum with token gates) on embeddings:
    titans-pytorch's ``NeuralMemory(dim, heads, chunk_size)`` configuration."""
    return {
        "nestlearn": 1, "name": "bench-titans-memory",
        "model": {"dim": dim, "depth": 1, "heads": heads, "input": "embeddings"},
        "levels": {
            "outer": OUTER,
            "memory": {"period": chunk, "objective": "l2", "rule": {
                "name": "momentum", "lr": {"gate": "token", "max": 0.1},
                "beta": {"gate": "token", "max": 1.0, "bias": 2.0},
                "decay": {"gate": "token", "max": 0.1, "bias": -2.0}}},
        },
        "block": [{"id": "mem", "op": "memory", "in": "x", "level": "memory",
                   "memory": {"type": "mlp", "depth": 2, "expand": 4.0}}],
    }


def deltanet(dim: int = 512, heads: int = 4, chunk: int = 64) -> dict[str, Any]:
    """DeltaNet's memory (linear, l2, sgd with a token-gated rate, period 1) on embeddings."""
    return {
        "nestlearn": 1, "name": "bench-deltanet",
        "model": {"dim": dim, "depth": 1, "heads": heads, "input": "embeddings"},
        "levels": {
            "outer": OUTER,
            "memory": {"period": 1, "chunk": chunk, "objective": "l2",
                       "rule": {"name": "sgd", "lr": {"gate": "token", "max": 0.5}}},
        },
        "block": [{"id": "mem", "op": "memory", "in": "x", "level": "memory",
                   "memory": {"type": "linear"}, "init": "zeros"}],
    }


def transformer(dim: int = 512, depth: int = 4, heads: int = 4) -> dict[str, Any]:
    """A plain pre-norm GPT: SDPA attention, MLP x4, byte vocabulary."""
    return {
        "nestlearn": 1, "name": "bench-gpt",
        "model": {"vocab": 256, "dim": dim, "depth": depth, "heads": heads},
        "levels": {"outer": OUTER},
        "block": [
            {"id": "n1", "op": "rmsnorm", "in": "x"},
            {"id": "att", "op": "attention", "in": "n1"},
            {"id": "r1", "op": "add", "in": ["x", "att"]},
            {"id": "n2", "op": "rmsnorm", "in": "r1"},
            {"id": "ffn", "op": "mlp", "in": "n2", "expand": 4.0},
            {"id": "out", "op": "add", "in": ["r1", "ffn"]},
        ],
    }


def titans_stack(dim: int = 512, depth: int = 4, heads: int = 4, chunk: int = 64) -> dict[str, Any]:
    """A Titans-like LM (memory op + outer MLP per block): HOPE's skeleton on the dual path."""
    doc = titans_memory(dim, heads, chunk)
    doc["name"] = "bench-titans-stack"
    doc["model"] = {"vocab": 256, "dim": dim, "depth": depth, "heads": heads}
    doc["block"] = [
        {"id": "n1", "op": "rmsnorm", "in": "x"},
        {"id": "mem", "op": "memory", "in": "n1", "level": "memory",
         "memory": {"type": "mlp", "depth": 2, "expand": 1.0}},
        {"id": "r1", "op": "add", "in": ["x", "mem"]},
        {"id": "n2", "op": "rmsnorm", "in": "r1"},
        {"id": "ffn", "op": "mlp", "in": "n2", "expand": 4.0},
        {"id": "out", "op": "add", "in": ["r1", "ffn"]},
    ]
    return doc


def hope(dim: int = 512, depth: int = 4, heads: int = 4, period: int | None = None,
         gen_period: int | None = None) -> dict[str, Any] | None:
    """``models/hope.yaml`` at this size; ``period`` / ``gen_period`` set the self-modifying
    memory's two chunk sizes (main memory / generators) when given."""
    path = ROOT / "models" / "hope.yaml"
    if not path.exists():
        return None
    doc = copy.deepcopy(yaml.safe_load(path.read_text()))
    doc["model"].update({"dim": dim, "depth": depth, "heads": heads})
    if period is not None:
        doc["levels"]["selfmod"]["period"] = period
    if gen_period is not None:
        for node in doc["block"]:
            if node.get("op") == "selfmod":
                node["gen_period"] = gen_period
    return doc  # type: ignore[no-any-return]


def validate(doc: dict[str, Any]) -> Spec:
    return Spec.model_validate(doc)
