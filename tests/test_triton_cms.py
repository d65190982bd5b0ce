"""The Triton chunk step of HOPE's CMS levels (``loops/triton/sgd_mlp.py``, executor row
``cms_triton``) against the closed form it replaces (``loops/dual.py``, itself checked against the
token-by-token oracle elsewhere) and against that oracle (``loops/sequential.py``): outputs,
chunk-end weights, the carried anchor and every outer gradient, within fp32 rounding.

Without CUDA the kernels run on the CPU through Triton's interpreter, set up as in
``test_triton_dgd.py`` (its docstring): ``TRITON_INTERPRET=1`` while triton and the kernel module
are imported and during each test that launches, restored after. Where triton was imported
earlier in the session without the interpreter, the kernel tests skip and say so. The ``gpu``
tests add the c1 shape of models/hope.yaml (512 -> 1024 -> 512, chunk 16) and the model end to end."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from nestlearn import objectives, rules
from nestlearn.loops import GradMode, MemoryProblem, MemoryState
from nestlearn.loops import cms_triton as glue
from nestlearn.loops.dual import run_dual
from nestlearn.memories import MLPMemory
from tests.triton_interpret import import_kernels

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = 1e-4  # relative to the tensor's largest entry; fp32 rounding gives ~1e-6 here
ROOT = Path(__file__).resolve().parents[1]


_KERNEL, _WHY = import_kernels("nestlearn.loops.triton.sgd_mlp", "nestlearn.loops.triton.sgd_mlp_bwd")


@pytest.fixture(autouse=True)
def opted_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests take the row explicitly (``NESTLEARN_CMS_TRITON=1``, what ``auto`` does too)."""
    monkeypatch.setenv("NESTLEARN_CMS_TRITON", "1")


def test_the_switch_and_what_auto_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` trains through the kernel everywhere (compiled chunk steps in a CUDA graph too,
    since the kernel's training node keeps 8x less than the closed form); ``infer`` only
    evaluates through it."""
    for value, want in (("1", "train"), ("yes", "train"), ("0", "off"), ("off", "off"), ("", "auto"),
                        ("auto", "auto"), ("infer", "infer")):
        monkeypatch.setenv("NESTLEARN_CMS_TRITON", value)
        assert glue.mode() == want
        assert glue.trains() == (want in ("train", "auto"))
    monkeypatch.delenv("NESTLEARN_CMS_TRITON")
    assert glue.mode() == "auto" and glue.trains()


@pytest.fixture
def sgd_mlp(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The kernel module; on the CPU with ``TRITON_INTERPRET=1`` set during the test."""
    if _KERNEL is None:
        pytest.skip(_WHY)
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:  # fp32 closed form without TF32, restored after
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    return _KERNEL


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def inputs(b: int, t: int, d: int = 32, hidden: int = 64, d_out: int | None = None, seed: int = 0,
           lr_max: float = 0.003, heads: int = 1) -> dict[str, torch.Tensor]:
    """CMS-like inputs: RMS-normalised k / v (``kv_norm``), q the raw input, a per-token lr (small
    enough that several chunks stay stable: ``|k|^2 = d``) and an initial state shared over the
    batch (a stride-0 view, as ``init_state`` makes it)."""
    g = torch.Generator().manual_seed(seed)
    do = d_out or d

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    rms = torch.nn.functional.rms_norm
    x = {"q": rnd(b, heads, t, d), "k": rms(rnd(b, heads, t, d), (d,)), "v": rms(rnd(b, heads, t, do), (do,)),
         "lr": torch.rand(b, heads, t, generator=g) * lr_max,
         "w0": (rnd(1, heads, hidden, d) / d**0.5).expand(b, -1, -1, -1),
         "w1": (rnd(1, heads, do, hidden) / hidden**0.5).expand(b, -1, -1, -1)}
    return {n: t.to(DEV) for n, t in x.items()}


def problem(x: dict[str, torch.Tensor], chunk: int, grad: str = "unroll", **kw: Any) -> MemoryProblem:
    """The problem an in-context ``mlp`` node builds (``compile/ops.py``): no residual, gelu, sgd."""
    di, hd, do, heads = x["q"].shape[-1], x["w0"].shape[-2], x["w1"].shape[-2], x["q"].shape[1]
    arch = MLPMemory(di, do, heads, expand=hd / di, depth=2, act="gelu", residual=False, bias=False)
    return MemoryProblem(arch, rules.sgd(0.0), objectives.l2, x["q"], x["k"], x["v"], {"lr": x["lr"], "decay": 0.0},
                         chunk, GradMode.parse(grad), **kw)


def state_of(x: dict[str, torch.Tensor]) -> MemoryState:
    p = {"W0": x["w0"], "W1": x["w1"]}
    return MemoryState(params=p, opt={}, anchor=p, offset=0, chunks=0)


ARGS = ("q", "k", "v", "lr", "w0", "w1")


@pytest.mark.parametrize("chunk,d,hidden,d_out,block_h,block_d", [
    (16, 32, 64, None, None, None),  # one hidden tile, one column block
    (16, 32, 64, None, 32, 16),      # two hidden tiles, two column blocks: the cross-tile sums
    (32, 16, 48, None, 16, 16),      # three tiles
    (48, 32, 64, 16, 32, 16),        # a chunk padded to 64 tokens; Di != Do
    (64, 16, 32, None, None, None),
])
@pytest.mark.parametrize("read_start", [False, True])
def test_step_equals_closed_form(sgd_mlp: ModuleType, chunk: int, d: int, hidden: int, d_out: int | None,
                                 block_h: int | None, block_d: int | None, read_start: bool) -> None:
    """One chunk: outputs and chunk-end weights equal ``run_dual``'s, at every tiling."""
    x = inputs(2, chunk, d, hidden, d_out, lr_max=0.1)  # large steps: the in-chunk terms matter
    y, w0, w1 = sgd_mlp.sgd_mlp_step_fwd(*(x[n] for n in ARGS), read_start=read_start, block_h=block_h,
                                         block_d=block_d)
    ref = sgd_mlp.sgd_mlp_reference(*(x[n] for n in ARGS), chunk=chunk, read_start=read_start)
    errs = [_rel(y, ref.y), _rel(w0, ref.weights[0]), _rel(w1, ref.weights[1])]
    assert max(errs) < TOL, errs
    # the check has teeth: the in-chunk updates move the outputs and weights far beyond the tolerance
    still = sgd_mlp.sgd_mlp_reference(*(x[n] * (0 if n == "lr" else 1) for n in ARGS), chunk=chunk,
                                      read_start=read_start)
    assert _rel(still.weights[0], ref.weights[0]) > 100 * TOL
    if not read_start:
        assert _rel(still.y, ref.y) > 100 * TOL


def test_chunks_equal_closed_form_and_sequential_oracle(sgd_mlp: ModuleType) -> None:
    """Four chunks of 16 at batch 2, two heads, 32 -> 64 -> 32 (two hidden tiles): outputs, end
    weights and anchor against ``run_dual`` and the token-by-token oracle."""
    from nestlearn.loops import run

    x = inputs(2, 64, heads=2, seed=1)
    out = sgd_mlp.sgd_mlp(*(x[n] for n in ARGS), chunk=16)
    ref = sgd_mlp.sgd_mlp_reference(*(x[n] for n in ARGS), chunk=16)
    with torch.no_grad():
        y_seq, st_seq = run(problem(x, 16), state_of(x), "sequential")
    for got, want in ((out.y, ref.y), (out.y, y_seq), *zip(out.weights, ref.weights), *zip(out.anchor, ref.anchor),
                      (out.weights[0], st_seq["params"]["W0"]), (out.weights[1], st_seq["params"]["W1"])):
        assert _rel(got, want) < TOL


def test_refuses_what_it_does_not_compute(sgd_mlp: ModuleType) -> None:
    x = inputs(1, 16)
    with pytest.raises(TypeError, match="fp32"):
        sgd_mlp.sgd_mlp_step_fwd(*(x[n].double() if n == "q" else x[n] for n in ARGS))
    y = inputs(1, 16, d=24, hidden=48)
    with pytest.raises(ValueError, match="multiples"):
        sgd_mlp.sgd_mlp_step_fwd(*(y[n] for n in ARGS))
    z = inputs(1, 80)
    with pytest.raises(ValueError, match="chunk of 80"):
        sgd_mlp.sgd_mlp_step_fwd(*(z[n] for n in ARGS))
    with pytest.raises(ValueError, match="whole chunks"):
        sgd_mlp.sgd_mlp(*(z[n] for n in ARGS), chunk=32)


def leaves(x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """``x``'s tensors as leaves that require grad; the weights as one ``[1, H, ., .]`` leaf each
    (``call`` expands them over the batch, as ``init_state`` shares the initial state)."""
    return [(x[n][:1] if n in ("w0", "w1") else x[n]).detach().clone().requires_grad_() for n in ARGS]


def call(fn: Any, ts: list[torch.Tensor], **kw: Any) -> list[torch.Tensor]:
    q, k, v, lr, w0, w1 = ts
    b = q.shape[0]
    out = fn(q, k, v, lr, w0.expand(b, -1, -1, -1), w1.expand(b, -1, -1, -1), **kw)
    return [out.y, *out.weights, *out.anchor]


@pytest.mark.parametrize("backward", ["manual", "recompute"])
@pytest.mark.parametrize("read_start", [False, True])
def test_gradients_equal_closed_form(sgd_mlp: ModuleType, read_start: bool, backward: str) -> None:
    """Three chunks: ``autograd.grad`` of every output (y, end weights, anchor; random cotangents)
    to q, k, v, lr and the initial weights, through ``SGDMLPStep`` (either backward) and through
    ``run_dual``."""
    ts = leaves(inputs(2, 48, seed=2))
    out = call(sgd_mlp.sgd_mlp, ts, chunk=16, read_start=read_start, backward=backward)
    ref = call(sgd_mlp.sgd_mlp_reference, ts, chunk=16, read_start=read_start, grad="unroll")
    g = torch.Generator().manual_seed(3)
    cots = [torch.randn(r.shape, generator=g).to(DEV) for r in ref]
    got = torch.autograd.grad(out, ts, cots)
    want = torch.autograd.grad(ref, ts, cots)
    errs = {n: _rel(a, b) for n, a, b in zip(("y", "W0'", "W1'", "a0", "a1"), out, ref)}
    errs.update({f"d{n}": _rel(a, b) for n, a, b in zip(ARGS, got, want)})
    assert max(errs.values()) < TOL, errs


@pytest.mark.parametrize("read_start", [False, True])
def test_manual_backward_equals_autograd_in_float64(read_start: bool) -> None:
    """The hand-derived adjoints (``sgd_mlp_bwd_ref``, no triton) against autograd through
    ``run_dual`` on one chunk, float64, Di != Do, large steps: equal to rounding."""
    from nestlearn.loops.triton.sgd_mlp_bwd_ref import sgd_mlp_step_bwd_reference

    x = {n: t.double() for n, t in inputs(2, 16, d=16, hidden=32, d_out=8, lr_max=0.3, seed=9).items()}
    ts = [x[n].detach().clone().requires_grad_() for n in ARGS]
    pb = problem(dict(zip(ARGS, ts)), 16, read_start=read_start)
    y, st = run_dual(pb, state_of(dict(zip(ARGS, ts))))
    outs = (y, st["params"]["W0"], st["params"]["W1"])
    g = torch.Generator().manual_seed(10)
    cots = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(DEV) for o in outs]
    want = torch.autograd.grad(outs, ts, cots, retain_graph=True)
    got = sgd_mlp_step_bwd_reference(*(x[n] for n in ARGS), *cots, read_start=read_start)
    errs = {n: _rel(a, b) for n, a, b in zip(ARGS, got, want)}
    assert max(errs.values()) < 1e-12, errs
    # unused outputs (None cotangents) are zeros
    got = sgd_mlp_step_bwd_reference(*(x[n] for n in ARGS), cots[0], None, None, read_start=read_start)
    want = torch.autograd.grad(outs[0], ts, cots[0], allow_unused=True, materialize_grads=True)
    assert max(float((a - b).abs().max()) for a, b in zip(got, want)) < 1e-12 * max(float(w.abs().max()) for w in want)


@pytest.mark.parametrize("first", [0, 11])
def test_executor_row_equals_dual_from_any_offset(sgd_mlp: ModuleType, first: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_cms_triton`` from a state ``first`` tokens into a chunk, over the rest of that chunk,
    two whole chunks and a trailing partial one: the outputs and carried state of ``run_dual``."""
    x = inputs(2, first + 5 + 32 + 7 if first else 32 + 7, seed=4)
    pb = problem(x, 16)
    calls: list[int] = []
    real = glue._run_kernel
    monkeypatch.setattr(glue, "_run_kernel", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        st0 = state_of(x)
        if first:  # a state in the middle of a chunk (anchor != params, offset != 0)
            _, st0 = run_dual(pb.slice(0, first), st0)
            pb = pb.slice(first, pb.q.shape[2])
        y_ref, st_ref = run_dual(pb, st0)
        monkeypatch.setattr(glue, "_said", False)
        with pytest.warns(UserWarning, match="NESTLEARN_TRITON=0"):  # said once
            y, st = glue.run_cms_triton(pb, st0)
    assert calls == [1]
    assert _rel(y, y_ref) < TOL
    assert (st["offset"], st["chunks"], st["opt"]) == (st_ref["offset"], st_ref["chunks"], st_ref["opt"])
    for part in ("params", "anchor"):
        for n in st_ref[part]:
            assert _rel(st[part][n], st_ref[part][n]) < TOL, (part, n)


def test_executor_row_gradients_with_partial_chunks(sgd_mlp: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training through the row (``grad: unroll``): 5 tokens of a begun chunk on the closed form,
    two kernel chunks, 7 trailing tokens on the closed form; every gradient equals ``run_dual``'s."""
    x = inputs(2, 11 + 5 + 32 + 7, seed=5)
    monkeypatch.setattr(glue, "_said", True)
    calls: list[int] = []
    real = glue._run_kernel
    monkeypatch.setattr(glue, "_run_kernel", lambda *a: calls.append(1) or real(*a))

    def grads(fn: Any) -> tuple[torch.Tensor, ...]:
        ts = leaves(x)
        xs = dict(zip(ARGS, ts))
        b = xs["q"].shape[0]
        xs.update(w0=xs["w0"].expand(b, -1, -1, -1), w1=xs["w1"].expand(b, -1, -1, -1))
        pb = problem(xs, 16)
        _, st = run_dual(pb.slice(0, 11), state_of(xs))
        y, st = fn(pb.slice(11, pb.q.shape[2]), st)
        loss = (y * y.detach()).sum() + (st["params"]["W0"] ** 2).sum() + st["anchor"]["W1"].sum()
        return torch.autograd.grad(loss, ts)

    got = grads(glue.run_cms_triton)
    assert calls == [1]
    want = grads(run_dual)
    errs = {n: _rel(a, b) for n, a, b in zip(ARGS, got, want)}
    assert max(errs.values()) < TOL, errs


def test_supports_refuses_what_it_must(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly a CMS level: the memory, rule, objective and period (a clip is taken); CPU tensors never."""
    x = inputs(1, 32)
    pb = problem(x, 16)
    assert glue.shape_ok(pb) and glue._tensors_ok(pb)
    assert not glue.supports(pb) or CUDA  # the device comes first
    arch = pb.arch
    variants = {
        "residual": replace(pb, arch=MLPMemory(32, 32, 1, expand=2, residual=True)),
        "bias": replace(pb, arch=MLPMemory(32, 32, 1, expand=2, residual=False, bias=True)),
        "silu": replace(pb, arch=MLPMemory(32, 32, 1, expand=2, residual=False, act="silu")),
        "depth 3": replace(pb, arch=MLPMemory(32, 32, 1, expand=2, residual=False, depth=3)),
        "width 24": replace(pb, arch=MLPMemory(24, 24, 1, expand=2, residual=False)),
        "momentum": replace(pb, rule=rules.momentum(0.0, 0.9), hp={**pb.hp, "beta": 0.9}),
        "decay gate": replace(pb, hp={**pb.hp, "decay": x["lr"]}),
        "decay 0.1": replace(pb, hp={**pb.hp, "decay": 0.1}),
        "decay_to init": replace(pb, rule=rules.sgd(0.0, decay_to="init")),
        "dgd": replace(pb, rule=rules.dgd(0.0, 0.0, 0.0)),
        "dot": replace(pb, objective=objectives.dot),
        "period 8": replace(pb, period=8),
        "period 24": replace(pb, period=24),
        "period 128": replace(pb, period=128),
    }
    assert arch is pb.arch
    refused = {n for n, p in variants.items() if not glue.shape_ok(p)}
    assert refused == set(variants)
    assert glue.shape_ok(replace(pb, period=48)) and glue.shape_ok(replace(pb, read_start=True))
    assert glue.shape_ok(replace(pb, clip=1.0))
    assert not glue._tensors_ok(replace(pb, q=pb.q.double()))
    monkeypatch.setenv("NESTLEARN_TRITON", "0")
    assert not glue.supports(pb)


@pytest.mark.parametrize("mode", ["unroll", "first_order", "stop", "truncate:2"])
def test_only_unroll_gradients_take_the_kernel(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With gradients wanted only ``unroll`` (what the backward computes) takes the kernel, the
    other modes the closed form; without gradients every mode does (the values are the same).
    ``NESTLEARN_TRITON=infer`` (or 0) keeps training on the closed form."""
    x = inputs(1, 32)
    x["w0"] = x["w0"].clone().requires_grad_()
    pb = problem(x, 16, grad=mode)
    called: list[int] = []
    monkeypatch.setattr(glue, "_run_kernel", lambda *a: called.append(1) or run_dual(*a))
    monkeypatch.setattr(glue, "_said", True)
    glue.run_cms_triton(pb, state_of(x))
    assert called == ([1] if mode == "unroll" else [])
    with torch.no_grad():
        glue.run_cms_triton(pb, state_of(x))
    assert called[-1:] == [1]
    ts = glue._tensors(pb) + [x["w0"]]
    assert glue._grad_ok(pb, ts) == (mode == "unroll")
    for flag in ("infer", "0"):
        monkeypatch.setenv("NESTLEARN_TRITON", flag)
        assert not glue._grad_ok(pb, ts)
    monkeypatch.delenv("NESTLEARN_TRITON")
    monkeypatch.setenv("NESTLEARN_CMS_TRITON", "infer")  # the default: training stays on the closed form
    assert not glue._grad_ok(pb, ts)


def test_the_table_picks_the_row_before_dual(monkeypatch: pytest.MonkeyPatch) -> None:
    """The row sits before ``dual`` and serves what ``dual`` serves, once ``supports`` says yes."""
    from nestlearn.loops.executors import EXECUTORS, pick

    names = [row.name for row in EXECUTORS]
    assert names.index("cms_triton") == names.index("dual") - 1
    pb = problem(inputs(1, 32), 16)
    assert pick(pb).name == "dual"  # CPU tensors
    monkeypatch.setattr(glue, "supports", lambda pb: glue.shape_ok(pb))
    assert pick(pb).name == pick(pb, "chunked").name == "cms_triton"
    assert pick(replace(pb, rule=rules.momentum(0.0, 0.9), hp={**pb.hp, "beta": 0.9})).name == "dual"


def test_shipped_hope_trains_through_the_kernel_on_cpu(sgd_mlp: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """models/hope.yaml at width 32 with the row's device check lifted: the kernel (interpreted)
    serves the CMS levels of period 16 and 32 (the slow level's 128 is beyond the kernel's chunks
    and stays on ``dual``): one training step's loss and every
    parameter gradient equal those with the closed form; 40 tokens, so a partial chunk too."""
    import nestlearn

    torch.manual_seed(0)
    overrides = ["model.dim=32", "model.depth=1", "model.heads=2", "levels.cms_mid.period=32",
                 "levels.cms_slow.period=128"]
    model = nestlearn.compile(ROOT / "models" / "hope.yaml", overrides).to(DEV)
    tokens = torch.randint(0, 256, (2, 40), device=DEV)
    calls: list[int] = []
    real = glue._run_kernel
    monkeypatch.setattr(glue, "_run_kernel", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(glue, "_said", True)

    def step(kernel: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setattr(glue, "supports", lambda pb: kernel and glue.shape_ok(pb) and glue._tensors_ok(pb)
                            and glue._grad_ok(pb, glue._tensors(pb)))
        model.zero_grad()
        out, _ = model(tokens)
        loss = torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step(True)
    assert len(calls) == 2  # c1 and c2 of the one block
    loss_ref, grads_ref = step(False)
    assert len(calls) == 2
    assert _rel(loss, loss_ref) < TOL and grads.keys() == grads_ref.keys()
    errs = {n: _rel(grads[n], g) for n, g in grads_ref.items() if g.abs().max() > 0}
    assert max(errs.values()) < TOL, sorted(errs.items(), key=lambda e: -e[1])[:5]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_hope_c1_size_on_gpu(sgd_mlp: ModuleType) -> None:
    """HOPE's fast CMS level at full width (512 -> 1024 -> 512, chunk 16, lr ~ 3e-5 sigmoid(.)) at
    batch 2 x 256 tokens: outputs, end weights and every gradient against ``run_dual`` (fp32)."""
    x = inputs(2, 256, d=512, hidden=1024, seed=6, lr_max=3e-5)
    ts = leaves(x)
    out = call(sgd_mlp.sgd_mlp, ts, chunk=16)
    ref = call(sgd_mlp.sgd_mlp_reference, ts, chunk=16, grad="unroll")
    g = torch.Generator().manual_seed(7)
    cots = [torch.randn(r.shape, generator=g).to(DEV) for r in ref]
    got = torch.autograd.grad(out, ts, cots)
    want = torch.autograd.grad(ref, ts, cots)
    errs = {n: _rel(a, b) for n, a, b in zip(("y", "W0'", "W1'", "a0", "a1"), out, ref)}
    errs.update({f"d{n}": _rel(a, b) for n, a, b in zip(ARGS, got, want)})
    assert max(errs.values()) < TOL, errs
    # a large step too (lr up to 0.1): the in-chunk terms dominate
    x = inputs(2, 16, d=512, hidden=1024, seed=8, lr_max=0.1)
    y, w0, w1 = sgd_mlp.sgd_mlp_step_fwd(*(x[n] for n in ARGS))
    ref1 = sgd_mlp.sgd_mlp_reference(*(x[n] for n in ARGS), chunk=16)
    assert max(_rel(y, ref1.y), _rel(w0, ref1.weights[0]), _rel(w1, ref1.weights[1])) < TOL


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_shipped_hope_on_gpu(sgd_mlp: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """models/hope.yaml at its shipped size on CUDA: the row serves c1 (and nothing else of the
    CMS: 256 / 2048 are beyond its chunks) through ``loops.run``; a training step's loss and every
    gradient equal those with the row switched off (``NESTLEARN_TRITON=infer``)."""
    import nestlearn

    torch.manual_seed(0)
    model = nestlearn.compile(ROOT / "models" / "hope.yaml").to(DEV)
    tokens = torch.randint(0, 256, (2, 512), device=DEV)
    calls: list[int] = []
    real = glue._run_kernel
    monkeypatch.setattr(glue, "_run_kernel", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(glue, "_said", True)

    def step(flag: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setenv("NESTLEARN_TRITON", flag)
        model.zero_grad()
        out, _ = model(tokens)
        loss = torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = step("1")
    assert len(calls) == 4  # c1 of each of the 4 blocks
    loss_ref, grads_ref = step("infer")
    assert len(calls) == 4
    assert _rel(loss, loss_ref) < 1e-4
    errs = {n: _rel(grads[n], g) for n, g in grads_ref.items() if g.abs().max() > 0}
    assert max(errs.values()) < 1e-3, sorted(errs.items(), key=lambda e: -e[1])[:5]


def _ptxas() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and spec.origin is not None and (
        Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas(), reason="no NVIDIA backend (ptxas) in this triton")
def test_compiles_for_hopper_without_a_gpu() -> None:
    """The interpreter accepts what a GPU compile may refuse: compile the four kernels at c1's
    size (512 -> 1024, chunk 16) for sm_90 through triton's own ptxas, in a fresh process without
    ``TRITON_INTERPRET`` (this one decorated the kernels for the interpreter)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    code = "from bench.triton_cms import ptxas_shared; print(ptxas_shared())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(name in done.stdout for name in ("_signals", "_error", "_update", "_read")), done.stdout


# the fused backward (``sgd_mlp_bwd.py``)

def _fused_bwd() -> ModuleType:
    """The fused backward's module, imported inside a test (the ``sgd_mlp`` fixture has set
    ``TRITON_INTERPRET`` on the CPU, so its kernels are decorated for the interpreter)."""
    return importlib.import_module("nestlearn.loops.triton.sgd_mlp_bwd")


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``_rel``, and exact where the reference is exactly zero (an input the outputs ignore)."""
    return _rel(a, b) if b.abs().max() > 0 else float(a.abs().max())


@pytest.mark.parametrize("chunk,d,hidden,d_out,block_h,block_d", [
    (16, 32, 64, None, None, None),  # one hidden tile, one column block
    (16, 32, 64, None, 32, 16),      # two hidden tiles, two column blocks
    (48, 32, 48, 16, 16, 16),        # three tiles; a chunk padded to 64; Di != Do (two blocks / one)
    (16, 16, 48, 32, 16, 16),        # three tiles; one block of Di, two of Do
])
@pytest.mark.parametrize("read_start", [False, True])
def test_fused_backward_equals_spec_and_autograd(sgd_mlp: ModuleType, chunk: int, d: int, hidden: int,
                                                 d_out: int | None, block_h: int | None, block_d: int | None,
                                                 read_start: bool) -> None:
    """One chunk with large steps (the in-chunk terms matter): ``sgd_mlp_step_bwd`` at every
    tiling equals ``sgd_mlp_bwd_ref`` on the same inputs and autograd through ``run_dual``, for
    the cotangents of all three outputs, of ``y`` alone and of the end weights alone (``None``
    for the rest)."""
    from nestlearn.loops.triton.sgd_mlp_bwd_ref import sgd_mlp_step_bwd_reference

    bwd = _fused_bwd()
    x = inputs(2, chunk, d, hidden, d_out, lr_max=0.1, seed=11)  # stride-0 start weights, read in place
    ts = [x[n].detach().clone().requires_grad_() for n in ARGS]
    ref = sgd_mlp.sgd_mlp_reference(*ts, chunk=chunk, read_start=read_start, grad="unroll")
    outs = (ref.y, *ref.weights)
    g = torch.Generator().manual_seed(12)
    cots = [torch.randn(o.shape, generator=g).to(DEV) for o in outs]
    for keep in ((0, 1, 2), (0,), (1, 2)):
        cs = [c if i in keep else None for i, c in enumerate(cots)]
        got = bwd.sgd_mlp_step_bwd(*(x[n] for n in ARGS), *cs, read_start=read_start, block_h=block_h,
                                   block_d=block_d)
        spec = sgd_mlp_step_bwd_reference(*(x[n] for n in ARGS), *cs, read_start=read_start)
        want = torch.autograd.grad([outs[i] for i in keep], ts, [cots[i] for i in keep], retain_graph=True,
                                   allow_unused=True, materialize_grads=True)
        errs = {f"d{n} {what}": _err(a, b) for n, a, s, w in zip(ARGS, got, spec, want)
                for what, b in (("spec", s), ("autograd", w))}
        assert max(errs.values()) < TOL, (keep, errs)
        assert all(a.shape == w.shape for a, w in zip(got, want))


@pytest.mark.parametrize("chunk,t", [(16, 48), (48, 96)])
@pytest.mark.parametrize("read_start", [False, True])
def test_fused_backward_over_chunks(sgd_mlp: ModuleType, chunk: int, t: int, read_start: bool,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``SGDMLPStep``'s default backward is the fused one, at the forward's precision: several
    chunks at batch 2, two heads, 32 -> 48 -> 32 (three hidden tiles), chunks of 16 and padded 48;
    ``autograd.grad`` of y, the end weights and the anchor (random cotangents) to q, k, v, lr
    and the initial weights equals that through ``run_dual``."""
    bwd = _fused_bwd()
    assert sgd_mlp.BACKWARD == "fused"
    seen: list[tuple[str, bool]] = []
    real = bwd.sgd_mlp_step_bwd

    def spy(*a: Any, **kw: Any) -> Any:
        seen.append((kw["precision"], kw["read_start"]))
        return real(*a, **kw)

    monkeypatch.setattr(bwd, "sgd_mlp_step_bwd", spy)
    ts = leaves(inputs(2, t, hidden=48, heads=2, seed=13, lr_max=0.02))
    out = call(sgd_mlp.sgd_mlp, ts, chunk=chunk, read_start=read_start)
    ref = call(sgd_mlp.sgd_mlp_reference, ts, chunk=chunk, read_start=read_start, grad="unroll")
    g = torch.Generator().manual_seed(14)
    cots = [torch.randn(r.shape, generator=g).to(DEV) for r in ref]
    got = torch.autograd.grad(out, ts, cots)
    want = torch.autograd.grad(ref, ts, cots)
    assert seen == [("ieee", read_start)] * (t // chunk)
    errs = {f"d{n}": _rel(a, b) for n, a, b in zip(ARGS, got, want)}
    assert max(errs.values()) < TOL, errs


@pytest.mark.skipif(not _ptxas(), reason="no NVIDIA backend (ptxas) in this triton")
def test_fused_backward_compiles_for_hopper_without_a_gpu() -> None:
    """The fused backward's four kernels at c1's size (512 -> 1024 -> 512, chunk 16) compile for
    sm_90 through triton's ptxas (a fresh process without ``TRITON_INTERPRET``); prints each one's
    registers, spills (``STACK``, bytes per thread) and shared memory (``pytest -s`` shows them)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = "from bench.triton_cms import ptxas_bwd; print(ptxas_bwd())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    print("fused backward, sm_90, c1 (chunk 16, 4 warps):", done.stdout.strip())
    assert done.stdout.count("REG:") == 4, done.stdout
    assert all(name in done.stdout for name in ("_bwd_local", "_bwd_error", "_bwd_weights", "_bwd_inputs"))
