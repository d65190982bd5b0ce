"""The fused DGD kernel (``loops/triton/dgd_mlp.py``) against the closed form it replaces
(``loops/dgd_dual.py``, itself checked against the token-by-token oracle in test_dgd_dual.py):
outputs, chunk-end weights, momenta and the carried anchor, within fp32 rounding.

Without CUDA the kernel runs on the CPU through Triton's interpreter. ``TRITON_INTERPRET=1`` must
be set when triton itself is imported (its standard library -- ``tl.sum``, ... -- is decorated
then, when the kernel module is, and at a kernel's first launch (triton imports more of itself
then): this file sets it for those imports and for each test that launches, and restores the
environment after, so the rest of the session is unaffected. Where something imported triton earlier
in a CPU session the interpreter tests skip and say so (run this file on its own). With CUDA the
same tests run the compiled kernel; the ``gpu`` tests add HOPE's full head size and the shipped
model end to end."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from nestlearn import objectives, rules
from nestlearn.loops import GradMode, MemoryProblem, MemoryState
from nestlearn.loops import dgd_triton as glue
from nestlearn.loops.dgd_dual import run_dgd_dual
from nestlearn.memories import MLPMemory
from tests.triton_interpret import import_kernels, kernel_for_test
from tests.triton_interpret import rel_err as _rel

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = 1e-4  # relative to the tensor's largest entry; fp32 rounding gives ~1e-6 here
ROOT = Path(__file__).resolve().parents[1]


_KERNEL, _WHY = import_kernels("nestlearn.loops.triton.dgd_mlp", "nestlearn.loops.triton.dgd_mlp_bwd")


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """fp32 matmuls without TF32 for the closed form, restored after (``cuda.matmul.allow_tf32`` is
    a property of torch's cuBLAS module: ``monkeypatch`` cannot undo it)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture
def dgd_mlp(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The kernel module; on the CPU with ``TRITON_INTERPRET=1`` set during the test (triton
    imports parts of itself at the first launch, and they must be interpreted too)."""
    return kernel_for_test(_KERNEL, _WHY, monkeypatch)


def inputs(b: int, h: int, t: int, d: int, seed: int = 0, device: str = DEV) -> dict[str, Any]:
    """HOPE-like inputs: unit q / k, per-token gates, a constant beta as a broadcast view, and an
    initial state shared over the batch (a stride-0 view, as ``init_state`` makes it)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    q, k = (torch.nn.functional.normalize(rnd(b, h, t, d), dim=-1) for _ in range(2))
    v = rnd(b, h, t, d)
    lr = torch.rand(b, h, t, generator=g) * 0.2
    decay = torch.rand(b, h, t, generator=g) * 0.2
    beta = torch.full((1, 1, 1), 0.9).expand(b, h, t)
    w = tuple((rnd(1, h, d, d) / d**0.5).expand(b, h, d, d) for _ in range(2))
    m = tuple(rnd(b, h, d, d) * 0.05 for _ in range(2))
    out = {"q": q, "k": k, "v": v, "lr": lr, "decay": decay, "beta": beta, "weights": w, "momenta": m}
    return {n: (tuple(x.to(device) for x in t) if isinstance(t, tuple) else t.to(device)) for n, t in out.items()}


def check(out: Any, ref: Any, tol: float = TOL) -> dict[str, float]:
    errs = {"y": _rel(out.y, ref.y)}
    for field in ("weights", "momenta", "anchor"):
        for i, (a, b) in enumerate(zip(getattr(out, field), getattr(ref, field))):
            errs[f"{field}{i}"] = _rel(a, b)
    assert max(errs.values()) < tol, errs
    return errs


@pytest.mark.parametrize("chunk,d,chunks,bh", [(16, 16, 3, 2), (32, 16, 2, 2), (64, 16, 2, 1), (16, 32, 2, 2),
                                              (16, 64, 2, 1)])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_kernel_equals_closed_form(dgd_mlp: ModuleType, chunk: int, d: int, chunks: int, bh: int,
                                   clip: float | None) -> None:
    """Every chunk length the row takes (16 / 32 / 64) and widths up to HOPE's 64."""
    x = inputs(bh, bh, chunk * chunks, d)
    out = dgd_mlp.dgd_mlp_fwd(**x, chunk=chunk, clip=clip)
    ref = dgd_mlp.dgd_mlp_fwd_reference(**x, chunk=chunk, clip=clip)
    check(out, ref)
    # the check has teeth: the in-chunk updates move the outputs far beyond the tolerance
    still = dgd_mlp.dgd_mlp_fwd_reference(**{**x, "lr": x["lr"] * 0}, chunk=chunk, clip=clip)
    assert _rel(still.y, ref.y) > 100 * TOL


def test_strong_gates(dgd_mlp: ModuleType) -> None:
    """Large steps and forgetting (lr up to 1, decay up to 0.9, beta per token): the solve's
    ``L`` is far from small, and the kernel still agrees."""
    x = inputs(1, 2, 48, 16, seed=3)
    g = torch.Generator().manual_seed(4)
    x.update({n: (torch.rand(1, 2, 48, generator=g) * s).to(DEV) for n, s in (("lr", 1.0), ("decay", 0.9), ("beta", 1.0))})
    check(dgd_mlp.dgd_mlp_fwd(**x, chunk=16, clip=1.0), dgd_mlp.dgd_mlp_fwd_reference(**x, chunk=16, clip=1.0))


def test_refuses_what_it_does_not_compute(dgd_mlp: ModuleType) -> None:
    x = inputs(1, 1, 24, 16)
    with pytest.raises(ValueError, match="whole chunks"):
        dgd_mlp.dgd_mlp_fwd(**x, chunk=16)
    x = inputs(1, 1, 16, 16)
    with pytest.raises(TypeError, match="fp32"):
        dgd_mlp.dgd_mlp_fwd(**{**x, "q": x["q"].double()}, chunk=16)


def problem(x: dict[str, Any], chunk: int, clip: float | None = 1.0, **arch_kw: Any) -> MemoryProblem:
    d, h = x["q"].shape[-1], x["q"].shape[1]
    kw = {"expand": 1, "depth": 2, "act": "gelu", "residual": True, "bias": False, **arch_kw}
    arch = MLPMemory(d, d, h, **kw)
    hp = {"lr": x["lr"], "decay": x["decay"], "beta": 0.9}
    return MemoryProblem(arch, rules.dgd(0.0, 0.0, 0.0), objectives.l2, x["q"], x["k"], x["v"], hp, chunk,
                         GradMode("unroll"), clip=clip)


def state_of(x: dict[str, Any]) -> MemoryState:
    p = {"W0": x["weights"][0], "W1": x["weights"][1]}
    return MemoryState(params=p, opt={"m": {"W0": x["momenta"][0], "W1": x["momenta"][1]}}, anchor=p,
                       offset=0, chunks=0)


@pytest.mark.parametrize("first", [0, 11])
def test_executor_row_equals_dgd_dual_from_any_offset(dgd_mlp: ModuleType, first: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_dgd_triton`` from a state ``first`` tokens into a chunk, over the rest of that chunk,
    two whole chunks and a partial one: the same outputs and carried state as ``run_dgd_dual``."""
    x = inputs(2, 2, first + 5 + 32 + 7 if first else 32 + 7, 16, seed=1)
    pb = problem(x, 16)
    with torch.no_grad():
        st0 = state_of(x)
        if first:  # a state in the middle of a chunk (anchor != params, offset != 0)
            _, st0 = run_dgd_dual(pb.slice(0, first), st0)
            pb = pb.slice(first, pb.q.shape[2])
        y_ref, st_ref = run_dgd_dual(pb, st0)
        monkeypatch.setattr(glue, "_said", False)
        with pytest.warns(UserWarning, match="NESTLEARN_TRITON=0"):  # said once
            y, st = glue.run_dgd_triton(pb, st0)
    assert _rel(y, y_ref) < TOL
    assert (st["offset"], st["chunks"]) == (st_ref["offset"], st_ref["chunks"])
    for part in ("params", "anchor"):
        for n in st_ref[part]:
            assert _rel(st[part][n], st_ref[part][n]) < TOL, (part, n)
    for n in st_ref["opt"]["m"]:
        assert _rel(st["opt"]["m"][n], st_ref["opt"]["m"][n]) < TOL


def test_kernel_equals_the_sequential_oracle(dgd_mlp: ModuleType) -> None:
    """The kernel against the token-by-token oracle itself (``loops/sequential.py``: autograd
    gradients at each chunk's start, then ``rules/dgd.py`` token by token) for HOPE's memory with
    its clip: not only against the closed form it was written from."""
    from nestlearn.loops import run

    x = inputs(1, 2, 48, 16, seed=7)
    with torch.no_grad():
        y, st = run(problem(x, 16), state_of(x), "sequential")
    out = dgd_mlp.dgd_mlp_fwd(**x, chunk=16, clip=1.0)
    assert _rel(out.y, y) < TOL
    for i, n in enumerate(("W0", "W1")):
        assert _rel(out.weights[i], st["params"][n]) < TOL and _rel(out.momenta[i], st["opt"]["m"][n]) < TOL


@pytest.mark.parametrize("mode", ["unroll", "first_order", "stop", "truncate:2"])
def test_only_unroll_gradients_take_the_kernel(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With grad mode on and a state that requires grad, ``unroll`` (what the backward computes)
    takes the kernel (the default; ``train`` is the earlier spelling of it) and the other
    gradient modes the closed form; without gradients every mode takes the kernel (the forward
    values are the same). ``NESTLEARN_TRITON=infer`` keeps training on the closed form."""
    from dataclasses import replace

    monkeypatch.setenv("NESTLEARN_TRITON", "train")

    x = inputs(1, 1, 32, 16, device="cpu")
    x["weights"] = tuple(w.clone().requires_grad_() for w in x["weights"])
    pb = replace(problem(x, 16), grad=GradMode.parse(mode))
    called: list[int] = []
    monkeypatch.setattr(glue, "_run_kernel", lambda *a: called.append(1) or run_dgd_dual(*a))
    monkeypatch.setattr(glue, "_said", True)
    glue.run_dgd_triton(pb, state_of(x))
    assert called == ([1] if mode == "unroll" else [])
    assert glue._grad_ok(pb, glue._tensors(pb) + glue._state_tensors(state_of(x))) == (mode == "unroll")
    with torch.no_grad():
        glue.run_dgd_triton(pb, state_of(x))
    assert called[-1:] == [1]
    monkeypatch.delenv("NESTLEARN_TRITON")
    assert glue._grad_ok(pb, glue._tensors(pb) + glue._state_tensors(state_of(x))) == (mode == "unroll")
    for flag in ("infer", "0"):
        monkeypatch.setenv("NESTLEARN_TRITON", flag)
        assert not glue._grad_ok(pb, glue._tensors(pb) + glue._state_tensors(state_of(x)))


NAMES = ("q", "k", "v", "lr", "decay", "beta", "W0", "W1", "M0", "M1")
OUTS = ("y", "W0'", "W1'", "M0'", "M1'", "anchor0", "anchor1")


def leaves(b: int, h: int, t: int, d: int, seed: int = 0, strong: bool = False) -> list[torch.Tensor]:
    """``inputs``' tensors as leaves that require grad (per-token beta; the initial weights a
    ``[1, H, D, D]`` leaf that ``call`` expands over the batch, as ``init_state`` shares it)."""
    x = inputs(b, h, t, d, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    scale = (1.0, 0.9, 1.0) if strong else (0.2, 0.2, 1.0)
    gates = [torch.rand(b, h, t, generator=g) * s for s in scale]
    ts = [x["q"], x["k"], x["v"], *(t.to(DEV) for t in gates), x["weights"][0][:1], x["weights"][1][:1],
          *x["momenta"]]
    return [t.detach().clone().requires_grad_() for t in ts]


def call(fn: Any, ts: list[torch.Tensor], **kw: Any) -> list[torch.Tensor]:
    q, k, v, lr, decay, beta, w0, w1, m0, m1 = ts
    b = q.shape[0]
    out = fn(q, k, v, lr, decay, beta, (w0.expand(b, -1, -1, -1), w1.expand(b, -1, -1, -1)), (m0, m1), **kw)
    return [out.y, *out.weights, *out.momenta, *out.anchor]


def check_grads(dgd_mlp: ModuleType, ts: list[torch.Tensor], chunk: int, clip: float | None, save_every: int,
                tol: float = TOL, seed: int = 0, compiled: bool = False, backward: str = "recompute") -> dict[str, float]:
    """Outputs and ``autograd.grad`` of every output (random cotangents) to every input: the kernel's
    ``DGDMLPFunction`` (with the ``backward`` named) against autograd through ``dgd_dual`` (``grad: unroll``)."""
    out = call(dgd_mlp.dgd_mlp, ts, chunk=chunk, clip=clip, save_every=save_every, compiled=compiled,
               backward=backward)
    ref = call(dgd_mlp.dgd_mlp_fwd_reference, ts, chunk=chunk, clip=clip, grad="unroll")
    g = torch.Generator().manual_seed(seed)
    cots = [torch.randn(r.shape, generator=g).to(r.device) for r in ref]
    got = torch.autograd.grad(out, ts, cots)
    want = torch.autograd.grad(ref, ts, cots)
    errs = {n: _rel(a, b) for n, a, b in zip(OUTS, out, ref)}
    errs.update({f"d{n}": _rel(a, b) for n, a, b in zip(NAMES, got, want)})
    assert max(errs.values()) < tol, errs
    return errs


@pytest.mark.parametrize("save_every", [1, 2, 4])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_backward_equals_dgd_dual(dgd_mlp: ModuleType, save_every: int, clip: float | None) -> None:
    """B=1, H=2, D=16, chunk 16, 3 chunks: outputs, carried state and the gradients of all of them
    to q, k, v, lr, decay, beta and the initial weights and momenta. Checkpoints every 1, 2 (a
    last group of one chunk) and 4 chunks (one group: the whole call recomputed)."""
    check_grads(dgd_mlp, leaves(1, 2, 48, 16), 16, clip, save_every)


@pytest.mark.parametrize("backward", ["recompute", "fused"])
def test_backward_strong_gates_and_chunk_32(dgd_mlp: ModuleType, backward: str) -> None:
    """lr up to 1, decay up to 0.9, chunk 32 over a batch of 2: still the closed form's gradients."""
    check_grads(dgd_mlp, leaves(2, 1, 64, 16, seed=3, strong=True), 32, 1.0, 1, seed=1, backward=backward)


@pytest.mark.parametrize("carry", ["registers", "memory"])
@pytest.mark.parametrize("clip", [None, 1.0, 5.0])  # 1.0 clips every token here, 5.0 about half
def test_fused_backward_equals_dgd_dual(dgd_mlp: ModuleType, clip: float | None, carry: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused Triton backward (``dgd_mlp_bwd.py``, interpreted on the CPU) against autograd
    through ``dgd_dual``: B=1, H=2, D=16, chunk 16, 3 chunks, every output's random cotangent to
    every input, fp32 (~1e-6); its carried adjoints in registers or (``NESTLEARN_DGD_BWD_CARRY``)
    in memory."""
    monkeypatch.setenv("NESTLEARN_DGD_BWD_CARRY", carry)
    print(check_grads(dgd_mlp, leaves(1, 2, 48, 16, seed=11), 16, clip, 1, backward="fused"))


@pytest.mark.parametrize("carry_mem", [False, True])
@pytest.mark.parametrize("chunk,d,chunks", [(16, 16, 3), (32, 16, 2), (16, 32, 2)])
def test_fused_backward_equals_its_reference(dgd_mlp: ModuleType, chunk: int, d: int, chunks: int,
                                             carry_mem: bool) -> None:
    """The kernel against its spec (``dgd_mlp_bwd_ref``, same fp32 checkpoints from the forward
    kernel), per gradient, with the anchor's and the end state's cotangents, at every chunk
    length / a wider head the forward tests use; the carried adjoints in registers or in memory."""
    from nestlearn.loops.triton import dgd_mlp_bwd_ref as spec
    from nestlearn.loops.triton.dgd_mlp_bwd import dgd_mlp_bwd_fused

    x = [t.detach() for t in leaves(1, 2, chunk * chunks, d, seed=13, strong=True)]
    q, k, v, lr, decay, beta, w0, w1, m0, m1 = x
    out = dgd_mlp.dgd_mlp_fwd(q, k, v, lr, decay, beta, (w0, w1), (m0, m1), chunk=chunk, clip=1.0, save_every=1)
    g = torch.Generator().manual_seed(14)
    cots = tuple(torch.randn(o.shape, generator=g).to(DEV) for o in (out.y, *out.weights, *out.momenta, *out.anchor))
    got = dgd_mlp_bwd_fused((q, k, v, lr, decay, beta), list(out.saved), cots, chunk=chunk, clip=1.0,
                            carry_mem=carry_mem)
    want = spec.dgd_mlp_bwd_reference((q, k, v, lr, decay, beta), list(out.saved), cots, chunk=chunk, clip=1.0)
    errs = {n: _rel(a, b) for n, a, b in zip(NAMES, got, want)}
    assert max(errs.values()) < TOL, errs


def test_fused_backward_falls_back_where_it_does_not_fit(dgd_mlp: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device without the resources for the backward kernel: one warning, the recompute's
    gradients (from the same every-chunk checkpoints), and that size refused from then on."""
    from nestlearn.loops.triton import dgd_mlp_bwd

    class OutOfResources(Exception):  # matched by name, as triton's
        pass

    def boom(*a: Any, **kw: Any) -> Any:
        raise OutOfResources("shared memory")

    monkeypatch.setattr(dgd_mlp_bwd, "dgd_mlp_bwd_fused", boom)
    monkeypatch.setattr(dgd_mlp, "_bwd_too_big", set())
    with pytest.warns(UserWarning, match="fused DGD backward does not fit"):
        check_grads(dgd_mlp, leaves(1, 2, 32, 16, seed=4), 16, 1.0, 1, backward="fused")
    assert len(dgd_mlp._bwd_too_big) == 1
    # known not to fit: the recompute is chosen at the forward (checkpoints every SAVE_EVERY chunks)
    seen: list[int] = []
    real = dgd_mlp.dgd_mlp_fwd
    monkeypatch.setattr(dgd_mlp, "dgd_mlp_fwd", lambda *a, **kw: seen.append(kw["save_every"]) or real(*a, **kw))
    check_grads(dgd_mlp, leaves(1, 2, 32, 16, seed=4), 16, 1.0, dgd_mlp.SAVE_EVERY, backward="fused")
    assert seen == [dgd_mlp.SAVE_EVERY]


@pytest.mark.slow  # inductor's first compile on the CPU: over a minute
def test_backward_with_the_compiled_recompute(dgd_mlp: ModuleType) -> None:
    """The recompute's chunk steps through torch.compile (``MemoryProblem.compiled``, which the
    row passes on): the same gradients."""
    check_grads(dgd_mlp, leaves(1, 2, 48, 16, seed=6), 16, 1.0, 2, compiled=True)


@pytest.mark.parametrize("backward", ["recompute", "fused"])
def test_backward_only_some_outputs_and_inputs(dgd_mlp: ModuleType, backward: str) -> None:
    """A loss on the outputs of the last two chunks alone (the carried state unused: its adjoints
    come as None) and gradients to q and the gates only (the rest constants): the same as the
    closed form's, including the first chunk's gates, which reach the loss only through the
    state carried between chunks."""
    ts = leaves(1, 2, 48, 16, seed=5)
    consts = [t.detach() for t in ts]
    mixed = [ts[0], consts[1], consts[2], ts[3], ts[4], ts[5], *consts[6:]]
    y = call(dgd_mlp.dgd_mlp, mixed, chunk=16, clip=1.0, backward=backward)[0]
    y_ref = call(dgd_mlp.dgd_mlp_fwd_reference, mixed, chunk=16, clip=1.0, grad="unroll")[0]
    wrt = [ts[0], ts[3], ts[4], ts[5]]
    w = y_ref.detach()[:, :, 16:]
    got = torch.autograd.grad((y[:, :, 16:] * w).sum(), wrt)
    want = torch.autograd.grad((y_ref[:, :, 16:] * w).sum(), wrt)
    assert max(_rel(a, b) for a, b in zip(got, want)) < TOL
    assert got[0][:, :, :16].abs().max() == 0 and got[1][..., :16].abs().max() > 1e-3 * got[1].abs().max()
    # q alone wants a gradient, and the loss also reads the carried state (which q never reaches)
    outs = call(dgd_mlp.dgd_mlp, [ts[0], *consts[1:]], chunk=16, clip=1.0, backward=backward)
    outs_ref = call(dgd_mlp.dgd_mlp_fwd_reference, [ts[0], *consts[1:]], chunk=16, clip=1.0, grad="unroll")
    (gq,) = torch.autograd.grad(outs[0].sum() + outs[1].sum(), [ts[0]])
    (gq_ref,) = torch.autograd.grad(outs_ref[0].sum() + outs_ref[1].sum(), [ts[0]])
    assert _rel(gq, gq_ref) < TOL


def ref_grads(ts: list[torch.Tensor], chunk: int, clip: float | None, cots: list[torch.Tensor]) -> list[torch.Tensor]:
    """``dgd_mlp_bwd_ref.dgd_mlp_bwd_reference`` (the hand-written backward, the fused kernel's
    spec) for ``leaves``' tensors at batch 1, from checkpoints at every chunk start."""
    from nestlearn.loops.triton import dgd_mlp_bwd_ref as spec

    with torch.no_grad():
        q, k, v, lr, decay, beta, w0, w1, m0, m1 = ts
        _, saved = spec.dgd_mlp_states_reference(q, k, v, lr, decay, beta, (w0, w1), (m0, m1), chunk=chunk, clip=clip)
        return spec.dgd_mlp_bwd_reference((q, k, v, lr, decay, beta), saved, tuple(cots), chunk=chunk, clip=clip)


@pytest.mark.parametrize("clip", [None, 1.0, 5.0])  # 1.0 clips every token here, 5.0 about half
@pytest.mark.parametrize("strong", [False, True])
def test_bwd_reference_equals_autograd_float64(dgd_mlp: ModuleType, clip: float | None, strong: bool) -> None:
    """The hand-derived chunk backward (plain PyTorch) against autograd through ``dgd_dual`` in
    float64: every input's gradient from random cotangents on every output (the anchor included),
    B=1, H=2, D=16, chunk 16, 3 chunks, to ~1e-14 (held to 1e-10)."""
    ts = [t.detach().double().requires_grad_() for t in leaves(1, 2, 48, 16, seed=11, strong=strong)]
    ref = call(dgd_mlp.dgd_mlp_fwd_reference, ts, chunk=16, clip=clip, grad="unroll")
    g = torch.Generator().manual_seed(12)
    cots = [torch.randn(r.shape, generator=g, dtype=r.dtype) for r in ref]
    want = torch.autograd.grad(ref, ts, cots)
    got = ref_grads(ts, 16, clip, cots)
    errs = {n: _rel(a, b) for n, a, b in zip(NAMES, got, want)}
    assert max(errs.values()) < 1e-10, errs


def test_executor_row_gradients_equal_dgd_dual(dgd_mlp: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_dgd_triton`` in training (``grad: unroll``) from 11 tokens into a chunk: the head and
    the tail on the closed form, two whole chunks on the kernel; the loss on the outputs and the
    carried state differentiates to q, k, v, the lr / decay gates and the initial state as
    ``run_dgd_dual``'s."""
    monkeypatch.setenv("NESTLEARN_TRITON", "train")
    x = inputs(1, 2, 11 + 5 + 32 + 7, 16, seed=2)
    base = {n: x[n].clone().requires_grad_() for n in ("q", "k", "v", "lr", "decay")}
    w = [t[:1].clone().requires_grad_() for t in x["weights"]]
    m = [t.clone().requires_grad_() for t in x["momenta"]]

    def loss(run: Any) -> tuple[torch.Tensor, ...]:
        xx = {**x, **base, "weights": tuple(t.expand(1, -1, -1, -1) for t in w), "momenta": tuple(m)}
        pb = problem(xx, 16)
        _, st0 = run_dgd_dual(pb.slice(0, 11), state_of(xx))
        y, st = run(pb.slice(11, pb.q.shape[2]), st0)
        total = (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum()
        for n in ("W0", "W1"):
            total = total + (st["params"][n] ** 2).sum() + st["opt"]["m"][n].sum()
        return torch.autograd.grad(total, [*base.values(), *w, *m])

    calls: list[int] = []
    real = glue._run_kernel
    monkeypatch.setattr(glue, "_run_kernel", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(glue, "_said", True)
    got = loss(glue.run_dgd_triton)
    assert calls == [1]
    want = loss(run_dgd_dual)
    errs = [_rel(a, b) for a, b in zip(got, want)]
    assert max(errs) < TOL, errs


def test_hopes_shipped_memory_is_served_and_the_rest_refused() -> None:
    import nestlearn
    from nestlearn.compile.levels import Level
    from nestlearn.memories import build_arch

    spec = nestlearn.load_spec(ROOT / "models" / "hope.yaml")
    node = next(n for n in spec.block if n.op == "selfmod")
    dh = spec.model.dim // spec.model.heads
    level = Level("selfmod", spec.levels["selfmod"])
    arch = build_arch(node.memory, dh, dh, spec.model.heads, unit_keys=True)
    x = inputs(1, spec.model.heads, 32, dh, device="cpu")
    hope = level.problem(arch, x["q"], x["k"], x["v"], {"lr": x["lr"], "decay": x["decay"], "beta": 0.9},
                         int(level.period))
    assert glue._shape_ok(hope) and glue._tensors_ok(hope)
    assert not glue.supports(hope)  # CPU tensors: the closed form (and never an import of triton)
    small = inputs(1, 1, 32, 16, device="cpu")
    refused = [
        problem(small, 16, bias=True), problem(small, 16, act="silu"), problem(small, 16, expand=2),
        problem(small, 16, depth=3), problem(small, 16, residual=False), problem(small, 8),
    ]
    from dataclasses import replace

    refused += [replace(problem(small, 16), read_start=True), replace(problem(small, 16), objective=objectives.dot),
                replace(problem(small, 16), rule=rules.momentum(0.1))]
    assert not any(glue._shape_ok(pb) for pb in refused)
    assert glue._shape_ok(problem(small, 16))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_switch_and_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    x = inputs(1, 2, 32, 64)
    pb = problem(x, 16)
    with torch.no_grad():
        assert glue.supports(pb)
        monkeypatch.setenv("NESTLEARN_TRITON", "0")
        assert not glue.supports(pb)
    wants = problem({**x, "q": x["q"].clone().requires_grad_()}, 16)
    monkeypatch.setenv("NESTLEARN_TRITON", "infer")
    assert not glue.supports(wants)  # training keeps the closed form where asked
    monkeypatch.delenv("NESTLEARN_TRITON")
    assert glue.supports(wants)  # by default training (grad: unroll) takes the kernel
    from dataclasses import replace

    assert not glue.supports(replace(wants, grad=GradMode("first_order")))
    with torch.no_grad():
        assert glue.supports(replace(wants, grad=GradMode("first_order")))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("backward", ["recompute", "fused"])
def test_gpu_backward_full_head_size(dgd_mlp: ModuleType, clip: float | None, backward: str, no_tf32: None) -> None:
    """HOPE's head (64), chunk (16), 8 heads over 2,048 tokens, batch 2: outputs, carried state
    and every gradient against autograd through the closed form, in fp32, with each backward
    (the fused Triton kernel and the recompute through ``dgd_dual``)."""
    print(backward, clip, check_grads(dgd_mlp, leaves(2, 8, 2048, 64, seed=5), 16, clip, dgd_mlp.SAVE_EVERY,
                                      backward=backward))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("precision,tol", [("ieee", TOL), ("tf32x3", 1e-3)])
def test_gpu_full_head_size(dgd_mlp: ModuleType, clip: float | None, precision: str, tol: float,
                            no_tf32: None) -> None:
    """HOPE's head (64), chunk (16) and heads (8) over 2,048 tokens (128 chunks), against the
    closed form in fp32 (no TF32 in its matmuls). 3xTF32 (tensor cores) is held to 1e-3: where
    it stays near the ieee figures it can become the default (``dgd_triton.precision``)."""
    x = inputs(2, 8, 2048, 64, seed=5)
    if clip is None:  # gates in HOPE's range (lr <= 0.002): unclipped, rates of 0.2 overflow fp32 within
        x["lr"], x["decay"] = x["lr"] * 0.01, x["decay"] * 0.01  # 128 chunks, and decays of 0.2 zero the weights
    ref = dgd_mlp.dgd_mlp_fwd_reference(**x, chunk=16, clip=clip)
    assert torch.isfinite(ref.y).all() and all(w.abs().max() > 1e-3 for w in ref.weights)
    errs = check(dgd_mlp.dgd_mlp_fwd(**x, chunk=16, clip=clip, precision=precision), ref, tol)
    print(precision, clip, errs)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_shipped_hope_dispatches_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """models/hope.yaml (smaller width, HOPE's head size) under no_grad: the kernel serves its
    self-modifying memory and the logits match the closed form's; with grad it runs by default
    and gives the closed form's parameter gradients."""
    import nestlearn

    torch.manual_seed(0)
    model = nestlearn.compile(ROOT / "models" / "hope.yaml", ["model.dim=128", "model.depth=2", "model.heads=2"]).to("cuda")
    tokens = torch.randint(0, 256, (2, 300), device="cuda")
    calls = []
    real = glue._run_kernel

    def counting(*a: Any) -> Any:
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(glue, "_run_kernel", counting)
    with torch.no_grad():
        monkeypatch.setenv("NESTLEARN_TRITON", "0")
        ref, _ = model(tokens)
        assert not calls
        monkeypatch.setenv("NESTLEARN_TRITON", "1")
        out, _ = model(tokens)
    assert calls and _rel(out, ref) < 1e-3
    # training: the kernel serves it by default (not with NESTLEARN_TRITON=infer), with the
    # closed form's parameter gradients
    calls.clear()
    monkeypatch.setenv("NESTLEARN_TRITON", "infer")
    model.zero_grad()
    (model(tokens)[0].float() ** 2).mean().backward()
    assert not calls
    grads = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("NESTLEARN_TRITON", flag)
        model.zero_grad()
        (model(tokens)[0].float() ** 2).mean().backward()
        grads[flag] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert calls and grads["0"].keys() == grads["1"].keys()
    errs = {n: _rel(grads["1"][n], g) for n, g in grads["0"].items() if g.abs().max() > 0}
    assert max(errs.values()) < 1e-3, sorted(errs.items(), key=lambda e: -e[1])[:5]


def test_shipped_hope_through_the_kernel_on_cpu(dgd_mlp: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """models/hope.yaml end to end (a width whose heads are 16 wide) with the row's device check
    lifted, so that the kernel (interpreted on the CPU) serves the self-modifying memory through
    ``loops.run``: the same logits and carried state as the closed form, 75 tokens fed in two
    calls (each ends mid-chunk; the second starts there)."""
    import nestlearn

    torch.manual_seed(0)
    model = nestlearn.compile(ROOT / "models" / "hope.yaml", ["model.dim=32", "model.depth=1", "model.heads=2"]).to(DEV)
    tokens = torch.randint(0, 256, (2, 75), device=DEV)
    calls: list[int] = []
    real = glue._run_kernel

    def counting(*a: Any) -> Any:
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(glue, "_run_kernel", counting)
    monkeypatch.setattr(glue, "supports", lambda pb: glue._shape_ok(pb) and glue._tensors_ok(pb)
                        and not glue._grad_wanted(glue._tensors(pb)))

    def feed() -> tuple[torch.Tensor, Any]:
        outs, state = [], None
        for part in tokens.split([37, 38], 1):
            out, state = model(part, state)
            outs.append(out)
        return torch.cat(outs, 1), state

    monkeypatch.setattr(glue, "_said", False)
    with torch.no_grad(), pytest.warns(UserWarning, match="fused Triton kernel"):
        out, state = feed()
    assert len(calls) == 2  # the self-modifying memory of the one block, in each call
    monkeypatch.setattr(glue, "supports", lambda pb: False)
    with torch.no_grad():
        ref, ref_state = feed()
    assert _rel(out, ref) < TOL
    flat = torch.utils._pytree.tree_leaves(state)
    flat_ref = torch.utils._pytree.tree_leaves(ref_state)
    assert len(flat) == len(flat_ref)
    for a, b in zip(flat, flat_ref):
        if isinstance(a, torch.Tensor):
            assert _rel(a, b) < TOL
        else:
            assert a == b


def test_backward_under_remat(dgd_mlp: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The row is ``remat_ok``: under a level's ``remat`` (groups of 2 chunks checkpointed with
    ``torch.utils.checkpoint``) the kernel's Function is re-run in the backward and the gradients
    still equal the closed form's."""
    from dataclasses import replace

    from nestlearn.loops import run

    monkeypatch.setenv("NESTLEARN_TRITON", "train")
    x = inputs(1, 2, 64, 16, seed=8)
    ts = {n: x[n].clone().requires_grad_() for n in ("q", "k", "v", "lr")}
    monkeypatch.setattr(glue, "supports", lambda pb: glue._shape_ok(pb) and glue._tensors_ok(pb)
                        and glue._grad_ok(pb, glue._tensors(pb)))
    monkeypatch.setattr(glue, "_said", True)
    calls: list[int] = []
    real = glue._run_kernel
    monkeypatch.setattr(glue, "_run_kernel", lambda *a: calls.append(1) or real(*a))

    def grads(executor: str) -> tuple[torch.Tensor, ...]:
        pb = replace(problem({**x, **ts}, 16), remat=2)
        y, _ = run(pb, state_of(x), executor)  # type: ignore[arg-type]
        return torch.autograd.grad((y * y.detach()).sum(), list(ts.values()))

    got = grads("auto")
    assert len(calls) >= 2  # the groups' forwards (and their recompute in the backward)
    monkeypatch.setattr(glue, "supports", lambda pb: False)
    want = grads("auto")
    assert max(_rel(a, b) for a, b in zip(got, want)) < TOL


def test_shipped_hope_trains_through_the_kernel_on_cpu(dgd_mlp: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """models/hope.yaml (heads 16 wide) with the row's device check lifted: a training step's
    loss and every parameter gradient with the kernel (interpreted) serving the self-modifying
    memory equal those with the closed form."""
    import nestlearn

    torch.manual_seed(0)
    monkeypatch.setenv("NESTLEARN_TRITON", "train")
    model = nestlearn.compile(ROOT / "models" / "hope.yaml", ["model.dim=32", "model.depth=1", "model.heads=2"]).to(DEV)
    tokens = torch.randint(0, 256, (1, 40), device=DEV)
    calls: list[int] = []
    real = glue._run_kernel
    monkeypatch.setattr(glue, "_run_kernel", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(glue, "_said", True)

    def step(kernel: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setattr(glue, "supports", lambda pb: kernel and glue._shape_ok(pb) and glue._tensors_ok(pb)
                            and glue._grad_ok(pb, glue._tensors(pb)))
        model.zero_grad()
        out, _ = model(tokens)
        loss = torch.nn.functional.cross_entropy(out[0, :-1], tokens[0, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step(True)
    assert calls  # the kernel ran in training
    n_calls = len(calls)
    loss_ref, grads_ref = step(False)
    assert len(calls) == n_calls
    assert _rel(loss, loss_ref) < TOL and grads.keys() == grads_ref.keys()
    errs = {n: _rel(grads[n], g) for n, g in grads_ref.items() if g.abs().max() > 0}
    assert max(errs.values()) < TOL, sorted(errs.items(), key=lambda e: -e[1])[:5]


def test_precision_follows_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 means fp32 unless the user allowed TF32 (as torch's matmuls in the closed form)."""
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert glue.precision() == "ieee"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert glue.precision() == "tf32"


def test_out_of_resources_falls_back_and_refuses_after(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device without the shared memory a size needs: one warning, the closed form's result,
    and that size is refused from then on."""
    class OutOfResources(Exception):  # matched by name, as triton's (not imported on the CPU path)
        pass

    def boom(*a: Any) -> Any:
        raise OutOfResources("shared memory")

    monkeypatch.setattr(glue, "_run_kernel", boom)
    monkeypatch.setattr(glue, "_too_big", set())
    monkeypatch.setattr(glue, "_said", True)
    x = inputs(1, 2, 16 + 32 + 3, 16, device="cpu")
    pb = problem(x, 16)
    with torch.no_grad():
        _, st0 = run_dgd_dual(pb.slice(0, 16 + 5), state_of(x))  # offset 5: a head on the closed form first
        rest = pb.slice(21, pb.q.shape[2])
        y_ref, st_ref = run_dgd_dual(rest, st0)
        with pytest.warns(UserWarning, match="does not fit this device"):
            y, st = glue.run_dgd_triton(rest, st0)
    assert torch.equal(y, y_ref) and torch.equal(st["params"]["W1"], st_ref["params"]["W1"])
    assert glue._size(pb) in glue._too_big


def _ptxas() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


@pytest.mark.skipif(not _ptxas(), reason="no NVIDIA backend (ptxas) in this triton")
def test_compiles_for_hopper_without_a_gpu() -> None:
    """The interpreter accepts what a GPU compile may refuse (``tl.dot`` shapes, layouts): compile
    HOPE's size for sm_90 through triton's own ptxas, in a fresh process without
    ``TRITON_INTERPRET`` (this one decorated the kernel for the interpreter)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = "from bench.triton_dgd import ptxas_usage; print(ptxas_usage(64, 16), ptxas_usage(64, 16, backward=True))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("REG:") == 2, done.stdout  # the forward and the fused backward
