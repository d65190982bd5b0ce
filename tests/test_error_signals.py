"""Memories' explicit backward (``error_signals``) == autograd through ``apply``, float64."""

from __future__ import annotations

import pytest
import torch

from nestlearn.memories import LinearMemory, MLPMemory
from nestlearn.memories.base import plain_lin

D = torch.float64


def _autograd_signals(arch, params, x, target):  # noqa: ANN001, ANN202
    inputs, outs = {}, {}

    def record(name, w, a, b=None):  # noqa: ANN001, ANN202
        z = plain_lin(name, w, a, b)
        inputs[name], outs[name] = a, z
        return z

    pred = arch.apply(params, x, record)
    names = [layer.weight for layer in arch.layers]
    grads = torch.autograd.grad(((pred - target) ** 2).sum(), [outs[n] for n in names], create_graph=True)
    return dict(zip(names, grads)), inputs


@pytest.mark.parametrize("arch", [
    LinearMemory(5, 4, 2), LinearMemory(5, 4, 2, bias=True),
    *[MLPMemory(5, 5, 2, expand=1.6, depth=d, act=a, residual=r, bias=b)
      for d, a, r, b in [(2, "gelu", True, False), (3, "silu", False, True), (2, "relu", False, False),
                         (3, "tanh", True, True), (1, "gelu", True, False)]],
], ids=lambda a: type(a).__name__ + "-" + "-".join(f"{k}={v}" for k, v in vars(a).items()
                                                    if k in ("depth", "act", "residual", "bias")))
def test_explicit_backward_equals_autograd(arch) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    params = {n: (torch.randn(3, *p.shape, generator=g, dtype=D) * 0.7).requires_grad_()
              for n, p in arch.init_params(D).items()}
    x = torch.randn(3, 2, 6, arch.d_in, generator=g, dtype=D, requires_grad=True)
    target = torch.randn(3, 2, 6, arch.d_out, generator=g, dtype=D)
    sig = arch.error_signals(params, x, lambda pred: 2.0 * (pred - target))
    assert sig is not None
    deltas, inputs = sig
    ref_deltas, ref_inputs = _autograd_signals(arch, params, x, target)
    for n in ref_deltas:
        torch.testing.assert_close(deltas[n], ref_deltas[n], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(inputs[n], ref_inputs[n], rtol=1e-12, atol=1e-12)
    # and their own derivatives (the outer loss differentiates through them)
    leaves = [x, *params.values()]
    s = sum((d * torch.cos(d)).sum() for d in deltas.values())
    s_ref = sum((d * torch.cos(d)).sum() for d in ref_deltas.values())
    for a, b in zip(torch.autograd.grad(s, leaves), torch.autograd.grad(s_ref, leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
