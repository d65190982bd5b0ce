"""The fused backward of ``dgd_mlp``: one persistent Triton program per (batch, head) walks the
chunks last to first, carrying the adjoints of ``W0, W1`` and their momenta on-chip.

Per chunk it loads the chunk-start state the forward kernel saved (``SAVE`` with
``save_every=1``), recomputes the chunk's forward quantities (gate coefficients, error
signals, the two solves with their inverses ``P = (I + L)^-1``, layer 0's read) and applies the
adjoint of each forward line in reverse, exactly as ``dgd_mlp_bwd_ref.chunk_bwd`` (the spec, with
the derivation in its module docstring): chunk-end update, layer 1's read, gelu, layer 0's read,
the solves (``dR = P^T dE``, ``dL = -dR E^T``), the right-hand sides, the unit inputs, the clip
factor, the signals (gelu's first and second derivatives) and the coefficients (their adjoints
to the log-gates by reverse cumulative sums). It writes ``dq, dk, dv`` and the gates' gradients
per token and the initial state's adjoints at the end.

Every product is a ``tl.dot`` at the forward's ``precision``. Like the forward, the
interpreter (``TRITON_INTERPRET=1``) runs it on the CPU for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from nestlearn.loops.triton.dgd_mlp import _coefficients, _gelu, _gelu_grad, _normalize, _solve, launch_options


@triton.jit
def _gelu_grad2(z):
    # d/dz (Phi(z) + z phi(z)) = phi(z) (2 - z^2)
    return 0.3989422804014327 * tl.exp(-0.5 * z * z) * (2.0 - z * z)


@triton.jit
def _end_bwd(W, M, x, u, d, E, dWn, dMn, gam_e, c_e, b_e, keta_e, g_e, B_e, PREC: tl.constexpr):
    """Adjoint of ``W' = gam_e W + c_e M - (E keta_e)^T u - (d g_e)^T x``, ``M' = b_e M + (d B_e)^T x``."""
    dW = gam_e * dWn
    dM = c_e * dWn + b_e * dMn
    dgam_e = tl.sum(tl.sum(dWn * W, 1), 0)
    dc_e = tl.sum(tl.sum(dWn * M, 1), 0)
    db_e = tl.sum(tl.sum(dMn * M, 1), 0)
    udw = tl.dot(u, tl.trans(dWn), input_precision=PREC)
    dE = -keta_e[:, None] * udw
    dketa_e = -tl.sum(E * udw, 1)
    du = -tl.dot(E * keta_e[:, None], dWn, input_precision=PREC)
    xdw = tl.dot(x, tl.trans(dWn), input_precision=PREC)
    xdm = tl.dot(x, tl.trans(dMn), input_precision=PREC)
    dd = B_e[:, None] * xdm - g_e[:, None] * xdw
    dg_e = -tl.sum(d * xdw, 1)
    dB_e = tl.sum(d * xdm, 1)
    dx = (tl.dot(d * B_e[:, None], dMn, input_precision=PREC)
          - tl.dot(d * g_e[:, None], dWn, input_precision=PREC))
    return dW, dM, dE, du, dx, dd, dgam_e, dc_e, db_e, dketa_e, dg_e, dB_e


@triton.jit
def _layer_bwd(W, M, x, u, d, a, E, P, dZ, dE, dW, dM, du, dx, dd,
               gam, c, gam_p, c_p, Keta, Keta_p, G, G_p, PREC: tl.constexpr):
    """Adjoint of one layer's read ``Z`` (from ``dZ``), solve and right-hand side (from ``dE``):
    the state / input adjoints added to ``dW, dM, du, dx, dd``, ``da``, and the coefficients'
    adjoints ``(dgam, dc, dgam_p, dc_p, dKeta, dKeta_p, dG, dG_p)``."""
    Wt = tl.trans(W)
    Mt = tl.trans(M)
    # read: Z = gam*(a W^T) + c*(a M^T) - (Keta*(a u^T)) E - (G*(a x^T)) d
    dW += tl.dot(tl.trans(gam[:, None] * dZ), a, input_precision=PREC)
    dM += tl.dot(tl.trans(c[:, None] * dZ), a, input_precision=PREC)
    da = gam[:, None] * tl.dot(dZ, W, input_precision=PREC) + c[:, None] * tl.dot(dZ, M, input_precision=PREC)
    dgam = tl.sum(dZ * tl.dot(a, Wt, input_precision=PREC), 1)
    dc = tl.sum(dZ * tl.dot(a, Mt, input_precision=PREC), 1)
    AU = tl.dot(a, tl.trans(u), input_precision=PREC)
    AX = tl.dot(a, tl.trans(x), input_precision=PREC)
    dA = -tl.dot(dZ, tl.trans(E), input_precision=PREC)
    dE -= tl.dot(tl.trans(Keta * AU), dZ, input_precision=PREC)
    dKeta = dA * AU
    dAU = dA * Keta
    da += tl.dot(dAU, u, input_precision=PREC)
    du += tl.dot(tl.trans(dAU), a, input_precision=PREC)
    dB = -tl.dot(dZ, tl.trans(d), input_precision=PREC)
    dd -= tl.dot(tl.trans(G * AX), dZ, input_precision=PREC)
    dG = dB * AX
    dAX = dB * G
    da += tl.dot(dAX, x, input_precision=PREC)
    dx += tl.dot(tl.trans(dAX), a, input_precision=PREC)
    # solve: E = P R
    dR = tl.dot(tl.trans(P), dE, input_precision=PREC)
    dL = -tl.dot(dR, tl.trans(E), input_precision=PREC)
    UU = tl.dot(u, tl.trans(u), input_precision=PREC)
    UX = tl.dot(u, tl.trans(x), input_precision=PREC)
    dKeta_p = dL * UU
    dUU = dL * Keta_p
    du += tl.dot(dUU + tl.trans(dUU), u, input_precision=PREC)
    # right-hand side: R = gam_p*(u W^T) + c_p*(u M^T) - (G_p*(u x^T)) d
    dW += tl.dot(tl.trans(gam_p[:, None] * dR), u, input_precision=PREC)
    dM += tl.dot(tl.trans(c_p[:, None] * dR), u, input_precision=PREC)
    du += gam_p[:, None] * tl.dot(dR, W, input_precision=PREC) + c_p[:, None] * tl.dot(dR, M, input_precision=PREC)
    dgam_p = tl.sum(dR * tl.dot(u, Wt, input_precision=PREC), 1)
    dc_p = tl.sum(dR * tl.dot(u, Mt, input_precision=PREC), 1)
    dC = -tl.dot(dR, tl.trans(d), input_precision=PREC)
    dd -= tl.dot(tl.trans(G_p * UX), dR, input_precision=PREC)
    dG_p = dC * UX
    dUX = dC * G_p
    du += tl.dot(dUX, x, input_precision=PREC)
    dx += tl.dot(tl.trans(dUX), u, input_precision=PREC)
    return dW, dM, da, du, dx, dd, dgam, dc, dgam_p, dc_p, dKeta, dKeta_p, dG, dG_p


@triton.jit
def _unit_bwd(x, du):
    """Adjoint of ``u = x / max(|x|, 1e-12)``."""
    nrm = tl.sqrt(tl.sum(x * x, 1))
    den = tl.maximum(nrm, 1e-12)
    u = x / den[:, None]
    radial = tl.where(nrm >= 1e-12, tl.sum(u * du, 1), 0.0)
    return (du - u * radial[:, None]) / den[:, None]


@triton.jit
def _safe_log_grad(x):
    return tl.where(x >= 1e-30, 1.0 / tl.maximum(x, 1e-30), 0.0)


@triton.jit
def _dgd_mlp_bwd_kernel(
    q_ptr, k_ptr, v_ptr,                 # [B, H, T, D], last dim contiguous
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    lr_ptr, decay_ptr, beta_ptr,         # [B, H, T], any strides
    slr_b, slr_h, slr_t, sdc_b, sdc_h, sdc_t, sbt_b, sbt_h, sbt_t,
    s0_ptr, s1_ptr, sm0_ptr, sm1_ptr,    # [B, H, n_chunks, D, D] contiguous: every chunk's start state
    gy_ptr,                              # [B, H, T, D] contiguous: y's adjoint
    gw0_ptr, gw1_ptr, gm0_ptr, gm1_ptr, ga0_ptr, ga1_ptr,  # [B, H, D, D] contiguous: end state / anchor adjoints
    dq_ptr, dk_ptr, dv_ptr,              # [B, H, T, D] contiguous
    dlr_ptr, ddc_ptr, dbt_ptr,           # [B, H, T] contiguous
    dw0_ptr, dw1_ptr, dm0_ptr, dm1_ptr,  # [B, H, D, D] contiguous: the initial state's adjoints
    H, n_chunks, clip,
    BT: tl.constexpr, LOG_BT: tl.constexpr, D: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
    CARRY_MEM: tl.constexpr = False,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    rt = tl.arange(0, BT)
    rd = tl.arange(0, D)
    w_off = rd[:, None] * D + rd[None, :]
    st_off = pid * D * D + w_off

    # the carried adjoints: of the state after the chunk being walked (first: the call's end).
    # CARRY_MEM keeps them in the output buffers (L2) between chunks, not in registers: four
    # D x D fp32 blocks less live across the loop, for a store and a load of 4 D^2 per chunk
    if CARRY_MEM:
        tl.store(dw0_ptr + st_off, tl.load(gw0_ptr + st_off))
        tl.store(dw1_ptr + st_off, tl.load(gw1_ptr + st_off))
        tl.store(dm0_ptr + st_off, tl.load(gm0_ptr + st_off))
        tl.store(dm1_ptr + st_off, tl.load(gm1_ptr + st_off))
        tl.debug_barrier()
    else:
        dW0 = tl.load(gw0_ptr + st_off)
        dW1 = tl.load(gw1_ptr + st_off)
        dM0 = tl.load(gm0_ptr + st_off)
        dM1 = tl.load(gm1_ptr + st_off)

    le = rt[:, None] >= rt[None, :]
    lt = rt[:, None] > rt[None, :]
    eye = tl.where(rt[:, None] == rt[None, :], 1.0, 0.0)
    last_row = rt[:, None] == BT - 1
    last = rt == BT - 1
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    lr_base = lr_ptr + b * slr_b + h * slr_h
    dc_base = decay_ptr + b * sdc_b + h * sdc_h
    bt_base = beta_ptr + b * sbt_b + h * sbt_h
    tok_base = pid * n_chunks * BT

    for cj in range(n_chunks):
        ci = n_chunks - 1 - cj
        s_off = (pid * n_chunks + ci) * D * D + w_off
        W0 = tl.load(s0_ptr + s_off)
        W1 = tl.load(s1_ptr + s_off)
        M0 = tl.load(sm0_ptr + s_off)
        M1 = tl.load(sm1_ptr + s_off)
        tok = ci * BT + rt
        q = tl.load(q_base + tok[:, None] * sq_t + rd[None, :]).to(tl.float32)
        k = tl.load(k_base + tok[:, None] * sk_t + rd[None, :]).to(tl.float32)
        v = tl.load(v_base + tok[:, None] * sv_t + rd[None, :]).to(tl.float32)
        dy = tl.load(gy_ptr + (tok_base + tok)[:, None] * D + rd[None, :])
        eta = tl.load(lr_base + tok * slr_t).to(tl.float32)
        lam = 1.0 - tl.load(dc_base + tok * sdc_t).to(tl.float32)
        bet = tl.load(bt_base + tok * sbt_t).to(tl.float32)
        log_lam = tl.log(tl.maximum(lam, 1e-30))
        log_beta = tl.log(tl.maximum(bet, 1e-30))

        # ---- recompute the chunk's forward (as _dgd_mlp_fwd_kernel) ----
        LL, LB, K, Kp, Keta, Keta_p, Bm, bvec, gam, gam_p, G, G_p, c, c_p = _coefficients(
            log_lam, log_beta, eta, le, lt, PREC)
        keta_e = tl.sum(tl.where(last_row, Keta, 0.0), 0)
        g_e = tl.sum(tl.where(last_row, G, 0.0), 0)
        B_e = tl.sum(tl.where(last_row, Bm, 0.0), 0)
        gam_e = tl.sum(tl.where(last, gam, 0.0), 0)
        c_e = tl.sum(tl.where(last, c, 0.0), 0)
        b_e = tl.sum(tl.where(last, bvec, 0.0), 0)

        z0 = tl.dot(k, tl.trans(W0), input_precision=PREC)
        s1 = _gelu_grad(z0)
        x1 = _gelu(z0)
        d1r = 2.0 * (k + tl.dot(x1, tl.trans(W1), input_precision=PREC) - v)
        gw = tl.dot(d1r, W1, input_precision=PREC)
        d0r = gw * s1
        if CLIP:
            kk = tl.sum(k * k, 1)
            xx = tl.sum(x1 * x1, 1)
            dd1 = tl.sum(d1r * d1r, 1)
            dd0 = tl.sum(d0r * d0r, 1)
            sq = dd1 * xx + dd0 * kk
            f = clip / tl.sqrt(tl.maximum(sq, clip * clip))
        else:
            f = tl.full((BT,), 1.0, tl.float32)
        d0 = d0r * f[:, None]
        d1 = d1r * f[:, None]
        u0 = _normalize(k)
        u1 = _normalize(x1)
        E0, P0 = _solve(W0, M0, k, u0, d0, gam_p, c_p, Keta_p, G_p, eye, LOG_BT, PREC)
        Z0 = (gam[:, None] * tl.dot(q, tl.trans(W0), input_precision=PREC)
              + c[:, None] * tl.dot(q, tl.trans(M0), input_precision=PREC)
              - tl.dot(Keta * tl.dot(q, tl.trans(u0), input_precision=PREC), E0, input_precision=PREC)
              - tl.dot(G * tl.dot(q, tl.trans(k), input_precision=PREC), d0, input_precision=PREC))
        a1 = _gelu(Z0)
        E1, P1 = _solve(W1, M1, x1, u1, d1, gam_p, c_p, Keta_p, G_p, eye, LOG_BT, PREC)

        # ---- backward ----
        if CARRY_MEM:
            dW1 = tl.load(dw1_ptr + st_off)
            dM1 = tl.load(dm1_ptr + st_off)
        dW1s, dM1s, dE1, du1, dx1, dd1s, dgam_e, dc_e, db_e, dketa_e, dg_e, dB_e = _end_bwd(
            W1, M1, x1, u1, d1, E1, dW1, dM1, gam_e, c_e, b_e, keta_e, g_e, B_e, PREC)
        if CARRY_MEM:
            dW0 = tl.load(dw0_ptr + st_off)
            dM0 = tl.load(dm0_ptr + st_off)
        dW0s, dM0s, dE0, du0, dk, dd0s, e0, e1, e2, e3, e4, e5 = _end_bwd(
            W0, M0, k, u0, d0, E0, dW0, dM0, gam_e, c_e, b_e, keta_e, g_e, B_e, PREC)
        dgam_e += e0
        dc_e += e1
        db_e += e2
        dketa_e += e3
        dg_e += e4
        dB_e += e5
        dW1s, dM1s, da1, du1, dx1, dd1s, dgam, dc, dgam_p, dc_p, dKeta, dKeta_p, dG, dG_p = _layer_bwd(
            W1, M1, x1, u1, d1, a1, E1, P1, dy, dE1, dW1s, dM1s, du1, dx1, dd1s,
            gam, c, gam_p, c_p, Keta, Keta_p, G, G_p, PREC)
        dZ0 = da1 * _gelu_grad(Z0)
        dW0s, dM0s, dq, du0, dk, dd0s, h0, h1, h2, h3, h4, h5, h6, h7 = _layer_bwd(
            W0, M0, k, u0, d0, q, E0, P0, dZ0, dE0, dW0s, dM0s, du0, dk, dd0s,
            gam, c, gam_p, c_p, Keta, Keta_p, G, G_p, PREC)
        dgam += h0
        dc += h1
        dgam_p += h2
        dc_p += h3
        dKeta += h4
        dKeta_p += h5
        dG += h6
        dG_p += h7
        dq += dy
        dk += _unit_bwd(k, du0)
        dx1 += _unit_bwd(x1, du1)
        # clip: d = f d_raw
        dd0r = dd0s * f[:, None]
        dd1r = dd1s * f[:, None]
        if CLIP:
            df = tl.sum(dd0s * d0r, 1) + tl.sum(dd1s * d1r, 1)
            dsq = tl.where(sq >= clip * clip, -0.5 * df * f / tl.maximum(sq, clip * clip), 0.0)
            dd1r += (2.0 * dsq * xx)[:, None] * d1r
            dx1 += (2.0 * dsq * dd1)[:, None] * x1
            dd0r += (2.0 * dsq * kk)[:, None] * d0r
            dk += (2.0 * dsq * dd0)[:, None] * k
        # signals: d0r = (d1r W1) * gelu'(z0), d1r = 2 (k + x1 W1^T - v), x1 = gelu(z0), z0 = k W0^T
        dg = dd0r * s1
        dz0 = dd0r * gw * _gelu_grad2(z0)
        dd1r += tl.dot(dg, tl.trans(W1), input_precision=PREC)
        dW1s += tl.dot(tl.trans(d1r), dg, input_precision=PREC)
        dp = 2.0 * dd1r
        dk += dp
        dx1 += tl.dot(dp, W1, input_precision=PREC)
        dW1s += tl.dot(tl.trans(dp), x1, input_precision=PREC)
        dz0 += dx1 * s1
        dk += tl.dot(dz0, W0, input_precision=PREC)
        dW0s += tl.dot(tl.trans(dz0), k, input_precision=PREC)

        # coefficients: the chunk-end scalars / rows are last rows of gam, c, b, Keta, G, Bm
        dKeta += tl.where(last_row, dketa_e[None, :], 0.0)
        dG += tl.where(last_row, dg_e[None, :], 0.0)
        dBm = tl.where(last_row, dB_e[None, :], 0.0)
        dgam += tl.where(last, dgam_e, 0.0)
        dc += tl.where(last, dc_e, 0.0)
        dbvec = tl.where(last, db_e, 0.0)
        # G = Keta Bm, c = -Keta b (and their t-1 versions)
        dKeta += tl.dot(dG, tl.trans(Bm), input_precision=PREC) - dc[:, None] * bvec[None, :]
        dKeta_p += tl.dot(dG_p, tl.trans(Bm), input_precision=PREC) - dc_p[:, None] * bvec[None, :]
        dBm += (tl.dot(tl.trans(Keta), dG, input_precision=PREC)
                + tl.dot(tl.trans(Keta_p), dG_p, input_precision=PREC))
        dbvec -= tl.sum(Keta * dc[:, None], 0) + tl.sum(Keta_p * dc_p[:, None], 0)
        deta = tl.sum(dKeta * K, 0) + tl.sum(dKeta_p * Kp, 0)
        Kd = dKeta * Keta
        Kpd = dKeta_p * Keta_p
        Bd = dBm * Bm
        dLL = tl.sum(Kd, 1) - tl.sum(Kd, 0) - tl.sum(Kpd, 0) + dgam * gam
        dLLx = tl.sum(Kpd, 1) + dgam_p * gam_p
        dLB = tl.sum(Bd, 1) - tl.sum(Bd, 0) + dbvec * bvec
        # LL / LB inclusive and LLx exclusive cumulative sums: reverse cumulative sums
        dlog_lam = tl.sum(tl.where(le, dLL[:, None], 0.0), 0) + tl.sum(tl.where(lt, dLLx[:, None], 0.0), 0)
        dlog_beta = tl.sum(tl.where(le, dLB[:, None], 0.0), 0)

        out_tok = (tok_base + tok)[:, None] * D + rd[None, :]
        tl.store(dq_ptr + out_tok, dq)
        tl.store(dk_ptr + out_tok, dk)
        tl.store(dv_ptr + out_tok, -dp)
        tl.store(dlr_ptr + tok_base + tok, deta)
        tl.store(ddc_ptr + tok_base + tok, -dlog_lam * _safe_log_grad(lam))
        tl.store(dbt_ptr + tok_base + tok, dlog_beta * _safe_log_grad(bet))

        if ci == n_chunks - 1:  # the anchor is this (the last) chunk's start state
            dW0s += tl.load(ga0_ptr + st_off)
            dW1s += tl.load(ga1_ptr + st_off)
        if CARRY_MEM:
            tl.debug_barrier()  # every thread has read this chunk's carried adjoints ...
            tl.store(dw0_ptr + st_off, dW0s)
            tl.store(dw1_ptr + st_off, dW1s)
            tl.store(dm0_ptr + st_off, dM0s)
            tl.store(dm1_ptr + st_off, dM1s)
            tl.debug_barrier()  # ... and written the next chunk's before any reads them
        else:
            dW0 = dW0s
            dW1 = dW1s
            dM0 = dM0s
            dM1 = dM1s

    if not CARRY_MEM:
        tl.store(dw0_ptr + st_off, dW0)
        tl.store(dw1_ptr + st_off, dW1)
        tl.store(dm0_ptr + st_off, dM0)
        tl.store(dm1_ptr + st_off, dM1)


def dgd_mlp_bwd_fused(
    inputs: tuple[Tensor, ...], saved: list[Tensor], cots: tuple[Tensor | None, ...], *,
    chunk: int, clip: float | None, precision: str = "ieee", num_warps: int | None = None,
    maxnreg: int | None = None, carry_mem: bool = False,
) -> list[Tensor]:
    """The adjoints of ``(q, k, v, lr, decay, beta, W0, W1, M0, M1)`` from those of
    ``(y, W0', W1', M0', M1', anchor0, anchor1)`` (``None``: zero) by the fused kernel, given the
    state at every chunk start (``saved``: the forward's ``save_every=1`` checkpoints,
    ``[B, H, n_chunks, D, D]``). Full-shape (``[B, H, ...]``) fp32 gradients, as
    ``dgd_mlp_bwd_ref.dgd_mlp_bwd_reference``."""
    q, k, v, lr, decay, beta = inputs
    bsz, heads, t, d = q.shape
    n_chunks = t // chunk
    if saved[0].shape[2] != n_chunks:
        raise ValueError(f"dgd_mlp_bwd_fused: needs the state at every chunk start ({n_chunks}), got {saved[0].shape[2]}")
    dev = q.device

    def dense(x: Tensor | None, shape: tuple[int, ...]) -> Tensor:
        return torch.zeros(shape, device=dev, dtype=torch.float32) if x is None else x.float().contiguous()

    w_shape = (bsz, heads, d, d)
    gy = dense(cots[0], (bsz, heads, t, d))
    gstate = [dense(x, w_shape) for x in cots[1:7]]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    saved = [s.contiguous() for s in saved]
    dq, dk, dv = (torch.empty(bsz, heads, t, d, device=dev, dtype=torch.float32) for _ in range(3))
    dgates = [torch.empty(bsz, heads, t, device=dev, dtype=torch.float32) for _ in range(3)]
    dstate = [torch.empty(w_shape, device=dev, dtype=torch.float32) for _ in range(4)]
    if n_chunks == 0:
        return [dq, dk, dv, *dgates, *(g.clone() for g in gstate[:4])]
    _dgd_mlp_bwd_kernel[(bsz * heads,)](
        q, k, v,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        lr, decay, beta,
        lr.stride(0), lr.stride(1), lr.stride(2), decay.stride(0), decay.stride(1), decay.stride(2),
        beta.stride(0), beta.stride(1), beta.stride(2),
        *saved, gy, *gstate, dq, dk, dv, *dgates, *dstate,
        heads, n_chunks, float(clip or 0.0),
        BT=chunk, LOG_BT=chunk.bit_length() - 1, D=d, CLIP=clip is not None, PREC=precision, CARRY_MEM=carry_mem,
        **launch_options(d, num_warps, maxnreg),
    )
    return [dq, dk, dv, *dgates, *dstate]
