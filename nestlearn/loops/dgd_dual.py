"""Closed-form chunked executor for DGD (delta gradient descent with momentum, HOPE's rule).

Within a chunk every gradient and layer input is taken at the chunk-start state, and the
sequential reference (``rules/dgd.py`` stepped by ``loops/sequential.py``) is, per weight
``W`` used as ``z = W x`` (gradient ``g_t = delta_t x_t^T``, unit input ``u_t = x_t/|x_t|``):

    m_t = beta_t m_{t-1} + delta_t x_t^T
    W_t = lam_t W_{t-1} - eta_t (W_{t-1} u_t) u_t^T - eta_t m_t,        lam_t = 1 - decay_t

Unrolled over the chunk (``Gam_t = prod_{j<=t} lam_j``, ``b_t = prod_{j<=t} beta_j``,
``K_ts = Gam_t / Gam_s``, ``B_sr = b_s / b_r``, ``e_t = W_{t-1} u_t``):

    W_t = Gam_t W_0 + c_t m_0 - sum_{s<=t} K_ts eta_s e_s u_s^T - sum_{r<=t} G_tr delta_r x_r^T
    c_t = -sum_s K_ts eta_s b_s,          G = (K diag(eta)) B

so ``e`` solves one unit-lower-triangular system per chunk, ``(I + L) E = R`` with
``L_ts = K_{t-1,s} eta_s (u_s . u_t)`` for s < t, and every in-chunk read ``W_t x'_t`` is a
masked matmul (the dual form) -- no weight copy per token. Biases follow the same formula
without the ``u u^T`` term. Coefficients come from log-space cumulative sums (``dual.segsum``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nestlearn.loops.common import MemoryProblem, Params, detach_tree, weighted_outer, weighted_sum
from nestlearn.loops.dual import _hp, _log, _scale, chunk_signals, identity, run_segments, segsum
from nestlearn.memories.base import MemoryArch


def supports(pb: MemoryProblem) -> bool:
    """DGD on a memory whose every parameter is a layer weight or bias."""
    from nestlearn.rules.dgd import DGD

    if not isinstance(pb.rule, DGD):
        return False
    return _all_layer_params(pb.arch)


def _all_layer_params(arch: MemoryArch) -> bool:
    """Every parameter of ``arch`` is a layer's weight or bias (cached on the arch: building
    ``init_params`` draws random numbers, which has no place in the hot path)."""
    known = getattr(arch, "_dgd_dual_ok", None)
    if known is None:
        names = {n for layer in arch.layers for n in (layer.weight, layer.bias) if n is not None}
        known = names == set(arch.init_params())
        arch._dgd_dual_ok = known  # type: ignore[attr-defined]
    return bool(known)


def dgd_coefficients(lr: Tensor, beta: Tensor, decay: Tensor) -> dict[str, Tensor]:
    """Scalar coefficients over ``[B, H, n(, n)]`` (see the module docstring)."""
    log_lam, log_beta = _log(1 - decay), _log(beta)
    K = torch.exp(segsum(log_lam))  # K[t, s] = prod_{r=s+1..t} lam_r, 0 above diagonal
    B = torch.exp(segsum(log_beta))  # B[s, r] = prod_{j=r+1..s} beta_j
    gam = torch.exp(torch.cumsum(log_lam, -1))
    b = torch.exp(torch.cumsum(log_beta, -1))
    Keta = K * lr.unsqueeze(-2)  # K[t, s] eta_s
    G = Keta @ B
    c = -(Keta @ b.unsqueeze(-1)).squeeze(-1)
    # the same at t-1 (row t holds step t-1's values; the state before the chunk at t = 1)
    prev = {n: _shift(x) for n, x in (("Keta", Keta), ("G", G))}
    gam_p = torch.cat([torch.ones_like(gam[..., :1]), gam[..., :-1]], -1)
    c_p = torch.cat([torch.zeros_like(c[..., :1]), c[..., :-1]], -1)
    return {"Keta": Keta, "G": G, "gam": gam, "c": c, "b_end": b[..., -1], "B_end": B[..., -1, :],
            "Keta_p": prev["Keta"], "G_p": prev["G"], "gam_p": gam_p, "c_p": c_p}


def _shift(x: Tensor) -> Tensor:
    """Rows moved down by one (row 0 becomes zeros): ``out[t] = x[t-1]``."""
    return torch.cat([torch.zeros_like(x[..., :1, :]), x[..., :-1, :]], -2)


def run_dgd_dual(pb: MemoryProblem, state: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    return run_segments(pb, state, lambda p, o, a, t0, t1: _segment(pb, p, o, a, t0, t1))


def _segment(
    pb: MemoryProblem, params: Params, opt: dict[str, Any], anchor: Params, t0: int, t1: int,
) -> tuple[Tensor, Params, dict[str, Any]]:
    stop = pb.grad.kind == "stop"
    k, v, q = pb.k[:, :, t0:t1], pb.v[:, :, t0:t1], pb.q[:, :, t0:t1]
    lr, decay, beta = (_hp(pb, n, t0, t1, q) for n in ("lr", "decay", "beta"))
    if stop:
        k, v, lr, decay, beta = k.detach(), v.detach(), lr.detach(), decay.detach(), beta.detach()

    # 1. error signals and layer inputs at the chunk-start state, one batched pass
    deltas, inputs = chunk_signals(pb, anchor, k, v)
    names = [layer.weight for layer in pb.arch.layers]

    co = dgd_coefficients(lr, beta, decay)
    m0: Params = opt["m"]
    cur = detach_tree(params) if stop else params
    if stop:
        m0 = detach_tree(m0)
    bias_of = {layer.weight: layer.bias for layer in pb.arch.layers}
    units = {n: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) for n, x in inputs.items()}

    # 2. e_t = W_{t-1} u_t for every weight: one triangular solve per chunk
    es: dict[str, Tensor] = {}
    for n in names:
        u, x, d = units[n], inputs[n], deltas[n]
        r = (co["gam_p"].unsqueeze(-1) * _mv(cur[n], u) + co["c_p"].unsqueeze(-1) * _mv(m0[n], u)
             - (co["G_p"] * (u @ x.transpose(-1, -2))) @ d)
        L = co["Keta_p"] * (u @ u.transpose(-1, -2))
        eye = identity(L.shape[-1], L.dtype, L.device)
        # the solve in at least fp32 (no bf16 kernel; the small n x n system wants the precision)
        work = torch.promote_types(r.dtype, torch.float32)
        es[n] = torch.linalg.solve_triangular((eye + L).to(work), r.to(work), upper=False,
                                              unitriangular=True).to(r.dtype)

    # 3. the dual read: every token with its own in-chunk weights
    def read(name: str, w: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
        u, x, d, e = units[name], inputs[name], deltas[name], es[name]
        z = (co["gam"].unsqueeze(-1) * _mv(w, a) + co["c"].unsqueeze(-1) * _mv(m0[name], a)
             - (co["Keta"] * (a @ u.transpose(-1, -2))) @ e - (co["G"] * (a @ x.transpose(-1, -2))) @ d)
        bn = bias_of[name]
        if b is not None and bn is not None:
            z = z + co["gam"].unsqueeze(-1) * b.unsqueeze(-2) + co["c"].unsqueeze(-1) * m0[bn].unsqueeze(-2) - co["G"] @ d
        return z

    if pb.read_start:  # weights constant within the chunk: a plain read at its start
        y = pb.arch.apply(detach_tree(anchor) if stop else anchor, q)
    else:
        y = pb.arch.apply(cur, q, read)

    # 4. chunk-end state: one matmul per weight
    new_p: Params = {}
    new_m: Params = {}
    keta_end, g_end, b_end = co["Keta"][..., -1, :], co["G"][..., -1, :], co["B_end"]
    for layer in pb.arch.layers:
        n, u, x, d, e = layer.weight, units[layer.weight], inputs[layer.weight], deltas[layer.weight], es[layer.weight]
        new_p[n] = (_scale(co["gam"][..., -1], cur[n]) + _scale(co["c"][..., -1], m0[n])
                    - weighted_outer(keta_end, e, u)
                    - weighted_outer(g_end, d, x))
        new_m[n] = _scale(co["b_end"], m0[n]) + weighted_outer(b_end, d, x)
        if layer.bias is not None:
            bn = layer.bias
            new_p[bn] = (_scale(co["gam"][..., -1], cur[bn]) + _scale(co["c"][..., -1], m0[bn])
                         - weighted_sum(g_end, d))
            new_m[bn] = _scale(co["b_end"], m0[bn]) + weighted_sum(b_end, d)
    return y, new_p, {"m": new_m}


def _mv(w: Tensor, a: Tensor) -> Tensor:
    """``W a_t`` for every token: ``[B,H,o,i] x [B,H,n,i] -> [B,H,n,o]``."""
    return a @ w.transpose(-1, -2)
