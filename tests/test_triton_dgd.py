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

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = 1e-4  # relative to the tensor's largest entry; fp32 rounding gives ~1e-6 here
ROOT = Path(__file__).resolve().parents[1]


def _import_kernel() -> tuple[ModuleType | None, str]:
    """``(the kernel module, '')``, or ``(None, why not)``."""
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed"
    if CUDA:
        return importlib.import_module("nestlearn.loops.triton.dgd_mlp"), ""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        return None, "triton was imported before this file without TRITON_INTERPRET=1: run this file on its own"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module("nestlearn.loops.triton.dgd_mlp"), ""
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


_KERNEL, _WHY = _import_kernel()


@pytest.fixture
def dgd_mlp(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The kernel module; on the CPU with ``TRITON_INTERPRET=1`` set during the test (triton
    imports parts of itself at the first launch, and they must be interpreted too)."""
    if _KERNEL is None:
        pytest.skip(_WHY)
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return _KERNEL


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


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


def test_a_state_that_wants_gradients_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward only: with grad mode on and a state that requires grad, the closed form runs."""
    x = inputs(1, 1, 32, 16, device="cpu")
    x["weights"] = tuple(w.clone().requires_grad_() for w in x["weights"])
    called = []
    monkeypatch.setattr(glue, "_run_kernel", lambda *a: called.append(1))
    glue.run_dgd_triton(problem(x, 16), state_of(x))
    assert not called


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
    monkeypatch.delenv("NESTLEARN_TRITON")
    wants = problem({**x, "q": x["q"].clone().requires_grad_()}, 16)
    assert not glue.supports(wants)
    with torch.no_grad():
        assert glue.supports(wants)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("precision,tol", [("ieee", TOL), ("tf32x3", 1e-3)])
def test_gpu_full_head_size(dgd_mlp: ModuleType, clip: float | None, precision: str, tol: float,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """HOPE's head (64), chunk (16) and heads (8) over 2,048 tokens (128 chunks), against the
    closed form in fp32 (no TF32 in its matmuls). 3xTF32 (tensor cores) is held to 1e-3: where
    it stays near the ieee figures it can become the default (``dgd_triton.precision``)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x = inputs(2, 8, 2048, 64, seed=5)
    ref = dgd_mlp.dgd_mlp_fwd_reference(**x, chunk=16, clip=clip)
    errs = check(dgd_mlp.dgd_mlp_fwd(**x, chunk=16, clip=clip, precision=precision), ref, tol)
    print(precision, clip, errs)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_shipped_hope_dispatches_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """models/hope.yaml (smaller width, HOPE's head size) under no_grad: the kernel serves its
    self-modifying memory and the logits match the closed form's; with grad it does not run."""
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
    calls.clear()
    model(tokens)[0].sum().backward()
    assert not calls


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
    code = "from bench.triton_dgd import ptxas_usage; print(ptxas_usage(64, 16))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "REG:" in done.stdout, done.stdout
