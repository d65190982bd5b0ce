"""A level's ``read: chunk_start`` (Nested Learning Eq. 71: a CMS level's weights are constant
within its chunk and jump at its end): every executor == the plain mini-batch recurrence read
at the chunk start (tests/reference.py), and the option reaches the compiled model."""

from __future__ import annotations

import zlib

import pytest
import torch

from nestlearn import objectives, rules
from nestlearn.compile import compile_spec
from nestlearn.loops import GradMode, MemoryProblem, init_state, run
from nestlearn.memories import LinearMemory, MLPMemory
from nestlearn.spec.loader import parse_spec
from tests import reference as ref

B, H, T, D = 2, 2, 9, 3
DT = torch.float64


def make(rule: str) -> rules.Rule:
    return {"sgd": lambda: rules.sgd(0.0, 0.0), "momentum": lambda: rules.momentum(0.0, 0.0, 0.0),
            "dgd": lambda: rules.dgd(0.0, 0.0, 0.0)}[rule]()


@pytest.mark.parametrize("mem", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["sgd", "momentum", "dgd"])
@pytest.mark.parametrize("period", [1, 4])
def test_every_executor_reads_the_chunk_start(mem: str, rule: str, period: int) -> None:
    g = torch.Generator().manual_seed(zlib.crc32(f"{mem}/{rule}/{period}".encode()))
    arch = LinearMemory(D, D, H, init_std=0.5) if mem == "linear" else MLPMemory(D, D, H, expand=2)
    init = {n: torch.randn(p.shape, generator=g, dtype=DT) * 0.5 for n, p in arch.init_params().items()}
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=DT) for _ in range(3))
    r = lambda s: torch.rand(B, H, T, generator=g, dtype=DT) * s  # noqa: E731
    hp = {"lr": r(0.1), "decay": r(0.1), **({"beta": r(0.5)} if rule != "sgd" else {})}
    y_ref, w_ref = ref.batched_inner_loop(mem, rule, "l2", init, q, k, v, hp, period, read_start=True)
    pb = MemoryProblem(arch, make(rule), objectives.l2, q, k, v, hp, period, GradMode(), read_start=True)
    for executor in ("sequential", "auto", "scan"):
        y, st = run(pb, init_state(arch, pb.rule, init, B), executor)  # type: ignore[arg-type]
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10, msg=f"{executor} outputs")
        for n in w_ref:  # the state itself is the same recurrence as with `read: updated`
            torch.testing.assert_close(st["params"][n], w_ref[n], rtol=1e-9, atol=1e-10)


SPEC = """
nestlearn: 1
name: cms-read
model: {vocab: 16, dim: 8, depth: 1, heads: 2}
levels:
  outer: {period: outer, rule: {name: adamw}}
  cms: {period: 4, objective: l2, read: READ, rule: {name: sgd, lr: 0.3}}
block:
  - {id: c1, op: mlp, in: x, level: cms, expand: 2}
"""


def test_the_level_option_reaches_the_model() -> None:
    """Within the first chunk a chunk-start read is the initial MLP; ``updated`` is not."""
    x = torch.randint(0, 16, (2, 12))
    outs = {}
    for read in ("updated", "chunk_start"):
        torch.manual_seed(0)
        model = compile_spec(parse_spec(SPEC.replace("READ", read), "cms.yaml"), dtype=DT)
        outs[read] = model(x)[0]
    torch.manual_seed(0)
    frozen = compile_spec(parse_spec(SPEC.replace("READ", "chunk_start").replace("lr: 0.3", "lr: 0.0"), "c.yaml"),
                          dtype=DT)
    y0 = frozen(x)[0]
    torch.testing.assert_close(outs["chunk_start"][:, :4], y0[:, :4], rtol=0, atol=1e-12)
    assert not torch.allclose(outs["chunk_start"][:, 4:], y0[:, 4:])
    assert not torch.allclose(outs["updated"][:, 1:4], y0[:, 1:4])


def test_bad_read_value_is_a_spec_error() -> None:
    from nestlearn.spec.errors import SpecError

    with pytest.raises(SpecError) as info:
        parse_spec(SPEC.replace("READ", "start"), "cms.yaml")
    assert "levels.cms.read" in str(info.value) and "chunk_start" in str(info.value)
