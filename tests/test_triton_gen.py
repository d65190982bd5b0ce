"""HOPE's generators on the fused Triton kernel (``loops/triton/gen_dgd.py``) against the op's
own chunk loop (``SelfModOp._generate`` through ``loops.run`` and ``dgd_dual``, which
tests/test_selfmod.py checks against the four separate plain recurrences): keys, values, raw
gates and the carried state, within fp32 rounding. Without CUDA the kernel runs through Triton's
interpreter (``tests/triton_interpret.py``); the ``gpu`` test adds HOPE's full size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

import nestlearn
from nestlearn.compile.selfmod import SelfModOp
from nestlearn.loops import gen_triton
from nestlearn.loops import triton as kernels
from tests.triton_interpret import import_kernels, kernel_for_test
from tests.triton_interpret import rel_err as _rel

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = 1e-4  # relative to the tensor's largest entry
ROOT = Path(__file__).resolve().parents[1]

_KERNEL, _WHY = import_kernels("nestlearn.loops.triton.gen_dgd")


@pytest.fixture
def gen_dgd(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return kernel_for_test(_KERNEL, _WHY, monkeypatch)


def _hope(overrides: list[str]) -> torch.nn.Module:
    """models/hope.yaml at one block of width 32 (two heads of 16)."""
    torch.manual_seed(0)
    return nestlearn.compile(ROOT / "models" / "hope.yaml", ["model.dim=32", "model.depth=1", "model.heads=2",
                                                             *overrides]).to(DEV)


def _op(model: Any) -> SelfModOp:
    return next(m for m in model.modules() if isinstance(m, SelfModOp))


def _inputs(op: SelfModOp, b: int, t: int) -> tuple[torch.Tensor, Any, dict[str, Any]]:
    """The generators' input (heads of a random convolved x), their initial state made less
    trivial (a momentum), and the rule's beta as the op passes it."""
    g = torch.Generator().manual_seed(1)
    xh = torch.randn(b, op.heads, t, op.dh, generator=g).to(DEV)
    st = op._initial(b, torch.float32)["gen"]
    st = {**st, "opt": {"m": {"W": 0.01 * torch.randn(st["params"]["W"].shape, generator=g).to(DEV)}}}
    return xh, st, {"beta": float(op.level.rule.hypers["beta"])}


def _check(out: tuple[Any, ...], ref: tuple[Any, ...]) -> dict[str, float]:
    errs = {n: _rel(a, b) for n, a, b in zip(("k", "v", "lr_raw", "decay_raw"), out[:4], ref[:4])}
    for part in ("params", "anchor"):
        errs[part] = _rel(out[4][part]["W"], ref[4][part]["W"])
    errs["momentum"] = _rel(out[4]["opt"]["m"]["W"], ref[4]["opt"]["m"]["W"])
    assert out[4]["offset"] == ref[4]["offset"] == 0 and out[4]["chunks"] == ref[4]["chunks"]
    assert max(errs.values()) < TOL, errs
    return errs


@pytest.mark.parametrize("overrides", [
    ["block.1.gen_period=16"],                                     # models/hope.yaml with short chunks
    ["block.1.gen_period=32", "levels.selfmod.clip=null"],         # no clip
    ["block.1.gen_period=16", "block.1.gen_lr_max=0.5",            # the generators' own (strong) rate, no decay
     "levels.selfmod.rule.decay=0.0"],
])
def test_kernel_equals_the_ops_chunk_loop(gen_dgd: ModuleType, overrides: list[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Two calls (the second from the first's carried state) through the kernel equal the loop."""
    op = _op(_hope(overrides))
    period = op.gen_period
    xh, st, beta = _inputs(op, 2, 3 * period)
    with torch.no_grad():
        ref1 = op._generate(xh[:, :, :period], st, beta)  # the loop: the CPU never takes the kernel
        ref2 = op._generate(xh[:, :, period:], ref1[4], beta)
        monkeypatch.setattr(gen_triton, "device_ok", lambda x: True)
        out1 = op._generate(xh[:, :, :period], st, beta)
        out2 = op._generate(xh[:, :, period:], out1[4], beta)
    _check(out1, ref1)
    _check(out2, ref2)


def test_the_whole_model_through_the_kernel(gen_dgd: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """models/hope.yaml end to end, no gradient: the same logits and carried state with the
    generators on the kernel, which serves the whole chunks of every call that starts one; a
    call's trailing partial chunk and a call that starts mid-chunk take the loop."""
    model = _hope(["block.1.gen_period=16"])
    tokens = torch.randint(0, 256, (2, 80), device=DEV)
    calls: list[int] = []
    real = gen_triton.supports

    def counting(*a: Any) -> bool:
        ok = real(*a)
        calls.append(int(ok))
        return ok

    def feed() -> tuple[torch.Tensor, Any]:
        outs, state = [], None
        for part in tokens.split([32, 16, 20, 12], 1):  # the third: a chunk on the kernel, 4 on the loop
            out, state = model(part, state)
            outs.append(out)
        return torch.cat(outs, 1), state

    with torch.no_grad():
        ref, ref_state = feed()
        monkeypatch.setattr(gen_triton, "device_ok", lambda x: True)
        monkeypatch.setattr(gen_triton, "supports", counting)
        monkeypatch.setattr(gen_triton, "_said", False)
        with pytest.warns(UserWarning, match="generators run on a fused Triton kernel"):
            out, state = feed()
    assert calls == [1, 1, 1, 0]
    assert _rel(out, ref) < TOL
    for a, b in zip(torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(ref_state)):
        assert _rel(a, b) < TOL if isinstance(a, torch.Tensor) else a == b


def test_what_the_kernel_does_not_take(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training (a gradient wanted), a rule with its own ``proj``, another rule, the switch off
    and a CPU tensor keep the loop."""
    op = _op(_hope(["block.1.gen_period=16"]))
    xh, st, beta = _inputs(op, 1, 32)
    w = st["params"]["W"]
    args = (op.level, xh, st, [xh, w], None, 16)
    assert not gen_triton.supports(*args)  # a CPU tensor
    monkeypatch.setattr(gen_triton, "device_ok", lambda x: kernels.enabled())  # the device lifted, the switch kept
    with torch.no_grad():
        assert gen_triton.supports(*args)
        assert not gen_triton.supports(op.level, xh, st, [xh, w], 0.5, 16)    # DGD's own proj
        assert not gen_triton.supports(op.level, xh, st, [xh, w], None, 8)    # a chunk below tl.dot's 16
        assert not gen_triton.supports(op.level, xh[:, :, :12], st, [xh, w], None, 16)  # under one chunk
        assert not gen_triton.supports(op.level, xh, {**st, "offset": 3}, [xh, w], None, 16)  # mid-chunk
        monkeypatch.setattr(kernels, "capturing", lambda x: True)
        assert not gen_triton.supports(*args)  # a CUDA graph's capture: the loop replays faster
        monkeypatch.setattr(kernels, "capturing", lambda x: False)
    assert not gen_triton.supports(op.level, xh, st, [xh, w.requires_grad_()], None, 16)  # training
    other = SimpleNamespace(rule=nestlearn.rules.momentum(lr=0.1, beta=0.9), objective=op.level.objective,
                            executor="auto")
    with torch.no_grad():
        assert not gen_triton.supports(other, xh, st, [xh, w], None, 16)  # not DGD
        monkeypatch.setenv("NESTLEARN_TRITON", "0")
        assert not gen_triton.generate(op.level, xh, st, torch.zeros(2, 2), beta, 0.1, 0.1, None, 16)


def test_compiles_for_hopper_without_a_gpu() -> None:
    """The generators' kernel at HOPE's size (D 64, chunk 64) compiles for sm_90 through triton's
    own ptxas, in a fresh process without ``TRITON_INTERPRET`` (about 35 s on a 2-core CPU)."""
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nestlearn.loops.triton.gen_dgd import _gen_dgd_fwd_kernel as fn, launch_options
consts = {"BT": 64, "LOG_BT": 6, "D": 64, "R": 16, "CLIP": True, "PREC": "ieee"}
sig = {n: ("*fp32" if n.endswith(("_ptr", "_out")) else "constexpr" if n in consts
           else "fp32" if n in ("lr_scale", "decay_scale", "clip") else "i32") for n in fn.arg_names}
k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=launch_options(64))
print("cubin", len(k.asm["cubin"]))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if _KERNEL is None:
        pytest.skip(_WHY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cubin" in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_full_size(gen_dgd: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """HOPE's shipped generators (heads of 64, chunk 64) over 2,048 tokens, batch 2, fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = nestlearn.compile(ROOT / "models" / "hope.yaml", ["model.depth=1"]).to(DEV)
    op = _op(model)
    xh, st, beta = _inputs(op, 2, 2048)
    with torch.no_grad():
        out = op._generate(xh, st, beta)
        monkeypatch.setattr(gen_triton, "device_ok", lambda x: False)
        ref = op._generate(xh, st, beta)
    _check(out, ref)
