"""``grad: first_order`` and ``stop`` keep some outer parameters from ever being trained (the key
and value projections; under ``stop`` also the gates and the initial state): ``nestlearn
compile`` lists them, ``nestlearn run`` warns once, and the list is what a real backward gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import nestlearn
from tests.cli_run import nl

ROOT = Path(__file__).resolve().parents[1]
TITANS = ROOT / "specs" / "titans-lmm.yaml"
TINY = Path(__file__).parent / "data" / "tiny_run.yaml"
SMALL = ["model.dim=32", "model.depth=2", "levels.memory.period=8"]


def listed(*args: object) -> dict | None:
    code, out = nl("compile", *args, "--format", "json")
    assert code == 0, out
    return json.loads(out)["no_outer_grad"]


def zero_grads(overrides: list[str]) -> set[str]:
    torch.manual_seed(0)
    model = nestlearn.compile(nestlearn.load_spec(TITANS, overrides))
    y, _ = model(torch.randint(0, 256, (2, 20)))
    (y * torch.randn_like(y)).sum().backward()
    return {n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()}


@pytest.mark.parametrize("mode", ["first_order", "stop"])
def test_compile_lists_what_a_real_backward_leaves_untrained(mode: str) -> None:
    found = listed(TITANS, *SMALL, f"levels.memory.grad={mode}")
    assert found is not None and found["modes"] == {"memory": mode}
    names = found["params"]
    assert {"blocks.*.ops.kp.proj.weight", "blocks.*.ops.vp.proj.weight"} <= set(names)
    assert "blocks.*.ops.qp.proj.weight" not in names
    assert any(".hypers.gates." in n for n in names) == (mode == "stop")
    # the names cover every block, and are exactly the ones a real model's backward leaves at zero
    cut = zero_grads([*SMALL, f"levels.memory.grad={mode}"]) - zero_grads([*SMALL, "levels.memory.grad=unroll"])
    expected = {re.sub(r"^blocks\.\*\.", f"blocks.{i}.", n) for n in names for i in range(2)}
    assert cut == expected


def test_unroll_lists_nothing_and_says_nothing() -> None:
    assert listed(TITANS, *SMALL) is None
    code, out = nl("compile", TITANS, *SMALL)
    assert code == 0 and "no outer gradient" not in out


def test_compile_text_says_it() -> None:
    code, out = nl("compile", TITANS, *SMALL, "levels.memory.grad=first_order")
    assert code == 0, out
    flat = " ".join(out.split())
    assert "no outer gradient under grad: memory (first_order)" in flat and "blocks.*.ops.kp.proj.weight" in flat


def test_run_warns_once(tmp_path: Path) -> None:
    code, out = nl("run", TINY, "levels.memory.grad=first_order", "--steps", "2", "--batch", "2", "--seq-len", "16",
                   "--threads", "1", "-q", "--out", tmp_path / "r")
    assert code == 0, out
    assert out.count("warning: no outer gradient under grad: memory (first_order)") == 1, out
    assert "blocks.*.ops.mem.proj.k.weight" in out
    code, out = nl("run", TINY, "--steps", "1", "--batch", "2", "--seq-len", "16", "--threads", "1", "-q",
                   "--out", tmp_path / "u")
    assert code == 0 and "no outer gradient" not in out
