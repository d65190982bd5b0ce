"""The chunk-parallel delta rule (loops/delta.py) equals the sequential oracle in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nestlearn.loops import MemoryProblem, init_state, run_sequential
from nestlearn.loops.common import GradMode
from nestlearn.loops.delta import delta_rule, run_delta, supports
from nestlearn.memories import LinearMemory
from nestlearn.objectives import l2
from nestlearn.rules import momentum, sgd

B, H, T, DK, DV = 2, 3, 37, 5, 4
D = torch.float64


def _inputs(seed: int, decay: bool, t: int = T):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, t, DK, generator=g, dtype=D)
    k = torch.nn.functional.normalize(torch.randn(B, H, t, DK, generator=g, dtype=D), dim=-1)
    v = torch.randn(B, H, t, DV, generator=g, dtype=D)
    lr = 0.4 * torch.rand(B, H, t, generator=g, dtype=D)
    hp: dict = {"lr": lr}
    if decay:
        hp["decay"] = 0.3 * torch.rand(B, H, t, generator=g, dtype=D)
    w0 = 0.5 * torch.randn(B, H, DV, DK, generator=g, dtype=D)
    return q, k, v, hp, w0


def _problem(q, k, v, hp, grad="unroll"):
    arch = LinearMemory(DK, DV, H)
    rule = sgd(0.1, 0.1 if "decay" in hp else 0.0)
    return MemoryProblem(arch, rule, l2, q, k, v, hp, 1, GradMode.parse(grad))


def _state(pb, w0):
    st = init_state(pb.arch, pb.rule, {"W": w0[0]}, B)
    st["params"] = {"W": w0}
    st["anchor"] = {"W": w0}
    return st


def plain_delta(q, k, v, lr, decay, w):
    """DeltaNet written out: W <- (1 - decay) W - 2 lr (W k - v) k^T; y = W q."""
    ys = []
    for t in range(q.shape[2]):
        kt, vt, qt = k[:, :, t], v[:, :, t], q[:, :, t]
        err = torch.einsum("bhoi,bhi->bho", w, kt) - vt
        a = 1.0 if decay is None else (1 - decay[:, :, t])[..., None, None]
        w = a * w - 2 * lr[:, :, t][..., None, None] * err.unsqueeze(-1) * kt.unsqueeze(-2)
        ys.append(torch.einsum("bhoi,bhi->bho", w, qt))
    return torch.stack(ys, 2), w


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 8, 64])
def test_matches_sequential_and_plain_loop(decay, chunk):
    q, k, v, hp, w0 = _inputs(0, decay)
    pb = _problem(q, k, v, hp)
    assert supports(pb)
    y, st = run_delta(pb, _state(pb, w0), chunk=chunk)
    y_ref, st_ref = run_sequential(pb, _state(pb, w0))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st["params"]["W"], st_ref["params"]["W"], rtol=1e-10, atol=1e-10)
    y_p, w_p = plain_delta(q, k, v, hp["lr"], hp.get("decay"), w0)
    torch.testing.assert_close(y, y_p, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st["params"]["W"], w_p, rtol=1e-10, atol=1e-10)
    assert st["chunks"] == st_ref["chunks"] and st["offset"] == st_ref["offset"] == 0


@pytest.mark.parametrize("decay", [False, True])
def test_piecewise_with_carried_state(decay):
    q, k, v, hp, w0 = _inputs(1, decay)
    pb = _problem(q, k, v, hp)
    y_full, st_full = run_delta(pb, _state(pb, w0), chunk=8)
    st = _state(pb, w0)
    ys = []
    for t0, t1 in [(0, 5), (5, 6), (6, 23), (23, T)]:
        part = _problem(q[:, :, t0:t1], k[:, :, t0:t1], v[:, :, t0:t1],
                        {n: h[..., t0:t1] for n, h in hp.items()})
        y, st = run_delta(part, st, chunk=8)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 2), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st["params"]["W"], st_full["params"]["W"], rtol=1e-10, atol=1e-10)
    assert st["chunks"] == st_full["chunks"] == T


def test_scalar_hypers():
    q, k, v, _, w0 = _inputs(2, False)
    hp = {"lr": torch.tensor(0.3, dtype=D), "decay": 0.05}
    pb = _problem(q, k, v, hp)
    y, st = run_delta(pb, _state(pb, w0), chunk=16)
    # the reference gets the same values per token (a 0-dim tensor is a learned scalar)
    full = _problem(q, k, v, {"lr": torch.full((B, H, T), 0.3, dtype=D), "decay": 0.05})
    y_ref, st_ref = run_sequential(full, _state(pb, w0))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st["params"]["W"], st_ref["params"]["W"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grad", ["unroll", "first_order"])
@pytest.mark.parametrize("decay", [False, True])
def test_gradients_match_sequential(grad, decay):
    q, k, v, hp, w0 = _inputs(3, decay, t=19)
    leaves = [q, k, v, w0, *hp.values()]
    for x in leaves:
        x.requires_grad_()
    g = torch.Generator().manual_seed(9)
    wy = torch.randn(B, H, 19, DV, generator=g, dtype=D)
    ww = torch.randn(B, H, DV, DK, generator=g, dtype=D)

    def outer(executor):
        pb = _problem(q, k, v, hp, grad)
        y, st = executor(pb, _state(pb, w0))
        loss = (y * wy).sum() + (st["params"]["W"] * ww).sum()
        gs = torch.autograd.grad(loss, leaves, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs, strict=True)]

    got = outer(lambda pb, st: run_delta(pb, st, chunk=4))
    ref = outer(run_sequential)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_gradcheck_core():
    q, k, v, hp, w0 = _inputs(4, True, t=6)
    beta, alpha = 2 * hp["lr"], 1 - hp["decay"]
    args = [x.clone().requires_grad_() for x in (q, k, v, beta, alpha, w0)]
    assert torch.autograd.gradcheck(lambda *a: delta_rule(*a, chunk=4), args)


def test_rejects_other_problems():
    q, k, v, hp, _ = _inputs(5, False)
    pb = _problem(q, k, v, hp)
    assert not supports(MemoryProblem(pb.arch, momentum(0.1, 0.9), l2, q, k, v, hp, 1, pb.grad))
    assert not supports(MemoryProblem(pb.arch, pb.rule, l2, q, k, v, hp, 4, pb.grad))
    biased = LinearMemory(DK, DV, H, bias=True)
    assert not supports(MemoryProblem(biased, pb.rule, l2, q, k, v, hp, 1, pb.grad))
    assert not supports(MemoryProblem(pb.arch, pb.rule, l2, q, k, v, hp, 1, GradMode.parse("stop")))


def test_float32_state_with_bf16_inputs():
    q, k, v, hp, w0 = _inputs(6, True)
    pb = _problem(q.bfloat16(), k.bfloat16(), v.bfloat16(), {n: h.bfloat16() for n, h in hp.items()})
    y, st = run_delta(pb, _state(pb, w0.bfloat16()), chunk=8)
    assert y.dtype == torch.bfloat16 and st["params"]["W"].dtype == torch.float32
    y_ref, _ = run_delta(_problem(q, k, v, hp), _state(pb, w0), chunk=8)
    assert (y.double() - y_ref).norm() / y_ref.norm() < 3e-2


@pytest.mark.parametrize("chunk", [16, 32])
def test_the_level_chunk_reaches_the_fast_path(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``levels.<name>.chunk`` is the compute chunk the delta-rule fast path runs with."""
    import nestlearn
    import nestlearn.loops.executors as loops

    seen: list[int | None] = []
    real = loops.run_delta

    def spy(pb, state, chunk_arg=None):  # noqa: ANN001, ANN202
        seen.append(chunk_arg)
        return real(pb, state, chunk_arg)

    monkeypatch.setattr(loops, "run_delta", spy)
    path = Path(__file__).resolve().parents[1] / "specs" / "deltanet.yaml"
    overrides = ["model.dim=16", "model.depth=1", "model.heads=2", f"levels.memory.chunk={chunk}"]
    spec = nestlearn.load_spec(path, overrides=overrides)
    nestlearn.compile(spec)(torch.randint(0, 256, (1, 40)))
    assert seen == [chunk]


def test_long_sequence_takes_the_automatic_chunk_and_stays_exact() -> None:
    """Past 1K tokens the default chunk grows (fewer sequential chunk steps); same result."""
    from nestlearn.loops.delta import auto_chunk

    assert auto_chunk(1024) == 64 and auto_chunk(4100) == 128 and auto_chunk(65536) == 256
    g = torch.Generator().manual_seed(5)
    t = 4100
    q, v = torch.randn(1, 1, t, DK, generator=g, dtype=D), torch.randn(1, 1, t, DV, generator=g, dtype=D)
    k = torch.nn.functional.normalize(torch.randn(1, 1, t, DK, generator=g, dtype=D), dim=-1)
    lr, decay = 0.4 * torch.rand(1, 1, t, generator=g, dtype=D), 0.05 * torch.rand(1, 1, t, generator=g, dtype=D)
    w0 = 0.5 * torch.randn(1, 1, DV, DK, generator=g, dtype=D)
    y, w = delta_rule(q, k, v, 2 * lr, 1 - decay, w0)
    y_p, w_p = plain_delta(q, k, v, lr, decay, w0)
    torch.testing.assert_close(y, y_p, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w, w_p, rtol=1e-9, atol=1e-9)
