"""The backward of one CMS chunk step (``sgd_mlp.py``) as Triton kernels: exactly the adjoints of
``sgd_mlp_bwd_ref.py`` (the spec, with the derivation), on the forward's tiling.

Inputs: the chunk-start weights ``W0`` ``[Hd, Di]``, ``W1`` ``[Do, Hd]`` and the chunk's
``q, k, v, lr`` (what ``SGDMLPStep`` saves), and the cotangents ``gy``, ``G0`` (of ``W0'``),
``G1`` (of ``W1'``); outputs ``dq, dk, dv, dlr, dW0, dW1``. Nothing of the forward's chunk is
saved: its quantities are recomputed here, the first two launches being the forward's own.

Design (the why). As in the forward, the grid is (sequence x head, hidden tiles of ``BH``) or
(sequence x head, column blocks of ``BD``), every contraction over ``Di`` / ``Do`` a loop over
column blocks inside a program, every sum over the hidden dimension a per-tile partial that a
later launch adds in a fixed order (deterministic, no atomics). The adjoint chain crosses the
hidden dimension twice where something hidden-local needs it: ``d1`` (as in the forward) and
``g_d1`` (``= (C * a h^T)^T gy - lr (h G1^T) + g_e W1^T``, needed by ``g_h += 2 g_d1 W1``). All
else that sums over the hidden dimension (``g_q``, ``g_k``, ``g_A = g_Z0 d0^T``, ``g_lr``) is
only an output, so it is summed at the end. Six launches per chunk:

1. ``sgd_mlp._signals`` (rows x tiles): ``z = k W0^T``, ``zq = q W0^T``, partial predictions;
2. ``sgd_mlp._error`` (rows x column blocks of ``Do``): ``d1``;
3. ``_bwd_local`` (rows x tiles): everything local to a hidden tile once ``d1`` is known:
   ``e, d0, q k^T, Z0, a`` (the forward's ``_update``), then ``g_B = gy d1^T``, ``g_a``,
   ``g_Z0``, ``g_d0``, ``g_e`` and the local part of ``g_z``; to scratch ``a, g_e, g_Z0, d0``
   and ``g_z``'s local part (``O(n Hd)`` each), and the tile's partials of ``a h^T``, ``g_Z0 d0^T``
   (``n x n``), ``g_lr`` (its three sums are each linear in one hidden-summed factor) and
   ``g_d1``'s hidden sums ``-lr h G1^T + g_e W1^T`` (``n x Do``, written in the first pass over
   ``Do``, completed in the second);
4. ``_bwd_error`` (rows x column blocks of ``Do``): ``g_d1`` from those partials; ``dv = -2 g_d1``;
5. ``_bwd_weights`` (rows x tiles): ``g_h``'s last term ``2 g_d1 W1``, hence ``g_z``; the tile's
   ``dW1`` and ``dW0`` (each local to the tile), and its partials of ``g_q = g_Z0 W0`` and
   ``g_k = g_z W0 - lr d0 G0`` (``n x Di``);
6. ``_bwd_inputs`` (rows x column blocks of ``Di``): ``dq``, ``dk`` from those partials and
   ``(C * g_A)`` with ``k`` / ``q``; the first block also sums ``dlr``.

Memory traffic per chunk and sequence, in weight-sized matrices (2 MB each at 512 -> 1024):
``W0`` read twice (launches 1, 5), ``W1`` four times (1, 3 twice: ``e = d1 W1`` must be complete
before ``g_e W1^T``, as in the forward's ``_update``; 5), ``G1`` twice (3, 5), ``G0`` twice (3 for
``k G0^T``, 5), ``dW0`` and ``dW1`` written once: 12 against the forward's 7. The scratch is
``O(n (7 Hd + 2 Do + tiles (2 n + Do + 2 Di)))`` per sequence (2.1 MB at c1's shape, n = 16,
written and read about once), so the weights dominate. A cotangent that is ``None`` is a stride-0 view of one zero (read from
cache, never materialised). Padded tokens (``n`` < ``BT``) have ``q = k = v = lr = gy = 0``, so
every adjoint on them is 0 and is never stored.

Every product is ``tl.dot`` at the forward's ``precision`` (``ieee`` unless the executor passed
``tf32``). ``TRITON_INTERPRET=1`` runs the kernels on the CPU for the tests.

Untimed (no GPU yet). ptxas for sm_90 (Triton 3.9, ``python -m bench.triton_cms --ptxas``), c1's
shape, chunk 16, default tiles (64, 64), 4 warps, registers / spilled bytes per thread / shared
memory per program: ``_bwd_local`` 255 / 464 / 88 KB, ``_bwd_error`` 128 / 0 / 5 KB,
``_bwd_weights`` 255 / 1800 / 96 KB, ``_bwd_inputs`` 128 / 0 / 9 KB (at 8 warps the spills are 8
and 760 B; column blocks of 32 at 4 warps 128 and 704 B; blocks of 32 at 8 warps: no spills, at
most 252 registers and 60 KB, the first setting to time). At chunk 64 ptxas left to itself picks
32 registers and spills 7-17 KB per thread: a register cap (as ``dgd_mlp.launch_options``) or
smaller tiles would come first there. ``LAUNCH`` passes tiles and warps to the kernels from
``SGDMLPStep`` for tuning.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from nestlearn.loops.triton.dgd_mlp import _gelu, _gelu_grad
from nestlearn.loops.triton.dgd_mlp_bwd import _gelu_grad2
from nestlearn.loops.triton.sgd_mlp import (
    MAX_CHUNK,
    _column_block,
    _error,
    _hidden_tile,
    _masked_scores,
    _rows,
    _signals,
    _tile_sum,
    block,
    check_signals,
)


@triton.jit
def _bwd_local(
    q_ptr, k_ptr, lr_ptr, w1_ptr, g0_ptr, g1_ptr, gy_ptr, z_ptr, zq_ptr, d1_ptr,
    gzl_ptr, a_ptr, ge_ptr, gz0_ptr, d0_ptr, up_ptr, sp_ptr, gap_ptr, lrp_ptr,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, slr_b, slr_h, slr_t,
    sw1_b, sw1_h, sw1_o, sw1_i, sg0_b, sg0_h, sg0_o, sg0_i, sg1_b, sg1_h, sg1_o, sg1_i, sgy_b, sgy_h, sgy_t,
    H, n, HD, NT,
    BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, DI: tl.constexpr, DO: tl.constexpr,
    PREC: tl.constexpr, READ_START: tl.constexpr,
):
    """Hidden tile ``j`` of row ``r`` once ``d1`` is known: the forward's tile quantities and every
    adjoint local to the tile (module docstring, launch 3)."""
    r, j, b, h, rt, rh, rd, tm = _hidden_tile(H, n, BT, BH, BD)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    w1_base = w1_ptr + b * sw1_b + h * sw1_h
    g0_base = g0_ptr + b * sg0_b + h * sg0_h
    g1_base = g1_ptr + b * sg1_b + h * sg1_h
    gy_base = gy_ptr + b * sgy_b + h * sgy_h
    d1_base = d1_ptr + r * BT * DO
    up_base = up_ptr + (r * NT + j) * BT * DO
    eta = tl.load(lr_ptr + b * slr_b + h * slr_h + rt * slr_t, mask=tm, other=0.0)
    s_off = r * BT * HD + rt[:, None] * HD + rh[None, :]
    z = tl.load(z_ptr + s_off)
    zq = tl.load(zq_ptr + s_off)
    hh = _gelu(z)
    gz1 = _gelu_grad(z)

    # first pass over Do: e = d1 W1_j, gy W1_j, d1 G1_j, g_B = gy d1^T, and g_d1's partial -lr h G1_j^T
    e = tl.zeros([BT, BH], dtype=tl.float32)
    ga = tl.zeros([BT, BH], dtype=tl.float32)
    dg1 = tl.zeros([BT, BH], dtype=tl.float32)
    gb = tl.zeros([BT, BT], dtype=tl.float32)
    for c0 in range(0, DO, BD):
        cols = c0 + rd
        w1 = tl.load(w1_base + cols[:, None] * sw1_o + rh[None, :] * sw1_i)  # [BD, BH]
        g1 = tl.load(g1_base + cols[:, None] * sg1_o + rh[None, :] * sg1_i)
        d1 = tl.load(d1_base + rt[:, None] * DO + cols[None, :])
        gy = tl.load(gy_base + rt[:, None] * sgy_t + cols[None, :], mask=tm[:, None], other=0.0)
        e += tl.dot(d1, w1, input_precision=PREC)
        ga += tl.dot(gy, w1, input_precision=PREC)
        dg1 += tl.dot(d1, g1, input_precision=PREC)
        if not READ_START:
            gb += tl.dot(gy, tl.trans(d1), input_precision=PREC)
        tl.store(up_base + rt[:, None] * DO + cols[None, :],
                 -eta[:, None] * tl.dot(hh, tl.trans(g1), input_precision=PREC))
    d0 = gz1 * e

    # over Di: k G0_j^T (and q k^T for the dual read)
    kg0 = tl.zeros([BT, BH], dtype=tl.float32)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    for c0 in range(0, DI, BD):
        cols = c0 + rd
        kx = tl.load(k_base + rt[:, None] * sk_t + cols[None, :], mask=tm[:, None], other=0.0)
        g0 = tl.load(g0_base + rh[:, None] * sg0_o + cols[None, :] * sg0_i)  # [BH, BD]
        kg0 += tl.dot(kx, tl.trans(g0), input_precision=PREC)
        if not READ_START:
            qx = tl.load(q_base + rt[:, None] * sq_t + cols[None, :], mask=tm[:, None], other=0.0)
            qk += tl.dot(qx, tl.trans(kx), input_precision=PREC)

    causal = rt[:, None] >= rt[None, :]
    cmat = tl.where(causal, -eta[None, :], 0.0)  # C[t, s] = -lr_s, s <= t
    amat = cmat * qk
    if READ_START:
        z0 = zq
    else:
        z0 = zq + tl.dot(amat, d0, input_precision=PREC)
    a = _gelu(z0)
    gd0 = -eta[:, None] * kg0
    gh = -eta[:, None] * dg1
    lrp = -tl.sum(hh * dg1, 1) - tl.sum(d0 * kg0, 1)  # g_lr's end-weight terms, indexed by token t
    if READ_START:
        gz0 = ga * _gelu_grad(z0)
    else:
        sj = tl.dot(a, tl.trans(hh), input_precision=PREC)  # this tile's part of S = a h^T
        gs = cmat * gb
        gz0 = (ga + tl.dot(gs, hh, input_precision=PREC)) * _gelu_grad(z0)
        gaj = tl.dot(gz0, tl.trans(d0), input_precision=PREC)  # this tile's part of g_A = g_Z0 d0^T
        gd0 += tl.dot(tl.trans(amat), gz0, input_precision=PREC)
        gh += tl.dot(tl.trans(gs), a, input_precision=PREC)
        # the gate's adjoint through C (indexed by s): linear in S and g_A, so partial per tile
        lrp -= tl.sum(tl.where(causal, gb * sj + gaj * qk, 0.0), 0)
        n_off = ((r * NT + j) * BT + rt[:, None]) * BT + rt[None, :]
        tl.store(sp_ptr + n_off, sj)
        tl.store(gap_ptr + n_off, gaj)
    tl.store(lrp_ptr + (r * NT + j) * BT + rt, lrp)
    ge = gd0 * gz1
    tl.store(gzl_ptr + s_off, gd0 * e * _gelu_grad2(z) + gh * gz1)  # g_z but for 2 g_d1 W1_j
    tl.store(a_ptr + s_off, a)
    tl.store(ge_ptr + s_off, ge)
    tl.store(gz0_ptr + s_off, gz0)
    tl.store(d0_ptr + s_off, d0)

    # second pass over Do: g_d1's partial += g_e W1_j^T. The first pass's stores may come from
    # other threads than these loads (layouts differ): a barrier makes them visible
    tl.debug_barrier()
    for c0 in range(0, DO, BD):
        cols = c0 + rd
        w1 = tl.load(w1_base + cols[:, None] * sw1_o + rh[None, :] * sw1_i)
        u_off = up_base + rt[:, None] * DO + cols[None, :]
        tl.store(u_off, tl.load(u_off) + tl.dot(ge, tl.trans(w1), input_precision=PREC))


@triton.jit
def _bwd_error(
    up_ptr, sp_ptr, lr_ptr, gy_ptr, gp_ptr, dv_ptr, slr_b, slr_h, slr_t, sgy_b, sgy_h, sgy_t, H, n, NT,
    BT: tl.constexpr, BD: tl.constexpr, DO: tl.constexpr, PREC: tl.constexpr, READ_START: tl.constexpr,
):
    """Column block ``c`` of row ``r``: ``g_d1 = sum_j u_j (+ (C * sum_j S_j)^T gy)``; ``2 g_d1`` to
    scratch, ``dv = -2 g_d1``."""
    r, b, h, rt, cols, tm, off = _column_block(H, n, BT, BD, DO)
    gd1 = _tile_sum(up_ptr, r, NT, off, BT, BD, DO)
    if not READ_START:
        cs = _masked_scores(sp_ptr, lr_ptr, r, b, h, rt, tm, slr_b, slr_h, slr_t, NT, BT)
        gy = tl.load(gy_ptr + b * sgy_b + h * sgy_h + rt[:, None] * sgy_t + cols[None, :], mask=tm[:, None], other=0.0)
        gd1 += tl.dot(tl.trans(cs), gy, input_precision=PREC)
    tl.store(gp_ptr + r * BT * DO + off, 2.0 * gd1)
    tl.store(dv_ptr + r * n * DO + off, -2.0 * gd1, mask=tm[:, None])


@triton.jit
def _bwd_weights(
    q_ptr, k_ptr, lr_ptr, w0_ptr, w1_ptr, g0_ptr, g1_ptr, gy_ptr, z_ptr, gzl_ptr, d1_ptr, gp_ptr,
    a_ptr, ge_ptr, gz0_ptr, d0_ptr, dw0_ptr, dw1_ptr, gqp_ptr, gkp_ptr,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, slr_b, slr_h, slr_t,
    sw0_b, sw0_h, sw0_o, sw0_i, sw1_b, sw1_h, sw1_o, sw1_i,
    sg0_b, sg0_h, sg0_o, sg0_i, sg1_b, sg1_h, sg1_o, sg1_i, sgy_b, sgy_h, sgy_t,
    H, n, HD, NT,
    BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, DI: tl.constexpr, DO: tl.constexpr,
    PREC: tl.constexpr,
):
    """Hidden tile ``j`` of row ``r`` once ``g_d1`` is known: ``g_z``, the tile's ``dW1`` and
    ``dW0``, and its partials of ``g_q`` and ``g_k`` (module docstring, launch 5)."""
    r, j, b, h, rt, rh, rd, tm = _hidden_tile(H, n, BT, BH, BD)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    w0_base = w0_ptr + b * sw0_b + h * sw0_h
    w1_base = w1_ptr + b * sw1_b + h * sw1_h
    g0_base = g0_ptr + b * sg0_b + h * sg0_h
    g1_base = g1_ptr + b * sg1_b + h * sg1_h
    gy_base = gy_ptr + b * sgy_b + h * sgy_h
    eta = tl.load(lr_ptr + b * slr_b + h * slr_h + rt * slr_t, mask=tm, other=0.0)
    s_off = r * BT * HD + rt[:, None] * HD + rh[None, :]
    z = tl.load(z_ptr + s_off)
    hh = _gelu(z)
    a = tl.load(a_ptr + s_off)
    ge = tl.load(ge_ptr + s_off)

    # over Do: dW1_j = G1_j + gy^T a + d1^T g_e + (2 g_d1)^T h, and (2 g_d1) W1_j for g_h
    gpw = tl.zeros([BT, BH], dtype=tl.float32)
    for c0 in range(0, DO, BD):
        cols = c0 + rd
        w_off = cols[:, None] * sw1_o + rh[None, :] * sw1_i
        w1 = tl.load(w1_base + w_off)  # [BD, BH]
        g1 = tl.load(g1_base + cols[:, None] * sg1_o + rh[None, :] * sg1_i)
        gy = tl.load(gy_base + rt[:, None] * sgy_t + cols[None, :], mask=tm[:, None], other=0.0)
        d1 = tl.load(d1_ptr + r * BT * DO + rt[:, None] * DO + cols[None, :])
        gp = tl.load(gp_ptr + r * BT * DO + rt[:, None] * DO + cols[None, :])
        gpw += tl.dot(gp, w1, input_precision=PREC)
        dw1 = (g1 + tl.dot(tl.trans(gy), a, input_precision=PREC) + tl.dot(tl.trans(d1), ge, input_precision=PREC)
               + tl.dot(tl.trans(gp), hh, input_precision=PREC))
        tl.store(dw1_ptr + r * DO * HD + cols[:, None] * HD + rh[None, :], dw1)
    gz = tl.load(gzl_ptr + s_off) + gpw * _gelu_grad(z)
    gz0 = tl.load(gz0_ptr + s_off)
    d0s = tl.load(d0_ptr + s_off) * eta[:, None]

    # over Di: dW0_j = G0_j + g_Z0^T q + g_z^T k; partials g_Z0 W0_j and g_z W0_j - lr d0 G0_j
    p_base = (r * NT + j) * BT * DI + rt[:, None] * DI
    for c0 in range(0, DI, BD):
        cols = c0 + rd
        w0 = tl.load(w0_base + rh[:, None] * sw0_o + cols[None, :] * sw0_i)  # [BH, BD]
        g0 = tl.load(g0_base + rh[:, None] * sg0_o + cols[None, :] * sg0_i)
        qx = tl.load(q_base + rt[:, None] * sq_t + cols[None, :], mask=tm[:, None], other=0.0)
        kx = tl.load(k_base + rt[:, None] * sk_t + cols[None, :], mask=tm[:, None], other=0.0)
        dw0 = g0 + tl.dot(tl.trans(gz0), qx, input_precision=PREC) + tl.dot(tl.trans(gz), kx, input_precision=PREC)
        tl.store(dw0_ptr + r * HD * DI + rh[:, None] * DI + cols[None, :], dw0)
        tl.store(gqp_ptr + p_base + cols[None, :], tl.dot(gz0, w0, input_precision=PREC))
        tl.store(gkp_ptr + p_base + cols[None, :],
                 tl.dot(gz, w0, input_precision=PREC) - tl.dot(d0s, g0, input_precision=PREC))


@triton.jit
def _bwd_inputs(
    q_ptr, k_ptr, lr_ptr, gqp_ptr, gkp_ptr, gap_ptr, lrp_ptr, dq_ptr, dk_ptr, dlr_ptr,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, slr_b, slr_h, slr_t, H, n, NT,
    BT: tl.constexpr, BD: tl.constexpr, DI: tl.constexpr, PREC: tl.constexpr, READ_START: tl.constexpr,
):
    """Column block ``c`` of row ``r``: ``dq = sum_j gq_j (+ (C * g_A) k)``, ``dk = sum_j gk_j
    (+ (C * g_A)^T q)``, ``g_A = sum_j g_A_j``; block 0 also ``dlr = sum_j lrp_j``."""
    r, b, h, rt, cols, tm, off = _column_block(H, n, BT, BD, DI)
    gq = tl.zeros([BT, BD], dtype=tl.float32)
    gk = tl.zeros([BT, BD], dtype=tl.float32)
    for j in range(NT):  # one loop for both sums (two ``_tile_sum``s compile to 20% more code)
        gq += tl.load(gqp_ptr + (r * NT + j) * BT * DI + off)
        gk += tl.load(gkp_ptr + (r * NT + j) * BT * DI + off)
    eta = tl.load(lr_ptr + b * slr_b + h * slr_h + rt * slr_t, mask=tm, other=0.0)
    if not READ_START:
        ga = tl.zeros([BT, BT], dtype=tl.float32)
        for j in range(NT):
            ga += tl.load(gap_ptr + ((r * NT + j) * BT + rt[:, None]) * BT + rt[None, :])
        gqk = tl.where(rt[:, None] >= rt[None, :], -eta[None, :], 0.0) * ga  # C * g_A
        qx = tl.load(q_ptr + b * sq_b + h * sq_h + rt[:, None] * sq_t + cols[None, :], mask=tm[:, None], other=0.0)
        kx = tl.load(k_ptr + b * sk_b + h * sk_h + rt[:, None] * sk_t + cols[None, :], mask=tm[:, None], other=0.0)
        gq += tl.dot(gqk, kx, input_precision=PREC)
        gk += tl.dot(tl.trans(gqk), qx, input_precision=PREC)
    tl.store(dq_ptr + r * n * DI + off, gq, mask=tm[:, None])
    tl.store(dk_ptr + r * n * DI + off, gk, mask=tm[:, None])
    if tl.program_id(1) == 0:  # column block 0
        g = tl.zeros([BT], dtype=tl.float32)
        for j in range(NT):
            g += tl.load(lrp_ptr + (r * NT + j) * BT + rt)
        tl.store(dlr_ptr + r * n + rt, g, mask=tm)


LAUNCH: dict[str, int] = {}
"""``block_h`` / ``block_d`` / ``num_warps`` that ``SGDMLPStep`` passes to ``sgd_mlp_step_bwd``
(empty: its defaults, the forward's tiles and 4 warps); ``bench.triton_cms`` sets them to tune."""


def _zeros_like(shape: torch.Size, x: Tensor) -> Tensor:
    """A stride-0 view of one zero: a ``None`` cotangent without memory or traffic."""
    return torch.zeros((), device=x.device, dtype=x.dtype).expand(shape)


def sgd_mlp_step_bwd(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, w0: Tensor, w1: Tensor,
    gy: Tensor | None, gw0n: Tensor | None, gw1n: Tensor | None, *,
    precision: str = "ieee", read_start: bool = False, block_h: int | None = None, block_d: int | None = None,
    num_warps: int = 4, signals: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``sgd_mlp_bwd_ref.sgd_mlp_step_bwd_reference`` as kernels: ``(dq, dk, dv, dlr, dW0, dW1)``
    of one chunk from the cotangents of ``(y, W0', W1')`` (``None``: zero). Shapes and strides as
    ``sgd_mlp_step_fwd``'s inputs (the cotangents too: any strides); the weights' adjoints are full
    ``[B, H, ., .]``; outputs contiguous. ``block_h`` / ``block_d`` as the forward's.
    ``signals``: the forward's ``z, zq, d1`` of this chunk (``sgd_mlp_step_fwd(signals=...)``,
    as ``sgd_mlp_rev`` keeps them): the first two launches, which recompute them, are skipped."""
    bsz, heads, n, di = q.shape
    hd, do = w0.shape[-2], w1.shape[-2]
    bh, bd = block_h or block(hd), block_d or block(math.gcd(di, do))
    if not 0 < n <= MAX_CHUNK:
        raise ValueError(f"sgd_mlp_step_bwd: a chunk of {n} tokens; the kernels take 1..{MAX_CHUNK}")
    if min(bh, bd) < 16 or hd % bh or di % bd or do % bd:
        raise ValueError(f"sgd_mlp_step_bwd: widths {di} -> {hd} -> {do} must be multiples of the tiles ({bh}, {bd}) >= 16")
    wshape0, wshape1 = (bsz, heads, hd, di), (bsz, heads, do, hd)
    g0 = _zeros_like(torch.Size(wshape0), q) if gw0n is None else gw0n
    g1 = _zeros_like(torch.Size(wshape1), q) if gw1n is None else gw1n
    gy_ = torch.zeros(bsz, heads, n, do, device=q.device, dtype=q.dtype) if gy is None else _rows(gy)
    if any(x.dtype != torch.float32 for x in (q, k, v, lr, w0, w1, g0, g1, gy_)):
        raise TypeError("sgd_mlp_step_bwd: fp32 tensors only")
    q, k, v = _rows(q), _rows(k), _rows(v)
    bt = max(16, triton.next_power_of_2(n))
    nt = hd // bh
    rows = bsz * heads

    def f32(*shape: int) -> Tensor:
        return torch.empty(*shape, device=q.device, dtype=torch.float32)

    gzl, a, ge, gz0, d0 = (f32(rows, bt, hd) for _ in range(5))
    parts = f32(rows, nt, bt, do)  # partial predictions, then g_d1's partials
    gp = f32(rows, bt, do)
    if signals is None:
        z, zq, d1 = f32(rows, bt, hd), f32(rows, bt, hd), f32(rows, bt, do)
    else:
        z, zq, d1 = check_signals("sgd_mlp_step_bwd", signals, [(rows, bt, hd), (rows, bt, hd), (rows, bt, do)])
    sp, gap = f32(rows, nt, bt, bt), f32(rows, nt, bt, bt)
    lrp = f32(rows, nt, bt)
    gqp, gkp = f32(rows, nt, bt, di), f32(rows, nt, bt, di)
    dq, dk, dv = f32(bsz, heads, n, di), f32(bsz, heads, n, di), f32(bsz, heads, n, do)
    dlr = f32(bsz, heads, n)
    dw0, dw1 = f32(*wshape0), f32(*wshape1)
    qs, ks, vs, ys = (x.stride()[:3] for x in (q, k, v, gy_))
    ls = lr.stride()
    ws = (*w0.stride(), *w1.stride())
    gs = (*g0.stride(), *g1.stride())
    common = {"BT": bt, "BD": bd, "DO": do, "num_warps": num_warps}
    tiles, cols_o, cols_i = (rows, nt), (rows, do // bd), (rows, di // bd)
    if signals is None:
        _signals[tiles](q, k, w0, w1, z, zq, parts, *qs, *ks, *ws, heads, n, hd, nt, BH=bh, DI=di, PREC=precision,
                        **common)
        _error[cols_o](parts, v, d1, *vs, heads, n, nt, **common)
    _bwd_local[tiles](q, k, lr, w1, g0, g1, gy_, z, zq, d1, gzl, a, ge, gz0, d0, parts, sp, gap, lrp,
                      *qs, *ks, *ls, *w1.stride(), *gs, *ys, heads, n, hd, nt,
                      BH=bh, DI=di, PREC=precision, READ_START=read_start, **common)
    _bwd_error[cols_o](parts, sp, lr, gy_, gp, dv, *ls, *ys, heads, n, nt, PREC=precision, READ_START=read_start,
                       **common)
    _bwd_weights[tiles](q, k, lr, w0, w1, g0, g1, gy_, z, gzl, d1, gp, a, ge, gz0, d0, dw0, dw1, gqp, gkp,
                        *qs, *ks, *ls, *ws, *gs, *ys, heads, n, hd, nt, BH=bh, DI=di, PREC=precision, **common)
    _bwd_inputs[cols_i](q, k, lr, gqp, gkp, gap, lrp, dq, dk, dlr, *qs, *ks, *ls, heads, n, nt,
                        BT=bt, BD=bd, DI=di, PREC=precision, READ_START=read_start, num_warps=num_warps)
    return dq, dk, dv, dlr, dw0, dw1
