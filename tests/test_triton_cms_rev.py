"""The CMS chunk loop that rebuilds its chunk-start weights in the backward
(``nestlearn/loops/triton/sgd_mlp_rev.py``): outputs and every outer gradient equal the closed
form (``run_dual``), the saved tensors are the signals and every ``keep``-th weights (their
bytes by formula), and the executor row trains through it. On the CPU through Triton's
interpreter at small widths; the c1-size comparison with the per-chunk path runs on a GPU."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import pytest
import torch

from nestlearn.loops import cms_triton as glue
from nestlearn.loops.common import TokenScale
from nestlearn.loops.dual import run_dual
from tests.test_triton_cms import ARGS, CUDA, DEV, TOL, _rel, call, inputs, leaves, problem, state_of
from tests.triton_interpret import import_kernels, kernel_for_test

_KERNEL, _WHY = import_kernels("nestlearn.loops.triton.sgd_mlp_rev", "nestlearn.loops.triton.sgd_mlp")


@pytest.fixture
def rev(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The module; on the CPU with ``TRITON_INTERPRET=1`` set during the test, on CUDA fp32
    products without TF32 (restored after)."""
    if CUDA:
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    return kernel_for_test(_KERNEL, _WHY, monkeypatch)


def _grads(fn: Any, ts: list[torch.Tensor], seed: int, **kw: Any) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
    out = call(fn, ts, **kw)
    g = torch.Generator().manual_seed(seed)
    cots = [torch.randn(o.shape, generator=g).to(DEV) for o in out]
    return out, torch.autograd.grad(out, ts, cots)


@pytest.mark.parametrize("keep,read_start", [(2, False), (3, True), (16, False)])
def test_rebuilt_weights_equal_closed_form(rev: ModuleType, keep: int, read_start: bool) -> None:
    """Five chunks at batch 2, two heads, 32 -> 48 -> 32: every output (y, end weights, anchor) and
    the gradient of all of them (random cotangents) to q, k, v, lr and the initial weights equal
    ``run_dual``'s, whether the walk restarts from saved weights every 2 / 3 chunks or rebuilds
    all four (keep 16)."""
    from nestlearn.loops.triton import sgd_mlp

    ts = leaves(inputs(2, 80, hidden=48, heads=2, seed=13, lr_max=0.02))
    out, got = _grads(rev.sgd_mlp_chunks, ts, 14, chunk=16, keep=keep, read_start=read_start)
    ref, want = _grads(sgd_mlp.sgd_mlp_reference, ts, 14, chunk=16, read_start=read_start, grad="unroll")
    errs = {n: _rel(a, b) for n, a, b in zip(("y", "W0'", "W1'", "a0", "a1"), out, ref)}
    errs.update({f"d{n}": _rel(a, b) for n, a, b in zip(ARGS, got, want)})
    assert max(errs.values()) < TOL, errs


def test_a_long_rebuilt_walk_stays_exact(rev: ModuleType) -> None:
    """Twenty chunks rebuilt from the end weights alone (keep 32) with steps of lr up to 0.02:
    the rebuilt weights' rounding does not accumulate past the fp32 tolerance."""
    from nestlearn.loops.triton import sgd_mlp

    ts = leaves(inputs(1, 320, d=16, hidden=32, seed=21, lr_max=0.02))
    _, got = _grads(rev.sgd_mlp_chunks, ts, 22, chunk=16, keep=32)
    _, want = _grads(sgd_mlp.sgd_mlp_reference, ts, 22, chunk=16, grad="unroll")
    errs = {f"d{n}": _rel(a, b) for n, a, b in zip(ARGS, got, want)}
    assert max(errs.values()) < TOL, errs


SCALES = [TokenScale(clip=20.0), TokenScale(clip=2.0), TokenScale(max_gain=0.3, steps=16.0),
          TokenScale(clip=20.0, max_gain=0.5, steps=16.0)]


@pytest.mark.parametrize("scale", SCALES, ids=str)
def test_scaled_rate_equals_closed_form(rev: ModuleType, scale: TokenScale) -> None:
    """The level's per-token ``clip`` and ``max_gain`` (a scale of each token's rate,
    ``scaled_rate``): outputs and every gradient, through the scale too, equal ``run_dual`` with
    the same level settings (which scales its signals, ``chunks.chunk_signals``); at these sizes
    the clip binds on every token (the first chunk's scales are 0.06-0.23 already at clip 8) and
    so does the cap, so the outputs differ from the unscaled."""
    from nestlearn.loops.triton import sgd_mlp

    ts = leaves(inputs(2, 64, hidden=48, heads=2, seed=13, lr_max=0.02))
    out, got = _grads(rev.sgd_mlp_chunks, ts, 14, chunk=16, keep=2, scale=scale)
    ref, want = _grads(sgd_mlp.sgd_mlp_reference, ts, 14, chunk=16, grad="unroll", scale=scale)
    free, _ = _grads(sgd_mlp.sgd_mlp_reference, ts, 14, chunk=16, grad="unroll")
    assert _rel(ref[0], free[0]) > 0.1  # the clip changes the outputs
    errs = {n: _rel(a, b) for n, a, b in zip(("y", "W0'", "W1'", "a0", "a1"), out, ref)}
    errs.update({f"d{n}": _rel(a, b) for n, a, b in zip(ARGS, got, want)})
    assert max(errs.values()) < TOL, errs


def _saved_bytes(fn: Any, x: dict[str, torch.Tensor], **kw: Any) -> int:
    """Bytes of the tensors the backward keeps that are not the inputs' storage."""
    ts = [x[n].detach().clone().requires_grad_() for n in ARGS]
    inputs_ = {t.untyped_storage().data_ptr() for t in ts}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs_:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*ts, **kw)
    return sum(seen.values())


def test_saves_signals_and_every_keepth_weights(rev: ModuleType) -> None:
    """Eight chunks of 16 at 128 -> 256 -> 128, keep 4: the backward keeps the signals
    ``z, zq, d0 [n, 256]``, ``d1 [n, 128]`` per chunk, the weights at chunk 4's start and the end
    weights (chunk 0's are the input) -- nothing else; the per-chunk path keeps seven chunk-start
    weights, 1.9x as much at this small width (the signals are 18x smaller than the weights at
    HOPE's 512 -> 1,024 with chunks of 16)."""
    from nestlearn.loops.triton import sgd_mlp

    d, hidden, chunks, keep = 128, 256, 8, 4
    x = inputs(1, 16 * chunks, d=d, hidden=hidden, seed=31)
    x = {n: t.contiguous() for n, t in x.items()}
    weights = 4 * 2 * d * hidden
    got = _saved_bytes(rev.sgd_mlp_chunks, x, chunk=16, keep=keep)
    assert got == 4 * chunks * 16 * (3 * hidden + d) + (math.ceil(chunks / keep) - 1) * weights + weights
    per_chunk = _saved_bytes(sgd_mlp.sgd_mlp, x, chunk=16)
    assert per_chunk == (chunks - 1) * weights
    assert per_chunk / got > 1.8


def test_the_switch(rev: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    for raw, want in (("", rev.KEEP_EVERY), ("1", 1), ("8", 8)):
        monkeypatch.setenv("NESTLEARN_CMS_KEEP_EVERY", raw)
        assert rev.keep_every() == want
    for raw in ("0", "many"):
        monkeypatch.setenv("NESTLEARN_CMS_KEEP_EVERY", raw)
        with pytest.warns(UserWarning, match="not a positive integer"):
            assert rev.keep_every() == rev.KEEP_EVERY


@pytest.mark.parametrize("keep,bounds", [("", {}), ("1", {}), ("", {"clip": 2.0}), ("1", {"clip": 2.0}),
                                         ("", {"max_gain": 0.3, "gain_steps": 16.0}),
                                         ("1", {"max_gain": 0.3, "gain_steps": 16.0})])
def test_executor_row_trains_through_it(rev: ModuleType, keep: str, bounds: dict[str, float],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_cms_triton`` with gradients over three whole chunks takes the rebuilt-weights node
    (``NESTLEARN_CMS_KEEP_EVERY=1``: the per-chunk steps); either way, with or without the
    level's ``clip`` or ``max_gain``, every gradient of the outputs, end weights and anchor equals ``run_dual``'s.
    Without gradients it never does, and its outputs equal ``run_dual``'s too."""
    monkeypatch.setenv("NESTLEARN_CMS_KEEP_EVERY", keep)
    monkeypatch.setattr(glue, "_said", True)
    calls: list[int] = []
    real = rev.sgd_mlp_chunks
    monkeypatch.setattr(rev, "sgd_mlp_chunks", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = inputs(2, 48, seed=41)

    def grads(fn: Any) -> tuple[torch.Tensor, ...]:
        ts = leaves(x)
        xs = dict(zip(ARGS, ts))
        b = xs["q"].shape[0]
        xs.update(w0=xs["w0"].expand(b, -1, -1, -1), w1=xs["w1"].expand(b, -1, -1, -1))
        y, st = fn(problem(xs, 16, **bounds), state_of(xs))
        loss = (y * y.detach()).sum() + (st["params"]["W0"] ** 2).sum() + (st["anchor"]["W1"] ** 3).sum()
        return torch.autograd.grad(loss, ts)

    got = grads(glue.run_cms_triton)
    assert calls == ([1] if keep == "" else [])
    want = grads(run_dual)
    errs = {n: _rel(a, b) for n, a, b in zip(ARGS, got, want)}
    assert max(errs.values()) < TOL, errs
    with torch.no_grad():
        y, _ = glue.run_cms_triton(problem(x, 16, **bounds), state_of(x))
        y_ref, _ = run_dual(problem(x, 16, **bounds), state_of(x))
    assert len(calls) == (1 if keep == "" else 0)
    assert _rel(y, y_ref) < TOL


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_hope_c1_size_on_gpu(rev: ModuleType) -> None:
    """HOPE's fast CMS level at full width (512 -> 1,024 -> 512, chunk 16) over 64 chunks at batch
    2: gradients equal the per-chunk path's and the closed form's, and the peak memory of forward
    + backward is below the per-chunk path's."""
    from nestlearn.loops.triton import sgd_mlp

    x = inputs(2, 1024, d=512, hidden=1024, seed=51, lr_max=3e-5)
    ts = leaves(x)
    peaks, grads = [], []
    for fn, kw in ((rev.sgd_mlp_chunks, {}), (sgd_mlp.sgd_mlp, {}), (sgd_mlp.sgd_mlp_reference, {"grad": "unroll"})):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads.append(_grads(fn, ts, 52, chunk=16, **kw)[1])
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    for got in grads[:2]:
        errs = {f"d{n}": _rel(a, b) for n, a, b in zip(ARGS, got, grads[2])}
        assert max(errs.values()) < TOL, errs
    assert peaks[0] < 0.5 * peaks[1], peaks
