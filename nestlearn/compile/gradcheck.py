"""Which outer parameters a spec's gradient modes cut off from the outer loss.

Under ``grad: first_order`` the inner gradients are constants, so whatever reaches a memory
only as its keys and values (their projections, convolutions, the nodes computing them) gets
an outer gradient of exactly zero; under ``grad: stop`` the fast state is a constant, which
also cuts the level's gates, learned hyper-parameters and initial state. That follows from
the definitions, but nothing else would tell the user: ``nestlearn compile`` lists these
parameters and ``nestlearn run`` warns once.

Found by a probe rather than by rules: a small copy of the model (same block and levels,
width ``4 x lcm(heads)``, depth 1, a stream covering every level's first update) takes one
outer backward as the spec is written and one with every in-context level set to ``unroll``;
the parameters whose gradient is zero in the first and not in the second are the answer.
Names are given with ``blocks.*`` for the block index (every block is built the same way).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nestlearn.spec.schema import Spec

CUTTING_MODES = ("first_order", "stop")
MAX_PROBE_TOKENS = 4097


def cutting_levels(spec: Spec) -> dict[str, str]:
    """``{level: grad mode}`` of the in-context levels whose mode can cut outer gradients."""
    return {n: lv.grad for n, lv in spec.levels.items() if not lv.is_outer and lv.grad in CUTTING_MODES}


def no_outer_grad(spec: Spec) -> list[str]:
    """The outer parameters that receive no outer gradient under the spec's grad modes only
    (they would under ``unroll``), as ``blocks.*.ops.NODE.…`` names; ``[]`` when no level is
    ``first_order`` or ``stop``."""
    if not cutting_levels(spec):
        return []
    inner = [n for n, lv in spec.levels.items() if not lv.is_outer]
    tokens = min(MAX_PROBE_TOKENS, 1 + max(int(spec.levels[n].period) for n in inner))
    as_written = _zero_grads(_probe_spec(spec, {}), tokens)
    unrolled = _zero_grads(_probe_spec(spec, {n: "unroll" for n in inner}), tokens)
    return sorted(n.replace("blocks.0.", "blocks.*.", 1) for n in as_written - unrolled)


def describe(names: list[str], modes: dict[str, str]) -> str:
    """One sentence naming the parameters and the modes that cut them."""
    shown = ", ".join(f"{n} ({m})" for n, m in modes.items())
    return (f"no outer gradient under grad: {shown}: {len(names)} parameter tensor(s) are never trained "
            f"(weight decay aside; grad: unroll or truncate:N trains them): {', '.join(names)}")


def _probe_spec(spec: Spec, grads: dict[str, str]) -> Spec:
    doc: dict[str, Any] = spec.model_dump(mode="python", by_alias=True, exclude_none=True)
    heads = [spec.model.heads] + [h for node in spec.block if (h := getattr(node, "heads", None))]
    doc["model"]["dim"] = min(spec.model.dim, 4 * math.lcm(*heads))
    doc["model"]["depth"] = 1
    for name, grad in grads.items():
        doc["levels"][name]["grad"] = grad
    for lv in doc["levels"].values():  # a user objective is not imported here (compile runs no user code)
        if lv.get("objective") not in (None, "l2", "dot"):
            lv["objective"] = "l2"
    return Spec.model_validate(doc)


def _zero_grads(spec: Spec, tokens: int) -> set[str]:
    from nestlearn.compile.model import compile_spec

    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(0)
        model = compile_spec(spec)
        if spec.model.input == "tokens":
            x = torch.randint(0, spec.model.vocab, (1, tokens))
        else:
            x = torch.randn(1, tokens, spec.model.dim)
        with torch.enable_grad():
            y, _ = model(x)
            (y * torch.randn_like(y)).sum().backward()
    return {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not bool(p.grad.any()))}
