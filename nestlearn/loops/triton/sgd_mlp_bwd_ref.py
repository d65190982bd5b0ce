"""The hand-derived backward of one CMS chunk step (``sgd_mlp.py``), in plain PyTorch: the spec a
fused Triton backward will follow, and ``SGDMLPStep``'s ``backward="manual"``.

With ``m[t, s] = [s <= t]`` and ``C = -m * lr_s`` (``sgd_mlp.py``'s docstring), the forward is

    z = k W0^T,  h = g(z),  d1 = 2 (h W1^T - v),  e = d1 W1,  d0 = g'(z) e
    Z0 = q W0^T + A d0 (A = C * q k^T),  a = g(Z0),  y = a W1^T + B d1 (B = C * a h^T)
    W0' = W0 - (lr d0)^T k,  W1' = W1 - (lr d1)^T h

(``read_start``: ``a = g(q W0^T)``, ``y = a W1^T``), ``g`` torch's erf gelu. Its adjoints, from the
cotangents of ``y``, ``W0'``, ``W1'``, follow the forward backwards: each product's two operands
take the other operand times the cotangent; the masks ``m`` carry the gate's adjoint (``C``
enters ``A`` and ``B`` element-wise); ``g''(z) = phi(z) (2 - z^2)`` appears once, where ``d0``
depends on ``z`` through ``g'``. Everything is recomputed from the chunk-start weights and the
inputs (nothing but them is saved between forward and backward).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.functional import gelu


def _gelu_grad(z: Tensor) -> Tensor:
    return torch.ops.aten.gelu_backward(torch.ones_like(z), z)


def _gelu_grad2(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (2 - z * z)


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def sgd_mlp_step_bwd_reference(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, w0: Tensor, w1: Tensor,
    gy: Tensor | None, gw0n: Tensor | None, gw1n: Tensor | None, *, read_start: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The adjoints of ``(q, k, v, lr, W0, W1)`` of one chunk step (shapes as
    ``sgd_mlp_step_fwd``'s inputs; the weights' adjoints full ``[B, H, ., .]``) from those of
    ``(y, W0', W1')`` (``None``: zero)."""
    n = q.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    cmat = torch.where(mask, -lr.unsqueeze(-2), torch.zeros((), dtype=q.dtype, device=q.device))  # C[t, s]
    lr_ = lr.unsqueeze(-1)
    gy = torch.zeros_like(v) if gy is None else gy
    g0 = torch.zeros(w0.shape, dtype=q.dtype, device=q.device) if gw0n is None else gw0n
    g1 = torch.zeros(w1.shape, dtype=q.dtype, device=q.device) if gw1n is None else gw1n

    # the forward's quantities
    z = k @ _t(w0)
    h = gelu(z)
    d1 = 2 * (h @ _t(w1) - v)
    e = d1 @ w1
    d0 = _gelu_grad(z) * e
    zq = q @ _t(w0)
    qk = q @ _t(k)
    Z0 = zq if read_start else zq + (cmat * qk) @ d0
    a = gelu(Z0)

    # y = a W1^T (+ (C * a h^T) d1)
    gw1 = g1 + _t(gy) @ a
    g_a = gy @ w1
    g_d1 = torch.zeros_like(d1)
    g_h = torch.zeros_like(h)
    g_c = torch.zeros_like(cmat)
    if not read_start:
        s = a @ _t(h)
        g_b = gy @ _t(d1)  # the cotangent of B
        g_d1 = _t(cmat * s) @ gy
        g_s = cmat * g_b
        g_a = g_a + g_s @ h
        g_h = _t(g_s) @ a
        g_c = g_b * s
    g_z0 = g_a * _gelu_grad(Z0)
    # Z0 = q W0^T (+ (C * q k^T) d0)
    gw0 = g0 + _t(g_z0) @ q
    g_q = g_z0 @ w0
    g_k = torch.zeros_like(k)
    g_d0 = torch.zeros_like(d0)
    if not read_start:
        g_amat = g_z0 @ _t(d0)  # the cotangent of A
        g_d0 = _t(cmat * qk) @ g_z0
        g_qk = cmat * g_amat
        g_q = g_q + g_qk @ k
        g_k = _t(g_qk) @ q
        g_c = g_c + g_amat * qk
    # the chunk-end weights: W1' = W1 - (lr d1)^T h, W0' = W0 - (lr d0)^T k
    hg1 = h @ _t(g1)
    kg0 = k @ _t(g0)
    g_d1 = g_d1 - lr_ * hg1
    g_h = g_h - lr_ * (d1 @ g1)
    g_d0 = g_d0 - lr_ * kg0
    g_k = g_k - lr_ * (d0 @ g0)
    g_lr = -(d1 * hg1).sum(-1) - (d0 * kg0).sum(-1) - (g_c * mask).sum(-2)
    # d0 = g'(z) e, e = d1 W1
    g_e = g_d0 * _gelu_grad(z)
    g_z = g_d0 * e * _gelu_grad2(z)
    g_d1 = g_d1 + g_e @ _t(w1)
    gw1 = gw1 + _t(d1) @ g_e
    # d1 = 2 (h W1^T - v)
    g_p = 2 * g_d1
    g_v = -2 * g_d1
    g_h = g_h + g_p @ w1
    gw1 = gw1 + _t(g_p) @ h
    g_z = g_z + g_h * _gelu_grad(z)
    # z = k W0^T
    g_k = g_k + g_z @ w0
    gw0 = gw0 + _t(g_z) @ k
    return g_q, g_k, g_v, g_lr, gw0, gw1
