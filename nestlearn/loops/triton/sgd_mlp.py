"""One chunk step of a CMS level (HOPE's ``mlp`` op at an in-context level) as Triton kernels,
and ``SGDMLPStep``, its ``autograd.Function``.

The memory is the one ``compile/ops.py`` builds for an in-context ``mlp`` node:
``M(x) = W1 gelu(W0 x)`` (``MLPMemory`` of depth 2, no residual, no biases), ``W0`` ``[Hd, Di]``
and ``W1`` ``[Do, Hd]`` per (sequence, head); ``kv_norm`` and the token gate act before the
memory problem exists (k / v arrive RMS-normalised, ``lr`` as a ``[B, H, T]`` tensor), so the
kernel sees plain ``q, k, v, lr``. The rule is SGD (``sgd``: no momentum, no decay), the
objective ``l2``. The math is ``loops/dual.py``'s for that case (its module docstring), which is
the reference: for one chunk of ``n`` tokens from the chunk-start weights, with
``C[t, s] = -lr_s`` for ``s <= t`` (0 above),

1. error signals at the chunk start: ``z = k W0^T``, ``h = gelu(z)``, ``d1 = 2 (h W1^T - v)``,
   ``d0 = gelu'(z) * (d1 W1)``;
2. the dual read (every token with its own post-update weights):
   ``Z0 = q W0^T + (C * q k^T) d0``, ``a = gelu(Z0)``, ``y = a W1^T + (C * a h^T) d1``
   (``read: chunk_start``: ``y = gelu(q W0^T) W1^T``);
3. chunk-end weights: ``W0' = W0 - (lr * d0)^T k``, ``W1' = W1 - (lr * d1)^T h``.

Design (the why):

- ``W0`` / ``W1`` (2 MB each at HOPE's 512 -> 1024, per sequence) do not fit on-chip, so the
  hidden dimension is split over programs: a grid of (sequence x head, hidden tiles of ``BH``);
  every reduction over ``Di`` / ``Do`` is a loop over blocks of ``BD`` columns inside a program.
  Two quantities sum over the hidden dimension: the prediction ``h W1^T`` (for ``d1``) and the
  read's ``a W1^T`` / ``a h^T``. Each tile writes its partial sum to a small buffer and a later
  launch adds the tiles in a fixed order: no atomics, deterministic results.
- Four launches per chunk, each a chain link the next one needs:
  ``_signals`` (grid rows x hidden tiles: ``z``, ``q W0^T``, partial predictions),
  ``_error`` (rows x column blocks: ``d1`` from the summed partials and ``v``),
  ``_update`` (rows x hidden tiles: ``d0``, ``q k^T``, ``Z0``, ``a``, the tile's partial read and
  ``a h^T``, and both weights' new tiles, which are local to the tile once ``d1`` is known),
  ``_read`` (rows x column blocks: ``y`` from the summed partials and ``(C * a h^T) d1``).
  ``W0`` is read twice per chunk, ``W1`` three times (``_update`` needs ``d1 W1`` before its
  partial read, a second pass), each written once; fusing the next chunk's ``_signals`` into
  this ``_update`` would save a pass (untried). The scratch buffers are ``O(n (Hd + tiles Do))``
  per row, small against the weights.
- Tokens are padded to ``BT``, the next power of two (``tl.arange``), with masked loads: a
  padded token has ``lr = 0``, ``k = q = v = 0``, so it moves nothing and is never stored.
  ``n`` at most 64 (the ``n x n`` products stay in registers); widths multiples of 16
  (``tl.dot``'s minimum tile; ``BH`` / ``BD`` the largest of 64 / 32 / 16 dividing them).
- Every product is ``tl.dot`` with ``input_precision="ieee"`` by default (fp32 means fp32); the
  executor passes ``tf32`` only where the user allowed TF32 matmuls (``dgd_triton.precision``).

The backward (``SGDMLPStep.backward``) is by default (``BACKWARD = "fused"``) ``sgd_mlp_bwd.py``'s
kernels: the same tiling, six launches per chunk (the first two this forward's ``_signals`` and
``_error``), the adjoints of ``sgd_mlp_bwd_ref`` (the hand derivation), at the forward's
``precision``. ``"manual"`` is that derivation in plain PyTorch (about 40 batched matmuls and
element-wise ops per chunk, through torch.compile where the level compiles its chunk steps);
``"recompute"`` re-runs the chunk through the closed form (``run_dual`` on that one chunk,
``grad: unroll``) and differentiates it with ``torch.autograd.grad``: the closed form's own
gradients, the oracle. All three are exact and recompute the forward's quantities from the saved
chunk-start weights and inputs: what stays alive between forward and backward is the chunk's
inputs and its start weights (as for the closed form, whose graph keeps the same weights), not
the chunk's intermediates. Training over several chunks goes through ``sgd_mlp_rev.py`` instead,
which saves the chunks' error signals (``signals=``) and rebuilds most start weights from them.

``sgd_mlp_step_fwd`` launches the forward of one chunk; ``sgd_mlp_step`` is its differentiable
entry; ``sgd_mlp`` runs whole chunks from a chunk boundary; ``sgd_mlp_reference`` is the same
contract computed by ``run_dual`` (the backward's recompute and the tests' reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from nestlearn.loops.common import TokenScale
from nestlearn.loops.triton.dgd_mlp import _gelu, _gelu_grad

MAX_CHUNK = 64
"""The longest chunk the kernels take (its ``n x n`` products are held in registers)."""


class SGDMLPOut(NamedTuple):
    y: Tensor
    """``[B, H, T, Do]`` outputs."""
    weights: tuple[Tensor, Tensor]
    """``(W0, W1)`` after the last chunk."""
    anchor: tuple[Tensor, Tensor]
    """``(W0, W1)`` at the last chunk's start (the carried ``anchor`` of ``MemoryState``)."""


@triton.jit
def _hidden_tile(H, n, BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    """A hidden-tile program's coordinates: row ``r = b H + h`` (64-bit: offsets pass 2^31 at long
    contexts), tile ``j``, the chunk's token range ``rt`` (``tm``: the real tokens), the tile's
    hidden units ``rh`` and a width block ``rd``."""
    r = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    rt = tl.arange(0, BT)
    return r, j, r // H, r % H, rt, j * BH + tl.arange(0, BH), tl.arange(0, BD), rt < n


@triton.jit
def _column_block(H, n, BT: tl.constexpr, BD: tl.constexpr, W: tl.constexpr):
    """A column-block program's coordinates: row ``r``, its ``b`` / ``h``, the tokens ``rt`` (``tm``
    the real ones), the block's columns ``cols`` of a width-``W`` row and their scratch offsets."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    rt = tl.arange(0, BT)
    cols = c * BD + tl.arange(0, BD)
    return r, r // H, r % H, rt, cols, rt < n, rt[:, None] * W + cols[None, :]


@triton.jit
def _tile_sum(ptr, r, NT, off, BT: tl.constexpr, BD: tl.constexpr, W: tl.constexpr):
    """``sum_j`` of the hidden tiles' ``[BT, W]`` partials at ``off``, in a fixed order
    (deterministic)."""
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for j in range(NT):
        acc += tl.load(ptr + (r * NT + j) * BT * W + off)
    return acc


@triton.jit
def _masked_scores(sp_ptr, lr_ptr, r, b, h, rt, tm, slr_b, slr_h, slr_t, NT, BT: tl.constexpr):
    """``C * sum_j S_j``: the tiles' ``[BT, BT]`` score partials summed, times the causal rate mask
    ``C[t, s] = -lr_s`` for ``s <= t`` (the in-chunk read of the dual form)."""
    s = tl.zeros([BT, BT], dtype=tl.float32)
    for j in range(NT):
        s += tl.load(sp_ptr + ((r * NT + j) * BT + rt[:, None]) * BT + rt[None, :])
    eta = tl.load(lr_ptr + b * slr_b + h * slr_h + rt * slr_t, mask=tm, other=0.0)
    return tl.where(rt[:, None] >= rt[None, :], -eta[None, :], 0.0) * s


@triton.jit
def _signals(
    q_ptr, k_ptr, w0_ptr, w1_ptr, z_ptr, zq_ptr, p_ptr,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
    sw0_b, sw0_h, sw0_o, sw0_i, sw1_b, sw1_h, sw1_o, sw1_i,
    H, n, HD, NT,
    BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, DI: tl.constexpr, DO: tl.constexpr,
    PREC: tl.constexpr,
):
    """Hidden tile ``j`` of row ``r``: ``z = k W0_j^T``, ``zq = q W0_j^T`` (to scratch) and the
    tile's part of the prediction ``gelu(z) W1[:, j]^T`` (to ``p``, summed by ``_error``)."""
    r, j, b, h, rt, rh, rd, tm = _hidden_tile(H, n, BT, BH, BD)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    w0_base = w0_ptr + b * sw0_b + h * sw0_h
    w1_base = w1_ptr + b * sw1_b + h * sw1_h
    z = tl.zeros([BT, BH], dtype=tl.float32)
    zq = tl.zeros([BT, BH], dtype=tl.float32)
    for c0 in range(0, DI, BD):
        cols = c0 + rd
        kx = tl.load(k_base + rt[:, None] * sk_t + cols[None, :], mask=tm[:, None], other=0.0)
        qx = tl.load(q_base + rt[:, None] * sq_t + cols[None, :], mask=tm[:, None], other=0.0)
        w0t = tl.load(w0_base + rh[None, :] * sw0_o + cols[:, None] * sw0_i)  # W0_j^T block [BD, BH]
        z += tl.dot(kx, w0t, input_precision=PREC)
        zq += tl.dot(qx, w0t, input_precision=PREC)
    s_off = r * BT * HD + rt[:, None] * HD + rh[None, :]
    tl.store(z_ptr + s_off, z)
    tl.store(zq_ptr + s_off, zq)
    hh = _gelu(z)
    p_base = p_ptr + (r * NT + j) * BT * DO
    for c0 in range(0, DO, BD):
        cols = c0 + rd
        w1t = tl.load(w1_base + cols[None, :] * sw1_o + rh[:, None] * sw1_i)  # W1[blk, j]^T [BH, BD]
        tl.store(p_base + rt[:, None] * DO + cols[None, :], tl.dot(hh, w1t, input_precision=PREC))


@triton.jit
def _error(
    p_ptr, v_ptr, d1_ptr, sv_b, sv_h, sv_t, H, n, NT,
    BT: tl.constexpr, BD: tl.constexpr, DO: tl.constexpr,
):
    """Column block ``c`` of row ``r``: ``d1 = 2 (sum_j p_j - v)`` (0 on padded tokens)."""
    r, b, h, rt, cols, tm, off = _column_block(H, n, BT, BD, DO)
    pred = _tile_sum(p_ptr, r, NT, off, BT, BD, DO)
    vx = tl.load(v_ptr + b * sv_b + h * sv_h + rt[:, None] * sv_t + cols[None, :], mask=tm[:, None], other=0.0)
    d1 = tl.where(tm[:, None], 2.0 * (pred - vx), 0.0)
    tl.store(d1_ptr + r * BT * DO + off, d1)


@triton.jit
def _update(
    q_ptr, k_ptr, lr_ptr, w0_ptr, w1_ptr, z_ptr, zq_ptr, d1_ptr, yp_ptr, sp_ptr, w0n_ptr, w1n_ptr, d0_ptr,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, slr_b, slr_h, slr_t,
    sw0_b, sw0_h, sw0_o, sw0_i, sw1_b, sw1_h, sw1_o, sw1_i,
    H, n, HD, NT,
    BT: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, DI: tl.constexpr, DO: tl.constexpr,
    PREC: tl.constexpr, READ_START: tl.constexpr, STORE_D0: tl.constexpr,
):
    """Hidden tile ``j`` of row ``r`` once ``d0`` is known: ``d0`` (to ``d0_ptr`` with
    ``STORE_D0``: the backward rebuilds the start weights from it), the layer-0 dual read and its
    ``gelu`` ``a``, the tile's parts of ``a W1^T`` and ``a h^T`` (to ``yp`` / ``sp``, summed by
    ``_read``), and the chunk-end tiles of both weights (each a function of this tile alone)."""
    r, j, b, h, rt, rh, rd, tm = _hidden_tile(H, n, BT, BH, BD)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    w0_base = w0_ptr + b * sw0_b + h * sw0_h
    w1_base = w1_ptr + b * sw1_b + h * sw1_h
    d1_base = d1_ptr + r * BT * DO
    eta = tl.load(lr_ptr + b * slr_b + h * slr_h + rt * slr_t, mask=tm, other=0.0)
    s_off = r * BT * HD + rt[:, None] * HD + rh[None, :]
    z = tl.load(z_ptr + s_off)
    zq = tl.load(zq_ptr + s_off)
    hh = _gelu(z)

    # d0 = gelu'(z) * (d1 W1[:, j])
    e = tl.zeros([BT, BH], dtype=tl.float32)
    for c0 in range(0, DO, BD):
        cols = c0 + rd
        w1 = tl.load(w1_base + cols[:, None] * sw1_o + rh[None, :] * sw1_i)  # [BD, BH]
        d1 = tl.load(d1_base + rt[:, None] * DO + cols[None, :])
        e += tl.dot(d1, w1, input_precision=PREC)
    d0 = _gelu_grad(z) * e
    if STORE_D0:
        tl.store(d0_ptr + s_off, d0)

    if READ_START:  # every token reads the chunk-start weights
        a = _gelu(zq)
    else:
        qk = tl.zeros([BT, BT], dtype=tl.float32)
        for c0 in range(0, DI, BD):
            cols = c0 + rd
            kx = tl.load(k_base + rt[:, None] * sk_t + cols[None, :], mask=tm[:, None], other=0.0)
            qx = tl.load(q_base + rt[:, None] * sq_t + cols[None, :], mask=tm[:, None], other=0.0)
            qk += tl.dot(qx, tl.trans(kx), input_precision=PREC)
        cmat = tl.where(rt[:, None] >= rt[None, :], -eta[None, :], 0.0)  # C[t, s] = -lr_s, s <= t
        a = _gelu(zq + tl.dot(cmat * qk, d0, input_precision=PREC))
        tl.store(sp_ptr + ((r * NT + j) * BT + rt[:, None]) * BT + rt[None, :],
                 tl.dot(a, tl.trans(hh), input_precision=PREC))

    # layer 1, column block by block: the partial read, then W1's new tile
    yp_base = yp_ptr + (r * NT + j) * BT * DO
    for c0 in range(0, DO, BD):
        cols = c0 + rd
        w_off = cols[:, None] * sw1_o + rh[None, :] * sw1_i
        w1 = tl.load(w1_base + w_off)  # [BD, BH]
        tl.store(yp_base + rt[:, None] * DO + cols[None, :], tl.dot(a, tl.trans(w1), input_precision=PREC))
        d1 = tl.load(d1_base + rt[:, None] * DO + cols[None, :])
        step = tl.dot(tl.trans(d1 * eta[:, None]), hh, input_precision=PREC)  # sum_s lr_s d1_s h_s^T
        tl.store(w1n_ptr + r * DO * HD + cols[:, None] * HD + rh[None, :], w1 - step)
    # layer 0: W0's new tile, block by block over its input columns
    d0s = d0 * eta[:, None]
    for c0 in range(0, DI, BD):
        cols = c0 + rd
        w0 = tl.load(w0_base + rh[:, None] * sw0_o + cols[None, :] * sw0_i)  # [BH, BD]
        kx = tl.load(k_base + rt[:, None] * sk_t + cols[None, :], mask=tm[:, None], other=0.0)
        step = tl.dot(tl.trans(d0s), kx, input_precision=PREC)
        tl.store(w0n_ptr + r * HD * DI + rh[:, None] * DI + cols[None, :], w0 - step)


@triton.jit
def _read(
    yp_ptr, sp_ptr, d1_ptr, lr_ptr, y_ptr, slr_b, slr_h, slr_t, H, n, NT,
    BT: tl.constexpr, BD: tl.constexpr, DO: tl.constexpr, READ_START: tl.constexpr, PREC: tl.constexpr,
):
    """Column block ``c`` of row ``r``: ``y = sum_j yp_j + (C * sum_j sp_j) d1``."""
    r, b, h, rt, cols, tm, off = _column_block(H, n, BT, BD, DO)
    y = _tile_sum(yp_ptr, r, NT, off, BT, BD, DO)
    if not READ_START:
        cs = _masked_scores(sp_ptr, lr_ptr, r, b, h, rt, tm, slr_b, slr_h, slr_t, NT, BT)
        y += tl.dot(cs, tl.load(d1_ptr + r * BT * DO + off), input_precision=PREC)
    tl.store(y_ptr + r * n * DO + rt[:, None] * DO + cols[None, :], y, mask=tm[:, None])


def check_signals(who: str, signals: tuple[Tensor, ...], want: list[tuple[int, ...]]) -> tuple[Tensor, ...]:
    """``signals`` if they are contiguous with the shapes ``want`` (the kernels index them as
    such), else a ``ValueError`` naming ``who``."""
    if [tuple(x.shape) for x in signals] != want or not all(x.is_contiguous() for x in signals):
        raise ValueError(f"{who}: signals must be contiguous {want}")
    return signals


def signal_tokens(n: int) -> int:
    """The token rows of a chunk of ``n`` in the kernels' buffers: ``n`` padded to a power of two
    (at least 16, ``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(n))


def block(width: int) -> int:
    """The largest of 64 / 32 / 16 dividing ``width`` (0: none does)."""
    return next((bs for bs in (64, 32, 16) if width % bs == 0), 0)


def _rows(x: Tensor) -> Tensor:
    """``x`` with a contiguous last dim (a copy only where it has none)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def sgd_mlp_step_fwd(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, w0: Tensor, w1: Tensor, *,
    precision: str = "ieee", read_start: bool = False, block_h: int | None = None, block_d: int | None = None,
    num_warps: int = 4, signals: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk (``n = T <= 64`` tokens) from its start weights: ``(y, W0', W1')``.

    ``q, k`` are ``[B, H, n, Di]``, ``v`` ``[B, H, n, Do]``, ``lr`` ``[B, H, n]`` (any strides;
    expanded views are fine), ``w0`` ``[B, H, Hd, Di]``, ``w1`` ``[B, H, Do, Hd]`` (any strides:
    a stride-0 batch, as ``init_state`` shares the initial weights, is read in place). fp32;
    widths multiples of 16. ``block_h`` / ``block_d``: the hidden tile and column block (defaults
    ``block``); outputs are contiguous. ``signals``: contiguous ``z, zq [B H, BT, Hd]``,
    ``d1 [B H, BT, Do]`` and ``d0 [B H, BT, Hd]`` (``BT = signal_tokens(n)``) that receive the
    chunk's signals (``zq = q W0^T``; padded tokens' rows zero in ``d0`` / ``d1``), as
    ``sgd_mlp_rev`` keeps them for its backward."""
    bsz, heads, n, di = q.shape
    hd, do = w0.shape[-2], w1.shape[-2]
    bh, bd = block_h or block(hd), block_d or block(math.gcd(di, do))
    if not 0 < n <= MAX_CHUNK:
        raise ValueError(f"sgd_mlp_step_fwd: a chunk of {n} tokens; the kernels take 1..{MAX_CHUNK}")
    if min(bh, bd) < 16 or hd % bh or di % bd or do % bd:
        raise ValueError(f"sgd_mlp_step_fwd: widths {di} -> {hd} -> {do} must be multiples of the tiles ({bh}, {bd}) >= 16")
    tensors = (q, k, v, lr, w0, w1)
    if any(x.dtype != torch.float32 for x in tensors):
        raise TypeError("sgd_mlp_step_fwd: fp32 tensors only (the inner loop runs in fp32)")
    q, k, v = _rows(q), _rows(k), _rows(v)
    bt = signal_tokens(n)
    nt = hd // bh
    rows = bsz * heads
    def f32(*shape: int) -> Tensor:
        return torch.empty(*shape, device=q.device, dtype=torch.float32)

    if signals is None:
        z, zq, d1, d0 = f32(rows, bt, hd), f32(rows, bt, hd), f32(rows, bt, do), None
    else:
        z, zq, d1, d0 = check_signals("sgd_mlp_step_fwd", signals, [(rows, bt, hd), (rows, bt, hd), (rows, bt, do),
                                                                  (rows, bt, hd)])
    parts = f32(rows, nt, bt, do)  # the tiles' partial predictions, then their partial reads
    sp = f32(rows, nt, bt, bt)
    y = f32(bsz, heads, n, do)
    w0n = f32(bsz, heads, hd, di)
    w1n = f32(bsz, heads, do, hd)
    qs, ks, vs = (x.stride()[:3] for x in (q, k, v))
    ls = lr.stride()
    ws = (*w0.stride(), *w1.stride())
    common = {"BT": bt, "BD": bd, "DO": do, "num_warps": num_warps}
    _signals[(rows, nt)](q, k, w0, w1, z, zq, parts, *qs, *ks, *ws, heads, n, hd, nt,
                         BH=bh, DI=di, PREC=precision, **common)
    _error[(rows, do // bd)](parts, v, d1, *vs, heads, n, nt, **common)
    _update[(rows, nt)](q, k, lr, w0, w1, z, zq, d1, parts, sp, w0n, w1n, z if d0 is None else d0,
                        *qs, *ks, *ls, *ws, heads, n, hd, nt,
                        BH=bh, DI=di, PREC=precision, READ_START=read_start, STORE_D0=d0 is not None, **common)
    _read[(rows, do // bd)](parts, sp, d1, lr, y, *ls, heads, n, nt, READ_START=read_start, PREC=precision,
                            **common)
    return y, w0n, w1n


BACKWARDS = ("fused", "manual", "recompute")
BACKWARD = "fused"
"""``SGDMLPStep``'s default backward: ``"fused"`` (``sgd_mlp_bwd``'s kernels), ``"manual"``
(``sgd_mlp_bwd_ref`` in PyTorch) or ``"recompute"`` (``run_dual``)."""


def sgd_mlp_step(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, w0: Tensor, w1: Tensor, *,
    precision: str = "ieee", read_start: bool = False, compiled: bool = False, backward: str = BACKWARD,
) -> tuple[Tensor, Tensor, Tensor]:
    """``sgd_mlp_step_fwd``, differentiable: under grad mode with an input that requires grad it
    runs as ``SGDMLPStep`` with the ``backward`` named (every output differentiates to every
    input, as ``run_dual`` with ``grad: unroll`` would); elsewhere it is the forward alone."""
    if backward not in BACKWARDS:
        raise ValueError(f"sgd_mlp_step: backward={backward!r}, not one of {BACKWARDS}")
    ins = (q, k, v, lr, w0, w1)
    if torch.is_grad_enabled() and any(x.requires_grad for x in ins):
        y, w0n, w1n = SGDMLPStep.apply(*ins, precision, read_start, compiled, backward)
        return y, w0n, w1n
    return sgd_mlp_step_fwd(*ins, precision=precision, read_start=read_start)


class SGDMLPStep(torch.autograd.Function):
    """The kernels' forward of one chunk; the backward from the saved inputs and start weights:
    the fused kernels (``"fused"``, ``sgd_mlp_bwd``, at the forward's ``precision``), the
    hand-derived adjoints in PyTorch (``"manual"``, ``sgd_mlp_bwd_ref``) or the chunk recomputed
    through ``run_dual`` (``grad: unroll``) and back-propagated with ``torch.autograd.grad``
    (``"recompute"``); the last two through torch.compile with ``compiled``."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, lr: Tensor, w0: Tensor, w1: Tensor,
                precision: str, read_start: bool, compiled: bool, backward: str) -> tuple[Tensor, Tensor, Tensor]:
        ctx.save_for_backward(q, k, v, lr, w0, w1)
        ctx.cfg = (precision, read_start, compiled, backward)
        ctx.set_materialize_grads(False)  # None for outputs the loss does not use
        return sgd_mlp_step_fwd(q, k, v, lr, w0, w1, precision=precision, read_start=read_start)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *cots: Tensor | None) -> tuple[Tensor | None, ...]:
        ins = ctx.saved_tensors
        precision, read_start, compiled, backward = ctx.cfg
        needs = ctx.needs_input_grad[:6]
        if backward == "fused":
            from nestlearn.loops.triton.sgd_mlp_bwd import LAUNCH, sgd_mlp_step_bwd

            fused = sgd_mlp_step_bwd(*ins, *cots, precision=precision, read_start=read_start,
                                     block_h=LAUNCH.get("block_h"), block_d=LAUNCH.get("block_d"),
                                     num_warps=LAUNCH.get("num_warps", 4))
            return (*[g if need else None for g, need in zip(fused, needs)], None, None, None, None)
        if backward == "manual":
            from nestlearn.loops.chunks import compiled as compile_fn
            from nestlearn.loops.triton.sgd_mlp_bwd_ref import sgd_mlp_step_bwd_reference

            # chunks.compiled is typed for chunk steps; any function goes through it
            fn = cast(Callable[..., tuple[Tensor, ...]],
                      compile_fn(sgd_mlp_step_bwd_reference) if compiled else sgd_mlp_step_bwd_reference)  # type: ignore[arg-type]
            gs = fn(*ins, *cots, read_start=read_start)
            kept: list[Tensor | None] = [g if need else None for g, need in zip(gs, needs)]
            return (*kept, None, None, None, None)
        with torch.enable_grad():
            xs = [x.detach().requires_grad_(need) for x, need in zip(ins, needs)]
            outs = sgd_mlp_reference(*xs, chunk=xs[0].shape[2], read_start=read_start, grad="unroll",
                                     compiled=compiled)
            pairs = [(o, c) for o, c in zip((outs.y, *outs.weights), cots) if c is not None and o.requires_grad]
            wrt = [x for x in xs if x.requires_grad]
            got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [c for _, c in pairs], allow_unused=True)
                       if pairs and wrt else [None] * len(wrt))
        grads = [next(got) if x.requires_grad else None for x in xs]
        return (*grads, None, None, None, None)


def sgd_mlp(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, w0: Tensor, w1: Tensor, *, chunk: int,
    precision: str = "ieee", read_start: bool = False, compiled: bool = False, backward: str = BACKWARD,
) -> SGDMLPOut:
    """Whole chunks of ``chunk`` tokens from a state at a chunk boundary, one ``sgd_mlp_step``
    each (differentiable where a gradient is wanted): the shapes of ``sgd_mlp_step_fwd`` over
    ``T`` tokens, ``T`` a multiple of ``chunk``."""
    t = q.shape[2]
    if t % chunk or t == 0:
        raise ValueError(f"sgd_mlp: T={t} must be a positive number of whole chunks of {chunk}")
    ys = []
    anchor = (w0, w1)
    for t0 in range(0, t, chunk):
        sl = slice(t0, t0 + chunk)
        anchor = (w0, w1)
        y, w0, w1 = sgd_mlp_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], lr[:, :, sl], w0, w1,
                                 precision=precision, read_start=read_start, compiled=compiled, backward=backward)
        ys.append(y)
    return SGDMLPOut(ys[0] if len(ys) == 1 else torch.cat(ys, 2), (w0, w1), anchor)


def sgd_mlp_reference(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, w0: Tensor, w1: Tensor, *, chunk: int,
    read_start: bool = False, grad: str = "stop", compiled: bool = False, scale: TokenScale = TokenScale(),
) -> SGDMLPOut:
    """``sgd_mlp``'s contract computed by the PyTorch closed form (``loops/dual.py``), with any
    trailing partial chunk; ``grad="unroll"`` makes it differentiable (the backward's recompute);
    ``scale``: the level's per-token clip and gain cap (``sgd_mlp_rev.sgd_mlp_chunks(scale=)``'s
    reference)."""
    from nestlearn import objectives, rules
    from nestlearn.loops.common import GradMode, MemoryProblem, MemoryState
    from nestlearn.loops.dual import run_dual
    from nestlearn.memories import MLPMemory

    heads, di, hd, do = q.shape[1], q.shape[3], w0.shape[-2], w1.shape[-2]
    arch = MLPMemory(di, do, heads, expand=hd / di, depth=2, act="gelu", residual=False, bias=False)
    pb = MemoryProblem(arch, rules.sgd(0.0), objectives.l2, q, k, v, {"lr": lr, "decay": 0.0}, chunk,
                       GradMode(grad), read_start=read_start, compiled=compiled,
                       clip=scale.clip, max_gain=scale.max_gain, gain_steps=scale.steps)
    params = {"W0": w0, "W1": w1}
    y, st = run_dual(pb, MemoryState(params=params, opt={}, anchor=params, offset=0, chunks=0))
    p, a = st["params"], st["anchor"]
    return SGDMLPOut(y, (p["W0"], p["W1"]), (a["W0"], a["W1"]))
