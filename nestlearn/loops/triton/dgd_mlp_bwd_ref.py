"""The backward of ``dgd_mlp``'s chunk recurrence written out by hand, in plain PyTorch: the spec
of the fused Triton backward (``dgd_mlp_bwd.py``) and its test oracle next to autograd through
``dgd_dual``. No triton here: any device, any float dtype (the tests run it in float64).

Per chunk (notation of ``dgd_mlp.py``'s module docstring; rows are tokens, ``*`` elementwise,
``@`` matmul, ``^T`` transpose, ``[n-1]`` the chunk's last row) the forward is

- coefficients from ``log_lam = log(1 - decay)``, ``log_beta = log(beta)``: inclusive / exclusive
  cumulative sums ``LL``, ``LLx``, ``LB``; ``K[t,s] = exp(LL_t - LL_s)`` (s <= t), ``Kp[t,s] =
  exp(LLx_t - LL_s)`` (s < t), ``Bm[s,r] = exp(LB_s - LB_r)`` (r <= s), ``b = exp(LB)``,
  ``gam = exp(LL)``, ``gam_p = exp(LLx)``, ``Keta = K * eta``, ``Keta_p = Kp * eta``,
  ``G = Keta @ Bm``, ``G_p = Keta_p @ Bm``, ``c = -Keta @ b``, ``c_p = -Keta_p @ b``; the chunk-end
  scalars and rows are the last rows of these;
- signals at the chunk-start ``W0, W1``: ``z0 = k W0^T``, ``x1 = gelu(z0)``, ``d1 = 2 (k + x1 W1^T - v)``,
  ``g = d1 W1``, ``d0 = g * gelu'(z0)``, optionally both scaled by the clip factor
  ``f = clip / sqrt(max(|d1|^2 |x1|^2 + |d0|^2 |k|^2, clip^2))``; units ``u = x / max(|x|, 1e-12)``;
- per layer ``(W, M, x, u, d, a)``: ``R = gam_p*(u W^T) + c_p*(u M^T) - (G_p*(u x^T)) d``,
  ``L = Keta_p*(u u^T)``, ``E = (I + L)^-1 R``,
  ``Z = gam*(a W^T) + c*(a M^T) - (Keta*(a u^T)) E - (G*(a x^T)) d``; layer 0 reads ``a = q``,
  layer 1 ``a = gelu(Z0)``; ``y = q + Z1``;
- chunk end: ``W' = gam_e W + c_e M - (E*keta_e)^T u - (d*g_e)^T x``, ``M' = b_e M + (d*B_e)^T x``.

The backward walks the chunks last to first from the state saved at every chunk start,
recomputes that forward and applies the adjoint of each line in reverse (``_chunk_bwd``): the
solve's is ``dR = (I + L)^-T dE``, ``dL = -dR E^T``; the coefficients' ends in reverse cumulative
sums of ``dLL``, ``dLLx``, ``dLB`` (the log-gates' adjoints).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

EPS_UNIT = 1e-12  # u = x / max(|x|, EPS_UNIT), as dgd_dual
LOG_FLOOR = 1e-30  # chunks.safe_log's floor


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _gelu_grad(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(z * 0.5**0.5)) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _gelu_grad2(z: Tensor) -> Tensor:
    # d/dz (Phi + z phi) = 2 phi + z phi' = phi (2 - z^2)
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (2.0 - z * z)


def _safe_log_grad(x: Tensor) -> Tensor:
    """d/dx log(max(x, floor)): what autograd gives through ``clamp_min`` (passes where x >= floor)."""
    return torch.where(x >= LOG_FLOOR, 1.0 / x.clamp_min(LOG_FLOOR), torch.zeros_like(x))


class Coefs(NamedTuple):
    K: Tensor       # [.., n, n] exp(LL_t - LL_s), s <= t
    Kp: Tensor      # exp(LLx_t - LL_s), s < t
    Bm: Tensor      # exp(LB_s - LB_r), r <= s
    bvec: Tensor    # [.., n]
    gam: Tensor
    gam_p: Tensor
    Keta: Tensor
    Keta_p: Tensor
    G: Tensor
    G_p: Tensor
    c: Tensor
    c_p: Tensor


def coefficients(eta: Tensor, decay: Tensor, beta: Tensor) -> Coefs:
    """The gate coefficients over ``[.., n]`` gates, as the forward kernel builds them (masked
    exponentials of cumulative-sum differences)."""
    n = eta.shape[-1]
    log_lam = torch.log((1 - decay).clamp_min(LOG_FLOOR))
    log_beta = torch.log(beta.clamp_min(LOG_FLOOR))
    LL = log_lam.cumsum(-1)
    LLx = LL - log_lam
    LB = log_beta.cumsum(-1)
    ar = torch.arange(n, device=eta.device)
    le = ar[:, None] >= ar[None, :]
    lt = ar[:, None] > ar[None, :]
    ninf = torch.tensor(float("-inf"), dtype=eta.dtype, device=eta.device)
    K = torch.exp(torch.where(le, LL[..., :, None] - LL[..., None, :], ninf))
    Kp = torch.exp(torch.where(lt, LLx[..., :, None] - LL[..., None, :], ninf))
    Bm = torch.exp(torch.where(le, LB[..., :, None] - LB[..., None, :], ninf))
    bvec = torch.exp(LB)
    Keta, Keta_p = K * eta[..., None, :], Kp * eta[..., None, :]
    G, G_p = Keta @ Bm, Keta_p @ Bm
    c = -(Keta @ bvec[..., None])[..., 0]
    c_p = -(Keta_p @ bvec[..., None])[..., 0]
    return Coefs(K, Kp, Bm, bvec, torch.exp(LL), torch.exp(LLx), Keta, Keta_p, G, G_p, c, c_p)


class Signals(NamedTuple):
    z0: Tensor
    s1: Tensor      # gelu'(z0)
    x1: Tensor
    d1r: Tensor     # raw (unclipped) signals
    g: Tensor       # d1r @ W1
    d0r: Tensor
    sq: Tensor      # [.., n] the squared gradient norm (clip only)
    f: Tensor       # [.., n] clip factor (ones without clip)
    d0: Tensor
    d1: Tensor
    u0: Tensor
    u1: Tensor


def signals(W0: Tensor, W1: Tensor, k: Tensor, v: Tensor, clip: float | None) -> Signals:
    z0 = k @ _t(W0)
    s1 = _gelu_grad(z0)
    x1 = torch.nn.functional.gelu(z0)
    d1r = 2.0 * (k + x1 @ _t(W1) - v)
    g = d1r @ W1
    d0r = g * s1
    if clip is None:
        sq = torch.zeros_like(k[..., 0])
        f = torch.ones_like(sq)
    else:
        sq = d1r.pow(2).sum(-1) * x1.pow(2).sum(-1) + d0r.pow(2).sum(-1) * k.pow(2).sum(-1)
        f = clip * torch.rsqrt(sq.clamp_min(clip * clip))
    u0 = k / k.norm(dim=-1, keepdim=True).clamp_min(EPS_UNIT)
    u1 = x1 / x1.norm(dim=-1, keepdim=True).clamp_min(EPS_UNIT)
    return Signals(z0, s1, x1, d1r, g, d0r, sq, f, d0r * f[..., None], d1r * f[..., None], u0, u1)


class Layer(NamedTuple):
    W: Tensor
    M: Tensor
    x: Tensor
    u: Tensor
    d: Tensor
    a: Tensor
    E: Tensor
    L: Tensor
    Z: Tensor


def layer_fwd(W: Tensor, M: Tensor, x: Tensor, u: Tensor, d: Tensor, a: Tensor, co: Coefs) -> Layer:
    R = (co.gam_p[..., None] * (u @ _t(W)) + co.c_p[..., None] * (u @ _t(M))
         - (co.G_p * (u @ _t(x))) @ d)
    L = co.Keta_p * (u @ _t(u))
    E = torch.linalg.solve_triangular(L, R, upper=False, unitriangular=True)  # (I + L) E = R
    Z = (co.gam[..., None] * (a @ _t(W)) + co.c[..., None] * (a @ _t(M))
         - (co.Keta * (a @ _t(u))) @ E - (co.G * (a @ _t(x))) @ d)
    return Layer(W, M, x, u, d, a, E, L, Z)


class ChunkFwd(NamedTuple):
    co: Coefs
    sig: Signals
    l0: Layer
    l1: Layer
    y: Tensor
    state: tuple[Tensor, Tensor, Tensor, Tensor]  # (W0, W1, M0, M1) after the chunk


def chunk_fwd(W0: Tensor, W1: Tensor, M0: Tensor, M1: Tensor, q: Tensor, k: Tensor, v: Tensor,
              eta: Tensor, decay: Tensor, beta: Tensor, clip: float | None) -> ChunkFwd:
    """One chunk's forward with every quantity its backward needs."""
    co = coefficients(eta, decay, beta)
    sig = signals(W0, W1, k, v, clip)
    l0 = layer_fwd(W0, M0, k, sig.u0, sig.d0, q, co)
    l1 = layer_fwd(W1, M1, sig.x1, sig.u1, sig.d1, torch.nn.functional.gelu(l0.Z), co)
    ends = [_end(ly, co) for ly in (l0, l1)]
    return ChunkFwd(co, sig, l0, l1, q + l1.Z, (ends[0][0], ends[1][0], ends[0][1], ends[1][1]))


def _end(ly: Layer, co: Coefs) -> tuple[Tensor, Tensor]:
    keta_e, g_e, B_e = co.Keta[..., -1, :, None], co.G[..., -1, :, None], co.Bm[..., -1, :, None]
    gam_e, c_e, b_e = (x[..., -1, None, None] for x in (co.gam, co.c, co.bvec))
    Wn = gam_e * ly.W + c_e * ly.M - _t(ly.E * keta_e) @ ly.u - _t(ly.d * g_e) @ ly.x
    Mn = b_e * ly.M + _t(ly.d * B_e) @ ly.x
    return Wn, Mn


class CoefGrads:
    """Adjoints of the coefficients, accumulated by the layers' backward (``[.., n(, n)]``)."""

    def __init__(self, co: Coefs) -> None:
        z2, z1 = torch.zeros_like(co.K), torch.zeros_like(co.gam)
        self.Keta, self.Keta_p, self.G, self.G_p, self.Bm = z2, z2.clone(), z2.clone(), z2.clone(), z2.clone()
        self.gam, self.gam_p, self.c, self.c_p, self.bvec = z1, z1.clone(), z1.clone(), z1.clone(), z1.clone()


class LayerGrads(NamedTuple):
    W: Tensor
    M: Tensor
    a: Tensor
    u: Tensor
    x: Tensor
    d: Tensor


def end_bwd(ly: Layer, co: Coefs, cg: CoefGrads, dWn: Tensor, dMn: Tensor) -> tuple[LayerGrads, Tensor]:
    """The chunk-end update's adjoint: the layer's grads and ``dE`` (its share of E's adjoint)."""
    gam_e, c_e, b_e = (x[..., -1, None, None] for x in (co.gam, co.c, co.bvec))
    keta_e, g_e, B_e = co.Keta[..., -1, :], co.G[..., -1, :], co.Bm[..., -1, :]
    dW = gam_e * dWn
    dM = c_e * dWn + b_e * dMn
    cg.gam[..., -1] += (dWn * ly.W).sum((-1, -2))
    cg.c[..., -1] += (dWn * ly.M).sum((-1, -2))
    cg.bvec[..., -1] += (dMn * ly.M).sum((-1, -2))
    udw = ly.u @ _t(dWn)  # [n, D_out]
    dE = -keta_e[..., None] * udw
    cg.Keta[..., -1, :] -= (ly.E * udw).sum(-1)
    du = -(ly.E * keta_e[..., None]) @ dWn
    xdw, xdm = ly.x @ _t(dWn), ly.x @ _t(dMn)
    dd = -g_e[..., None] * xdw + B_e[..., None] * xdm
    cg.G[..., -1, :] -= (ly.d * xdw).sum(-1)
    cg.Bm[..., -1, :] += (ly.d * xdm).sum(-1)
    dx = -(ly.d * g_e[..., None]) @ dWn + (ly.d * B_e[..., None]) @ dMn
    return LayerGrads(dW, dM, torch.zeros_like(ly.a), du, dx, dd), dE


def layer_bwd(ly: Layer, co: Coefs, cg: CoefGrads, dZ: Tensor, dE: Tensor, acc: LayerGrads) -> LayerGrads:
    """The read's, the solve's and the right-hand side's adjoints, added to ``acc``."""
    W, M, x, u, d, a, E = ly.W, ly.M, ly.x, ly.u, ly.d, ly.a, ly.E
    # read: Z = gam*(a W^T) + c*(a M^T) - (Keta*(a u^T)) E - (G*(a x^T)) d
    dW = acc.W + _t(co.gam[..., None] * dZ) @ a
    dM = acc.M + _t(co.c[..., None] * dZ) @ a
    da = acc.a + co.gam[..., None] * (dZ @ W) + co.c[..., None] * (dZ @ M)
    cg.gam += (dZ * (a @ _t(W))).sum(-1)
    cg.c += (dZ * (a @ _t(M))).sum(-1)
    AU, AX = a @ _t(u), a @ _t(x)
    dA = -dZ @ _t(E)
    dE = dE - _t(co.Keta * AU) @ dZ
    cg.Keta += dA * AU
    dAU = dA * co.Keta
    da = da + dAU @ u
    du = acc.u + _t(dAU) @ a
    dB = -dZ @ _t(d)
    dd = acc.d - _t(co.G * AX) @ dZ
    cg.G += dB * AX
    dAX = dB * co.G
    da = da + dAX @ x
    dx = acc.x + _t(dAX) @ a
    # solve: (I + L) E = R
    dR = torch.linalg.solve_triangular(_t(ly.L), dE, upper=True, unitriangular=True)
    dL = -dR @ _t(E)
    UU, UX = u @ _t(u), u @ _t(x)
    cg.Keta_p += dL * UU
    dUU = dL * co.Keta_p
    du = du + (dUU + _t(dUU)) @ u
    # right-hand side: R = gam_p*(u W^T) + c_p*(u M^T) - (G_p*(u x^T)) d
    dW = dW + _t(co.gam_p[..., None] * dR) @ u
    dM = dM + _t(co.c_p[..., None] * dR) @ u
    du = du + co.gam_p[..., None] * (dR @ W) + co.c_p[..., None] * (dR @ M)
    cg.gam_p += (dR * (u @ _t(W))).sum(-1)
    cg.c_p += (dR * (u @ _t(M))).sum(-1)
    dC = -dR @ _t(d)
    dd = dd - _t(co.G_p * UX) @ dR
    cg.G_p += dC * UX
    dUX = dC * co.G_p
    du = du + dUX @ x
    dx = dx + _t(dUX) @ u
    return LayerGrads(dW, dM, da, du, dx, dd)


def unit_bwd(x: Tensor, u: Tensor, du: Tensor) -> Tensor:
    """Adjoint of ``u = x / max(|x|, eps)``."""
    nrm = x.norm(dim=-1, keepdim=True)
    den = nrm.clamp_min(EPS_UNIT)
    radial = torch.where(nrm >= EPS_UNIT, u * (u * du).sum(-1, keepdim=True), torch.zeros_like(u))
    return (du - radial) / den


def coef_bwd(co: Coefs, cg: CoefGrads, eta: Tensor, decay: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(d eta, d decay, d beta)`` from the coefficients' adjoints."""
    # G = Keta Bm, c = -Keta b (and the t-1 versions)
    dKeta = cg.Keta + cg.G @ _t(co.Bm) - cg.c[..., :, None] * co.bvec[..., None, :]
    dKeta_p = cg.Keta_p + cg.G_p @ _t(co.Bm) - cg.c_p[..., :, None] * co.bvec[..., None, :]
    dBm = cg.Bm + _t(co.Keta) @ cg.G + _t(co.Keta_p) @ cg.G_p
    dbvec = cg.bvec - (_t(co.Keta) @ cg.c[..., None])[..., 0] - (_t(co.Keta_p) @ cg.c_p[..., None])[..., 0]
    deta = (dKeta * co.K).sum(-2) + (dKeta_p * co.Kp).sum(-2)
    Kd, Kpd, Bd = dKeta * co.Keta, dKeta_p * co.Keta_p, dBm * co.Bm
    dLL = Kd.sum(-1) - Kd.sum(-2) - Kpd.sum(-2) + cg.gam * co.gam
    dLLx = Kpd.sum(-1) + cg.gam_p * co.gam_p
    dLB = Bd.sum(-1) - Bd.sum(-2) + dbvec * co.bvec
    # LL inclusive, LLx exclusive cumulative sums of log_lam: reverse cumulative sums
    rc = lambda x: x.flip(-1).cumsum(-1).flip(-1)  # noqa: E731
    dlog_lam = rc(dLL) + rc(dLLx) - dLLx
    dlog_beta = rc(dLB)
    return deta, -dlog_lam * _safe_log_grad(1 - decay), dlog_beta * _safe_log_grad(beta)


class ChunkGrads(NamedTuple):
    state: tuple[Tensor, Tensor, Tensor, Tensor]  # adjoint of (W0, W1, M0, M1) at the chunk start
    q: Tensor
    k: Tensor
    v: Tensor
    eta: Tensor
    decay: Tensor
    beta: Tensor


def chunk_bwd(fw: ChunkFwd, eta: Tensor, decay: Tensor, beta: Tensor, clip: float | None, dy: Tensor,
              dstate: tuple[Tensor, Tensor, Tensor, Tensor]) -> ChunkGrads:
    """One chunk's adjoints from those of its output ``dy`` and its end state ``dstate``."""
    co, sig, l0, l1 = fw.co, fw.sig, fw.l0, fw.l1
    cg = CoefGrads(co)
    dW0n, dW1n, dM0n, dM1n = dstate
    acc1, dE1 = end_bwd(l1, co, cg, dW1n, dM1n)
    acc0, dE0 = end_bwd(l0, co, cg, dW0n, dM0n)
    g1 = layer_bwd(l1, co, cg, dy, dE1, acc1)
    dZ0 = g1.a * _gelu_grad(l0.Z)  # a1 = gelu(Z0)
    g0 = layer_bwd(l0, co, cg, dZ0, dE0, acc0)
    dq = dy + g0.a
    dk = g0.x + unit_bwd(l0.x, l0.u, g0.u)
    dx1 = g1.x + unit_bwd(l1.x, l1.u, g1.u)
    dW0, dW1 = g0.W, g1.W
    # clip: d = f * d_raw
    dd0r, dd1r = g0.d * sig.f[..., None], g1.d * sig.f[..., None]
    if clip is not None:
        df = (g0.d * sig.d0r).sum(-1) + (g1.d * sig.d1r).sum(-1)
        dsq = torch.where(sig.sq >= clip * clip, -0.5 * df * sig.f / sig.sq.clamp_min(clip * clip),
                          torch.zeros_like(df))[..., None]
        k, x1 = l0.x, sig.x1
        dd1r = dd1r + 2 * dsq * x1.pow(2).sum(-1, keepdim=True) * sig.d1r
        dx1 = dx1 + 2 * dsq * sig.d1r.pow(2).sum(-1, keepdim=True) * x1
        dd0r = dd0r + 2 * dsq * k.pow(2).sum(-1, keepdim=True) * sig.d0r
        dk = dk + 2 * dsq * sig.d0r.pow(2).sum(-1, keepdim=True) * k
    # signals: d0r = (d1r W1) * gelu'(z0), d1r = 2 (k + x1 W1^T - v), x1 = gelu(z0), z0 = k W0^T
    W0, W1 = l0.W, l1.W
    dg = dd0r * sig.s1
    dz0 = dd0r * sig.g * _gelu_grad2(sig.z0)
    dd1r = dd1r + dg @ _t(W1)
    dW1 = dW1 + _t(sig.d1r) @ dg
    dp = 2.0 * dd1r
    dk = dk + dp
    dx1 = dx1 + dp @ W1
    dW1 = dW1 + _t(dp) @ sig.x1
    dz0 = dz0 + dx1 * sig.s1
    dk = dk + dz0 @ W0
    dW0 = dW0 + _t(dz0) @ l0.x
    deta, ddecay, dbeta = coef_bwd(co, cg, eta, decay, beta)
    return ChunkGrads((dW0, dW1, g0.M, g1.M), dq, dk, -dp, deta, ddecay, dbeta)


def dgd_mlp_states_reference(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, decay: Tensor, beta: Tensor,
    weights: tuple[Tensor, Tensor], momenta: tuple[Tensor, Tensor], *, chunk: int, clip: float | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """``(y, saved)``: the outputs and ``(W0, W1, M0, M1)`` at every chunk start (``[B, H, S, D, D]``
    each, as the kernel's ``save_every=1``), by ``chunk_fwd``."""
    st = (weights[0], weights[1], momenta[0], momenta[1])
    saved: list[list[Tensor]] = [[], [], [], []]
    ys = []
    for t0 in range(0, q.shape[2], chunk):
        sl = slice(t0, t0 + chunk)
        for acc, s in zip(saved, st):
            acc.append(s)
        fw = chunk_fwd(*st, q[:, :, sl], k[:, :, sl], v[:, :, sl], lr[:, :, sl], decay[:, :, sl], beta[:, :, sl], clip)
        ys.append(fw.y)
        st = fw.state
    return torch.cat(ys, 2), [torch.stack(s, 2) for s in saved]


def dgd_mlp_bwd_reference(
    inputs: tuple[Tensor, ...], saved: list[Tensor], cots: tuple[Tensor | None, ...], *,
    chunk: int, clip: float | None,
) -> list[Tensor]:
    """The adjoints of ``(q, k, v, lr, decay, beta, W0, W1, M0, M1)`` from those of
    ``(y, W0', W1', M0', M1', anchor0, anchor1)`` (``None``: zero), given the state at every
    chunk start (``saved``, ``[B, H, S, D, D]``): the chunks last to first, each recomputed by
    ``chunk_fwd`` and back-propagated by ``chunk_bwd``. Full-shape (``[B, H, ...]``) gradients."""
    q, k, v, lr, decay, beta = inputs
    bsz, heads, t, d = q.shape
    z_w = torch.zeros(bsz, heads, d, d, dtype=q.dtype, device=q.device)
    gy = cots[0] if cots[0] is not None else torch.zeros_like(q)
    dstate = tuple(c if c is not None else z_w for c in cots[1:5])
    outs = [torch.zeros(bsz, heads, t, d, dtype=q.dtype, device=q.device) for _ in range(3)]
    gates = [torch.zeros(bsz, heads, t, dtype=q.dtype, device=q.device) for _ in range(3)]
    n_chunks = t // chunk
    for ci in range(n_chunks - 1, -1, -1):
        sl = slice(ci * chunk, (ci + 1) * chunk)
        st = [s[:, :, ci] for s in saved]
        eta, dc, bt = lr[:, :, sl], decay[:, :, sl], beta[:, :, sl]
        fw = chunk_fwd(st[0], st[1], st[2], st[3], q[:, :, sl], k[:, :, sl], v[:, :, sl], eta, dc, bt, clip)
        gr = chunk_bwd(fw, eta, dc, bt, clip, gy[:, :, sl], dstate)  # type: ignore[arg-type]
        dstate = gr.state
        if ci == n_chunks - 1:  # the anchor is the last chunk's start state
            dstate = tuple(s + a if a is not None else s for s, a in
                           zip(dstate, (*cots[5:7], None, None)))  # type: ignore[assignment]
        for acc, g in zip((*outs, *gates), (gr.q, gr.k, gr.v, gr.eta, gr.decay, gr.beta)):
            acc[:, :, sl] = g
    return [*outs, *gates, *dstate]
