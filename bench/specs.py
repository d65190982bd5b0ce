"""The benchmarked specs, inline (validated by ``Spec.model_validate``), plus ``models/hope.yaml``."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

from nestlearn.spec.schema import Spec

ROOT = Path(__file__).resolve().parent.parent
OUTER = {"period": "outer", "rule": {"name": "adamw", "lr": 1.0e-3}}


# The Titans memory's gates, converted from titans-pytorch 0.5.5's ``NeuralMemory`` defaults
# (titans_pytorch/neural_memory.py); our rule is ``S <- beta S - lr g``, ``W <- (1 - decay) W + S``:
# - lr: ``default_step_transform_max_lr = 1.`` -> ``sigmoid(Linear(x_t)) * 1.0`` per token, bias
#   nn.Linear's default (~0; ``init_adaptive_step_bias = None``), on ``default_loss_fn`` =
#   ``(pred - target).pow(2).mean(dim=-1)``. Our ``l2`` sums over the head's features, so the same
#   step is max 1 / head dim = 1/128 at the benchmark's size (dim 512, 4 heads), bias 0.
# - beta: ``momentum = True, momentum_order = 1, init_momentum_bias = None`` -> ``sigmoid(
#   Linear(chunk mean))``, one per chunk: ``gate: chunk``, max 1.0, bias 0 (starts at 0.5). Ours
#   steps the momentum at every token, titans-pytorch once per chunk; the value keeps its gain
#   1 / (1 - beta) = 2 on each gradient. (Titans-pytorch's per-chunk 0.5 as a per-token
#   0.5 ** (1/64) = 0.989 would amplify each gradient up to ~90x and diverged at ~1600 tokens.)
# - decay: ``init_decay_bias = None`` -> ``sigmoid(Linear(chunk mean))``, one per chunk (starts at
#   0.5), applied once per chunk: ``W <- (1 - decay) W + S`` (``assoc_scan(1. - decay_factor, ...)``).
#   Ours applies it at every token: ``gate: chunk``, max 1.0, bias logit(1 - 0.5 ** (1/chunk))
#   (-4.52 at chunk 64) keeps titans-pytorch's starting 0.5 retention per chunk.
# (Our chunk gates read the chunk's first token, titans-pytorch's the chunk mean.)
# Not matched (fixed by the memory op / memory type, as the hand-written loop): its heads are
# ``dim_head = dim`` wide (512 each), ours dim / heads (128); its keys are not normalised
# (``qk_rmsnorm = False``; ``pre_rmsnorm = True`` norms x), ours are l2-normalised; its memory is
# ``x + LN(MLP(x))`` (``mem_model_norm_add_residual = True``; our ``ttt-mlp``), ours the plain
# residual ``mlp``; and with ``batch_size = None`` it takes every chunk's gradients at the initial
# weights (no feedback, so it cannot diverge), ours at the chunk-start weights (Titans Eq. 16-18).
# The former gates (lr max 0.1, per-token beta max 1.0 bias 2, decay max 0.1 bias -2) sent the
# outputs to NaN after ~260-320 tokens.
TITANS_LR_MAX = 1.0 / 128


def titans_gates(chunk: int = 64) -> dict[str, Any]:
    """The momentum rule's gates (see the titans-pytorch conversion above)."""
    keep = 0.5 ** (1.0 / chunk)  # per-token retention whose chunk product is 0.5
    return {"lr": {"gate": "token", "max": TITANS_LR_MAX},
            "beta": {"gate": "chunk", "max": 1.0},
            "decay": {"gate": "chunk", "max": 1.0, "bias": math.log((1.0 - keep) / keep)}}


def titans_memory(dim: int = 512, heads: int = 4, chunk: int = 64) -> dict[str, Any]:
    """One Titans memory op (MLP memory depth 2, momentum with gates) on embeddings:
    titans-pytorch's ``NeuralMemory(dim, heads, chunk_size)`` configuration, gates converted from
    its defaults (see above)."""
    return {
        "nestlearn": 1, "name": "bench-titans-memory",
        "model": {"dim": dim, "depth": 1, "heads": heads, "input": "embeddings"},
        "levels": {
            "outer": OUTER,
            "memory": {"period": chunk, "objective": "l2",
                       "rule": {"name": "momentum", **titans_gates(chunk)}},
        },
        "block": [{"id": "mem", "op": "memory", "in": "x", "level": "memory",
                   "memory": {"type": "mlp", "depth": 2, "expand": 4.0}}],
    }


def deltanet(dim: int = 512, heads: int = 4, chunk: int | None = None) -> dict[str, Any]:
    """DeltaNet's memory (linear, l2, sgd with a token-gated rate, period 1) on embeddings;
    ``chunk`` None: the executor's automatic compute chunk."""
    doc = {
        "nestlearn": 1, "name": "bench-deltanet",
        "model": {"dim": dim, "depth": 1, "heads": heads, "input": "embeddings"},
        "levels": {
            "outer": OUTER,
            "memory": {"period": 1, "objective": "l2",
                       "rule": {"name": "sgd", "lr": {"gate": "token", "max": 0.5}}},
        },
        "block": [{"id": "mem", "op": "memory", "in": "x", "level": "memory",
                   "memory": {"type": "linear"}, "init": "zeros"}],
    }
    if chunk is not None:
        doc["levels"]["memory"]["chunk"] = chunk  # type: ignore[index]
    return doc


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
         gen_period: int | None = None, remat: dict[str, int] | None = None) -> dict[str, Any] | None:
    """``models/hope.yaml`` at this size; ``period`` / ``gen_period`` set the self-modifying
    memory's two chunk sizes (main memory / generators) when given; ``remat`` maps level names
    to their ``remat:`` group size."""
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
    for level, n in (remat or {}).items():
        doc["levels"][level]["remat"] = n
    return doc  # type: ignore[no-any-return]


def validate(doc: dict[str, Any]) -> Spec:
    return Spec.model_validate(doc)
