"""The chunk recurrence's hand-written backward (loops/chunk_scan.py) against plain autograd, float64."""

from __future__ import annotations

import pytest
import torch

from nestlearn.loops.chunk_scan import scan, scan_reference

NC, N, NN, DK, DV = 5, 3, 4, 3, 2
D = torch.float64


def _inputs(seed: int, with_tk: bool, gated: bool) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (0.5 * torch.randn(*s, generator=g, dtype=D)).requires_grad_()  # noqa: E731
    tv, tk, kb = r(NC, N, NN, DV), r(NC, N, NN, DK), r(NC, N, NN, DK)
    gate = (0.5 + 0.5 * torch.rand(NC, N, generator=g, dtype=D)).requires_grad_()
    s0 = r(N, DK, DV)
    return [tv, tk if with_tk else None, kb, gate if gated else None, s0]


@pytest.mark.parametrize("with_tk", [True, False])
@pytest.mark.parametrize("gated", [True, False])
def test_values_and_gradients_match_plain_autograd(with_tk: bool, gated: bool) -> None:
    args = _inputs(0, with_tk, gated)
    e, st = scan(*args)
    e_ref, st_ref = scan_reference(*args)
    torch.testing.assert_close(e, e_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st, st_ref, rtol=1e-12, atol=1e-12)
    # a loss that reads the errors, every chunk-start state and the final state
    g = torch.Generator().manual_seed(1)
    we, ws = torch.randn(e.shape, generator=g, dtype=D), torch.randn(st.shape, generator=g, dtype=D)
    leaves = [a for a in args if a is not None]
    grads = torch.autograd.grad((e * we).sum() + (st * ws).sum(), leaves)
    grads_ref = torch.autograd.grad((e_ref * we).sum() + (st_ref * ws).sum(), leaves)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_only_final_state_used() -> None:
    """Unused outputs arrive as None gradients in the backward."""
    args = _inputs(2, True, True)
    leaves = [a for a in args if a is not None]
    grads = torch.autograd.grad(scan(*args)[1][-1].sum(), leaves)
    grads_ref = torch.autograd.grad(scan_reference(*args)[1][-1].sum(), leaves)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_and_second_order() -> None:
    args = _inputs(3, True, True)
    leaves = tuple(a for a in args if a is not None)

    def f(tv: torch.Tensor, tk: torch.Tensor, kb: torch.Tensor, gate: torch.Tensor, s0: torch.Tensor):
        e, st = scan(tv, tk, kb, gate, s0)
        return e.sin().sum() + st.cos().sum()

    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


def test_backward_under_create_graph_matches_plain_autograd() -> None:
    """``create_graph=True`` takes the out-of-place reverse recurrence: same first-order values."""
    args = _inputs(4, True, True)
    leaves = [a for a in args if a is not None]
    e, st = scan(*args)
    e_ref, st_ref = scan_reference(*args)
    grads = torch.autograd.grad(e.square().sum() + st.sum(), leaves, create_graph=True)
    grads_ref = torch.autograd.grad(e_ref.square().sum() + st_ref.sum(), leaves)
    for a, b in zip(grads, grads_ref, strict=True):
        assert a.requires_grad
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
