"""HOPE's generators (the self-modifying memory's k / v / lr / decay memories, Eq. 83-90) over a
whole call, forward, as one persistent Triton program per (batch, head).

The generators are one linear memory ``G`` of ``2 D + 2`` rows per head (``compile/selfmod.py``:
rows ``[k | v | lr | decay]``) that learns in context chunk by chunk (the op's ``gen_period``)
under the level's rule, here DGD with decay and momentum as ``models/hope.yaml`` ships it. Per
chunk of ``n`` tokens ``x`` (the convolved input of one head), at the chunk-start state ``G``:

1. generate: ``[k_raw | v | r] = x G^T``, ``k = normalize(k_raw)``,
   ``lr_raw = sigmoid(r_0 + b_lr)``, ``decay_raw = sigmoid(r_1 + b_decay)`` (the outputs: the
   main memory's keys, values and raw gates);
2. the self-generated targets ``vhat = normalize(v) G^T`` and the error signals of the ``l2``
   objective on ``(k, vhat)``: ``d = 2 (k G^T - vhat)``, each token's gradient ``d k^T`` clipped
   to the level's ``clip``;
3. the DGD chunk step of ``G`` and its momentum, with ``lr = lr_scale * lr_raw``,
   ``decay = decay_scale * decay_raw`` and the rule's ``beta``: ``dgd_mlp``'s in-chunk solve and
   chunk end on one linear layer whose input is ``k`` (DGD acts on a weight's input side, so
   the row blocks ``k`` / ``v`` / rates are three layers sharing that input and the gates).

This is exactly the op's chunk loop (``SelfModOp._generate_loop``: ``LinearMemory.apply``,
``F.normalize``, ``torch.sigmoid`` and one ``loops.run`` per chunk through ``dgd_dual``), which is
the reference: ``tests/test_triton_gen.py`` compares the two. The state (``G``: 33 KB fp32 at
``D = 64``, with its momentum 66 KB) stays on-chip for the whole call, so one launch replaces
the loop's chain of small kernels per chunk. The rate rows (2) are padded to ``R = 16``
(``tl.dot``'s minimum), masked on load and store.

Forward only: evaluation and generation (no gradient wanted). Training keeps the loop, whose
backward autograd derives; a fused backward is the next step (issue 12).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from nestlearn.loops.triton.dgd_mlp import (
    _chunk_end,
    _coefficients,
    _end_coefficients,
    _normalize,
    _rhs,
    _rows,
    _tril_inverse,
)

RATES = 2
"""Rows of ``G`` after ``k`` and ``v``: the raw ``lr`` and ``decay`` gates."""
R_PAD = 16
"""The rate rows padded to ``tl.dot``'s minimum."""


class GenOut(NamedTuple):
    k: Tensor
    """``[B, H, T, D]`` unit keys."""
    v: Tensor
    """``[B, H, T, D]`` values."""
    lr_raw: Tensor
    """``[B, H, T]``: ``sigmoid(r_lr + b_lr)``."""
    decay_raw: Tensor
    """``[B, H, T]``: ``sigmoid(r_decay + b_decay)``."""
    weights: Tensor
    """``G`` after the last chunk, ``[B, H, 2D + 2, D]``."""
    momentum: Tensor
    """DGD's momentum of ``G`` after the last chunk."""
    anchor: Tensor
    """``G`` at the last chunk's start (the carried ``anchor``)."""


@triton.jit
def _gen_dgd_fwd_kernel(
    x_ptr, sx_b, sx_h, sx_t,                     # [B, H, T, D], last dim contiguous
    w_ptr, sw_b, sw_h, sw_o, m_ptr, sm_b, sm_h, sm_o,  # [B, H, 2D + 2, D], last dim contiguous
    bias_ptr,                                    # [H, 2]: b_lr, b_decay (contiguous)
    beta_ptr, sbt_b, sbt_h, sbt_t,               # [B, H, T], any strides
    k_out, v_out, lr_out, dc_out,                # [B, H, T, D] / [B, H, T] contiguous
    w_out, m_out, a_out,                         # [B, H, 2D + 2, D] contiguous
    H, n_chunks, lr_scale, decay_scale, clip,
    BT: tl.constexpr, LOG_BT: tl.constexpr, D: tl.constexpr, R: tl.constexpr, CLIP: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    rt = tl.arange(0, BT)
    rd = tl.arange(0, D)
    rr = tl.arange(0, R)
    real = rr < 2  # the rate rows that exist
    sq_off = rd[:, None] * D + rd[None, :]
    w_base = w_ptr + b * sw_b + h * sw_h
    m_base = m_ptr + b * sm_b + h * sm_h
    # the fast state, fp32, on-chip for the whole call: the k, v and rate row blocks of G and M
    Wk = tl.load(w_base + rd[:, None] * sw_o + rd[None, :])
    Wv = tl.load(w_base + (D + rd)[:, None] * sw_o + rd[None, :])
    Wr = tl.load(w_base + (2 * D + rr)[:, None] * sw_o + rd[None, :], mask=real[:, None], other=0.0)
    Mk = tl.load(m_base + rd[:, None] * sm_o + rd[None, :])
    Mv = tl.load(m_base + (D + rd)[:, None] * sm_o + rd[None, :])
    Mr = tl.load(m_base + (2 * D + rr)[:, None] * sm_o + rd[None, :], mask=real[:, None], other=0.0)
    b_lr = tl.load(bias_ptr + h * 2)
    b_dc = tl.load(bias_ptr + h * 2 + 1)

    le = rt[:, None] >= rt[None, :]
    lt = rt[:, None] > rt[None, :]
    eye = tl.where(rt[:, None] == rt[None, :], 1.0, 0.0)
    x_base = x_ptr + b * sx_b + h * sx_h
    bt_base = beta_ptr + b * sbt_b + h * sbt_h
    kv_base = pid * n_chunks * BT * D
    g_base = pid * n_chunks * BT
    out_base = pid * (2 * D + 2) * D

    for ci in range(n_chunks):
        tok = ci * BT + rt
        x = tl.load(x_base + tok[:, None] * sx_t + rd[None, :])
        # 1. generate from the chunk-start state
        k = _normalize(tl.dot(x, tl.trans(Wk), input_precision=PREC))
        v = tl.dot(x, tl.trans(Wv), input_precision=PREC)
        rates = tl.dot(x, tl.trans(Wr), input_precision=PREC)  # [BT, R]: columns 0 and 1 are real
        lr_raw = tl.sigmoid(tl.sum(tl.where(rr[None, :] == 0, rates, 0.0), 1) + b_lr)
        dc_raw = tl.sigmoid(tl.sum(tl.where(rr[None, :] == 1, rates, 0.0), 1) + b_dc)
        tl.store(k_out + kv_base + tok[:, None] * D + rd[None, :], k)
        tl.store(v_out + kv_base + tok[:, None] * D + rd[None, :], v)
        tl.store(lr_out + g_base + tok, lr_raw)
        tl.store(dc_out + g_base + tok, dc_raw)

        # 2. self-generated targets and the l2 error signals at the chunk-start state
        nv = _normalize(v)
        dk = 2.0 * (tl.dot(k, tl.trans(Wk), input_precision=PREC) - tl.dot(nv, tl.trans(Wk), input_precision=PREC))
        dv = 2.0 * (tl.dot(k, tl.trans(Wv), input_precision=PREC) - tl.dot(nv, tl.trans(Wv), input_precision=PREC))
        dr = 2.0 * (tl.dot(k, tl.trans(Wr), input_precision=PREC) - tl.dot(nv, tl.trans(Wr), input_precision=PREC))
        if CLIP:  # each token's gradient d k^T, over all of G, to norm <= clip
            sq = (tl.sum(dk * dk, 1) + tl.sum(dv * dv, 1) + tl.sum(dr * dr, 1)) * tl.sum(k * k, 1)
            f = clip / tl.sqrt(tl.maximum(sq, clip * clip))
            dk = dk * f[:, None]
            dv = dv * f[:, None]
            dr = dr * f[:, None]
        u = _normalize(k)  # DGD's unit layer input (k is unit already; the rule normalises again)

        # 3. the DGD chunk step of each row block (dgd_mlp's math, one linear layer on input k)
        eta = lr_scale * lr_raw
        log_lam = tl.log(tl.maximum(1.0 - decay_scale * dc_raw, 1e-30))
        log_beta = tl.log(tl.maximum(tl.load(bt_base + tok * sbt_t), 1e-30))
        LL, LB, _K, _Kp, _Keta, Keta_p, Bm, bvec, _gam, gam_p, _G, G_p, _c, c_p = _coefficients(
            log_lam, log_beta, eta, le, lt, PREC)
        keta_e, g_e, B_e, gam_e, b_e, c_e = _end_coefficients(log_lam, log_beta, eta, LL, LB, Bm, bvec)
        # dgd_mlp._solve per block, the triangular system (the blocks share their input k) once
        Linv = _tril_inverse(Keta_p * tl.dot(u, tl.trans(u), input_precision=PREC), eye, LOG_BT, PREC)
        Ek = tl.dot(Linv, _rhs(Wk, Mk, k, u, dk, gam_p, c_p, G_p, PREC), input_precision=PREC)
        Ev = tl.dot(Linv, _rhs(Wv, Mv, k, u, dv, gam_p, c_p, G_p, PREC), input_precision=PREC)
        Er = tl.dot(Linv, _rhs(Wr, Mr, k, u, dr, gam_p, c_p, G_p, PREC), input_precision=PREC)
        if ci == n_chunks - 1:  # the carried anchor: the last chunk's start state
            tl.store(a_out + out_base + sq_off, Wk)
            tl.store(a_out + out_base + D * D + sq_off, Wv)
            tl.store(a_out + out_base + 2 * D * D + rr[:, None] * D + rd[None, :], Wr, mask=real[:, None])
        Wk, Mk = _chunk_end(Wk, Mk, k, u, dk, Ek, gam_e, c_e, b_e, keta_e, g_e, B_e, PREC)
        Wv, Mv = _chunk_end(Wv, Mv, k, u, dv, Ev, gam_e, c_e, b_e, keta_e, g_e, B_e, PREC)
        Wr, Mr = _chunk_end(Wr, Mr, k, u, dr, Er, gam_e, c_e, b_e, keta_e, g_e, B_e, PREC)

    tl.store(w_out + out_base + sq_off, Wk)
    tl.store(w_out + out_base + D * D + sq_off, Wv)
    tl.store(w_out + out_base + 2 * D * D + rr[:, None] * D + rd[None, :], Wr, mask=real[:, None])
    tl.store(m_out + out_base + sq_off, Mk)
    tl.store(m_out + out_base + D * D + sq_off, Mv)
    tl.store(m_out + out_base + 2 * D * D + rr[:, None] * D + rd[None, :], Mr, mask=real[:, None])


def launch_options(chunk: int, num_warps: int | None = None) -> dict[str, int]:
    """``num_warps`` and ptxas's register cap (the whole register file of one program, as
    ``dgd_mlp.launch_options``: left alone ptxas kept 32 registers and spilled the rest). ptxas
    for sm_90 (Triton 3.9, ieee, D 64; ``tests/test_triton_gen.py`` compiles it): chunk 16 at 8
    warps 255 registers and 2.7 KB of spills a thread; chunk 64 (HOPE's ``gen_period``) at 16
    warps 128 registers and 6.2 KB, compiled in 35 s on a 2-core CPU (at 8 warps 7.4 KB and 83 s;
    the first use compiles, later ones read triton's cache). Untimed on a GPU."""
    warps = num_warps or (16 if chunk >= 64 else 8)
    out = {"num_warps": warps}
    if torch.version.hip is None:
        out["maxnreg"] = min(255, 65536 // (32 * warps))
    return out


def gen_dgd_fwd(
    x: Tensor, weights: Tensor, momentum: Tensor, bias: Tensor, beta: Tensor, *,
    chunk: int, lr_scale: float, decay_scale: float, clip: float | None = None, precision: str = "ieee",
    num_warps: int | None = None,
) -> GenOut:
    """The generators over ``T`` tokens from a state at a chunk boundary (module docstring):
    ``x`` ``[B, H, T, D]``; ``weights`` / ``momentum`` ``[B, H, 2D + 2, D]`` (expanded views over
    ``B`` are fine); ``bias`` ``[H, 2]`` (``b_lr``, ``b_decay``); ``beta`` ``[B, H, T]`` (expanded
    views are fine). fp32; ``T`` a multiple of ``chunk``; ``chunk`` and ``D`` powers of two, >= 16
    on a GPU. ``decay_scale = 0`` is DGD without decay."""
    bsz, heads, t, d = x.shape
    if t % chunk or chunk & (chunk - 1) or d & (d - 1):
        raise ValueError(f"gen_dgd_fwd: T={t} must be whole chunks of {chunk}; chunk and D={d} powers of two")
    if weights.shape[-2:] != (2 * d + RATES, d) or momentum.shape != weights.shape:
        raise ValueError(f"gen_dgd_fwd: weights / momentum must be [B, H, {2 * d + RATES}, {d}]")
    if any(a.dtype != torch.float32 for a in (x, weights, momentum, bias, beta)):
        raise TypeError("gen_dgd_fwd: fp32 tensors only (the inner loop runs in fp32)")
    x, w, m = _rows(x), _rows(weights), _rows(momentum)
    bias = bias.contiguous()
    dev = x.device
    k = torch.empty(bsz, heads, t, d, device=dev, dtype=torch.float32)
    v = torch.empty_like(k)
    lr_raw = torch.empty(bsz, heads, t, device=dev, dtype=torch.float32)
    dc_raw = torch.empty_like(lr_raw)
    w_out, m_out, a_out = (torch.empty(bsz, heads, 2 * d + RATES, d, device=dev, dtype=torch.float32)
                           for _ in range(3))
    if t == 0:
        return GenOut(k, v, lr_raw, dc_raw, w.clone(), m.clone(), w.clone())
    _gen_dgd_fwd_kernel[(bsz * heads,)](
        x, x.stride(0), x.stride(1), x.stride(2),
        w, w.stride(0), w.stride(1), w.stride(2), m, m.stride(0), m.stride(1), m.stride(2),
        bias, beta, beta.stride(0), beta.stride(1), beta.stride(2),
        k, v, lr_raw, dc_raw, w_out, m_out, a_out,
        heads, t // chunk, float(lr_scale), float(decay_scale), float(clip or 0.0),
        BT=chunk, LOG_BT=chunk.bit_length() - 1, D=d, R=R_PAD, CLIP=clip is not None, PREC=precision,
        **launch_options(chunk, num_warps),
    )
    return GenOut(k, v, lr_raw, dc_raw, w_out, m_out, a_out)
