"""The closed form's blocked read (``dual.blocked_read``): a long chunk of a rule without
forgetting or momentum (HOPE's CMS levels) read block by block instead of through ``n x n``
scores. Float64 against the plain token-by-token reference, and against the dense read for
what the reference does not cover (biases), with ``BLOCK`` made small so that short sequences
take the blocked path."""

from __future__ import annotations

import zlib

import pytest
import torch

from nestlearn import objectives, rules
from nestlearn.loops import GradMode, MemoryProblem, dual, init_state, run
from nestlearn.memories import LinearMemory, MLPMemory
from tests import reference as ref

B, H, T, D = 2, 2, 21, 3  # period 8: two whole chunks (blocked at BLOCK 4) and a partial one (dense)
PERIOD = 8
DT = torch.float64


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dual, "BLOCK", 4)


def problem(mem: str, read_start: bool, seed: str, bias: bool = False):
    g = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
    arch = LinearMemory(D, D, H, init_std=0.5) if mem == "linear" else MLPMemory(D, D, H, expand=2, bias=bias)
    init = {n: torch.randn(p.shape, generator=g, dtype=DT) * 0.5 for n, p in arch.init_params().items()}
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=DT) for _ in range(3))
    lr = (torch.rand(B, H, T, generator=g, dtype=DT) * 0.2).requires_grad_()
    return arch, init, q, k, v, lr


def run_problem(arch, init, q, k, v, lr, read_start, executor="auto", pieces=(T,)):
    r = rules.sgd(0.0, 0.0)
    state = init_state(arch, r, init, B)
    ys, t0 = [], 0
    for n in pieces:  # fed in pieces: the carried offset starts a span inside a chunk
        sl = slice(t0, t0 + n)
        pb = MemoryProblem(arch, r, objectives.l2, q[:, :, sl], k[:, :, sl], v[:, :, sl], {"lr": lr[:, :, sl]},
                           PERIOD, GradMode(), read_start=read_start)
        y, state = run(pb, state, executor)  # type: ignore[arg-type]
        ys.append(y)
        t0 += n
    return torch.cat(ys, 2), state


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("mem", ["linear", "mlp"])
@pytest.mark.parametrize("read_start", [False, True])
def test_blocked_read_matches_reference(mem: str, read_start: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    arch, init, q, k, v, lr = problem(mem, read_start, f"blocked/{mem}/{read_start}")
    taken = []
    real = dual.blocked_read
    monkeypatch.setattr(dual, "blocked_read", lambda *a: taken.append(1) or real(*a))
    y_ref, w_ref = ref.batched_inner_loop(mem, "sgd", "l2", init, q, k, v, {"lr": lr.detach()}, PERIOD,
                                          read_start=read_start)
    kk = k.clone().requires_grad_()
    grads = {}
    for executor in ("sequential", "auto"):
        y, st = run_problem(arch, init, q, kk, v, lr, read_start, executor)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12, msg=f"{executor} outputs")
        for n in w_ref:
            torch.testing.assert_close(st["params"][n], w_ref[n], rtol=1e-10, atol=1e-12)
        grads[executor] = torch.autograd.grad((y.pow(2).sum() + sum(p.sum() for p in st["params"].values())),
                                              (kk, lr))
    assert bool(taken) != read_start, "the chunk-updated read of a whole chunk must take the blocked path"
    for got, want in zip(grads["auto"], grads["sequential"]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.usefixtures("small_blocks")
def test_blocked_read_fed_in_pieces_equals_one_call() -> None:
    """Spans that start inside a chunk (a carried offset) read the weights updated so far."""
    arch, init, q, k, v, lr = problem("mlp", False, "pieces")
    whole, st_w = run_problem(arch, init, q, k, v, lr, False)
    parts, st_p = run_problem(arch, init, q, k, v, lr, False, pieces=(3, 13, 5))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-13)
    for n in st_w["params"]:
        torch.testing.assert_close(st_p["params"][n], st_w["params"][n], rtol=1e-12, atol=1e-13)


def test_blocked_read_with_biases_equals_the_dense_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Biases (not in the plain reference): the blocked read against the dense one, outputs and
    outer gradients."""
    arch, init, q, k, v, lr = problem("mlp", False, "bias", bias=True)
    results = []
    for block in (4, 10**6):  # blocked, then dense (no span has two blocks of a million tokens)
        monkeypatch.setattr(dual, "BLOCK", block)
        kk = k.clone().requires_grad_()
        y, st = run_problem(arch, init, q, kk, v, lr, False)
        results.append((y, *torch.autograd.grad(y.pow(2).sum() + st["params"]["b1"].sum(), (kk, lr))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_blocks_pay_only_where_the_block_weights_fit_in_the_scores() -> None:
    w = lambda o, i: torch.empty(1, 1, o, i)  # noqa: E731
    assert dual.blocks_pay(2048, [w(128, 64), w(64, 128)])  # a slow CMS level of a CPU run (dim 64)
    assert not dual.blocks_pay(2048, [w(1024, 512), w(512, 1024)])  # HOPE's CMS at dim 512: dense
    assert not dual.blocks_pay(64, [w(4, 4)])  # one block: nothing to gain
    assert not dual.blocks_pay(96, [w(4, 4)])  # not whole blocks


def test_lean_coefficients_equal_the_dense_last_row_to_the_bit() -> None:
    """Without forgetting or momentum the chunk end needs ``c_end = -lr``: the lean path gives
    the dense matrix's last row exactly."""
    lr = torch.rand(2, 3, 64, dtype=DT)
    dense = dual.chunk_coefficients(lr, None, None, [16] * 4)
    lean = dual.chunk_coefficients(lr, None, None, [16] * 4, dense=lambda n: False)
    for d, le in zip(dense, lean):
        assert le.keys() == {"c_end"}
        assert torch.equal(d["c_end"], le["c_end"])
