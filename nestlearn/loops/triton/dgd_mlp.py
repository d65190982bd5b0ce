"""DGD's chunk recurrence on HOPE's 2-layer MLP memory, forward, as one persistent Triton program
per (batch, head); its backward (``DGDMLPFunction``) is a second such program walking the chunks
in reverse (``dgd_mlp_bwd.py``), or recomputes groups of chunks in PyTorch.

The memory is HOPE's self-modifying one (``models/hope.yaml``): ``M(x) = x + W1 gelu(W0 x)``
with square ``D x D`` weights (``expand: 1``), no biases, the ``l2`` objective, an optional
per-token gradient clip, and DGD with per-token ``lr`` / ``decay`` / ``beta``. The math is
``loops/dgd_dual.py``'s (its module docstring), which is the reference: per chunk of ``n``
tokens, at the chunk-start weights,

1. error signals: ``z0 = W0 k``, ``h = gelu(z0)``, ``d1 = 2 (k + W1 h - v)``,
   ``d0 = gelu'(z0) * W1^T d1`` (each token's pair scaled by the clip factor); the layer
   inputs are ``x0 = k``, ``x1 = h`` and ``u = x / |x|``;
2. per weight ``W`` (momentum ``M``): ``e_t = W_{t-1} u_t`` from ``(I + L) E = R`` with
   ``L = Keta_p * (U U^T)`` (strictly lower), ``R = gam_p * (U W^T) + c_p * (U M^T) - (G_p * U X^T) D``;
3. the dual read at every token ``t`` (after its update) of the read input ``A`` (``q`` for
   ``W0``, ``gelu`` of that read for ``W1``): ``Z = gam * (A W^T) + c * (A M^T) - (Keta * A U^T) E - (G * A X^T) D``;
   ``y = q + Z1``;
4. the chunk-end state: ``W' = gam_e W + c_e M - E^T diag(keta_e) U - D^T diag(g_e) X``,
   ``M' = b_e M + D^T diag(B_e) X``.

Design (the why):

- One program per (batch, head) loops over all chunks: the four ``D x D`` fp32 matrices (W0, W1
  and their momenta; 64 KB at HOPE's D = 64) are loop-carried values, read from and written
  to memory once per call, and one launch replaces the hundreds of small dependent kernels of
  the PyTorch chunk step. (With the dots' operands they exceed the register file: ptxas spills
  a part to L1-cached local memory; ``launch_options`` and ``bench.triton_dgd --ptxas``.)
- The gate coefficients (``segsum`` of log-gates: ``K``, ``B``, ``G = (K diag(eta)) B``, their
  row-shifted ``t - 1`` versions, the chunk-end rows) are computed in-kernel from the per-token
  gates: ``n x n`` work, no extra launches, no ``[chunks, n, n]`` tensors in memory. The
  shifted rows come from the exclusive cumulative sum, so nothing is shifted in registers.
- The unit-lower-triangular solve uses ``(I + L)^-1 = (I - L)(I + L^2)(I + L^4)...`` (exact
  for a nilpotent ``L``: ``L^n = 0``), i.e. ``log2(n)`` squarings, all ``tl.dot``; then ``E`` is
  one more product. Forward substitution would be ``n`` dependent row steps.
- Every product is ``tl.dot`` with ``input_precision="ieee"`` by default: fp32 means fp32.
  ``tf32`` (rounds to ~1e-3) runs where the user allowed TF32 matmuls (``dgd_triton.precision``);
  ``tf32x3`` (tensor cores, near fp32) is a candidate default once timed and checked on a GPU.
- ``n`` (the chunk) and ``D`` are powers of two and at least 16 (``tl.dot``'s minimum on a
  GPU); ``T`` is a whole number of chunks and the state starts at a chunk boundary (the
  executor glue runs any partial chunk on the PyTorch path).

``dgd_mlp_fwd`` launches the kernel; ``dgd_mlp_fwd_reference`` is the same contract computed
by ``loops/dgd_dual.py`` (the tests compare the two). ``dgd_mlp`` is the differentiable entry:
under grad it runs ``DGDMLPFunction``, whose forward kernel also saves the state at every
``save_every``-th chunk start (``SAVE``) and whose backward is the fused Triton kernel
(``dgd_mlp_bwd.py``, from a checkpoint at every chunk; its hand-derived math in plain PyTorch,
``dgd_mlp_bwd_ref.py``, is the spec) or, with ``backward="recompute"`` or where the device lacks
the resources, re-runs each group of chunks from its checkpoint through ``dgd_dual`` and
``torch.autograd.grad``, last group first (that class docstring).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable


class DGDMLPOut(NamedTuple):
    y: Tensor
    """``[B, H, T, D]`` outputs."""
    weights: tuple[Tensor, Tensor]
    """``(W0, W1)`` after the last chunk, ``[B, H, D, D]``."""
    momenta: tuple[Tensor, Tensor]
    """DGD's momentum of each weight after the last chunk."""
    anchor: tuple[Tensor, Tensor]
    """``(W0, W1)`` at the last chunk's start (the carried ``anchor`` of ``MemoryState``)."""
    saved: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
    """With ``save_every``: ``(W0, W1, M0, M1)`` at the start of chunks ``0, e, 2e, ...``, each
    ``[B, H, S, D, D]`` (the backward's checkpoints)."""


@triton.jit
def _gelu(z):
    # torch's default (erf) gelu
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _gelu_grad(z):
    # d gelu / dz = Phi(z) + z phi(z), as aten.gelu_backward
    return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)


@triton.jit
def _normalize(x):
    """``F.normalize(x, dim=-1)``: ``x / max(|x|, 1e-12)`` per row."""
    return x / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-12)[:, None]


@triton.jit
def _tril_inverse(L, eye, LOG_BT: tl.constexpr, PREC: tl.constexpr):
    """``(I + L)^-1`` for a strictly lower ``n x n`` ``L`` (``n = 2^LOG_BT``): the product
    ``(I - L)(I + L^2)(I + L^4)...(I + L^(n/2))`` is the whole series ``sum_k (-L)^k``."""
    P = eye - L
    Lp = L
    for _ in tl.static_range(LOG_BT - 1):
        Lp = tl.dot(Lp, Lp, input_precision=PREC)
        P = P + tl.dot(P, Lp, input_precision=PREC)
    return P


@triton.jit
def _rhs(W, M, x, u, d, gam_p, c_p, G_p, PREC: tl.constexpr):
    """The solve's right-hand side ``R = gam_p * (U W^T) + c_p * (U M^T) - (G_p * U X^T) D``
    (step 2 of the module docstring)."""
    return (gam_p[:, None] * tl.dot(u, tl.trans(W), input_precision=PREC)
            + c_p[:, None] * tl.dot(u, tl.trans(M), input_precision=PREC)
            - tl.dot(G_p * tl.dot(u, tl.trans(x), input_precision=PREC), d, input_precision=PREC))


@triton.jit
def _solve(W, M, x, u, d, gam_p, c_p, Keta_p, G_p, eye, LOG_BT: tl.constexpr, PREC: tl.constexpr):
    """One weight's in-chunk solve (step 2): ``(E, P)`` with ``E[t] = W_{t-1} u_t``, ``E = P R``
    and ``P = (I + L)^-1`` (the backward keeps ``P`` for ``dR``)."""
    R = _rhs(W, M, x, u, d, gam_p, c_p, G_p, PREC)
    P = _tril_inverse(Keta_p * tl.dot(u, tl.trans(u), input_precision=PREC), eye, LOG_BT, PREC)
    return tl.dot(P, R, input_precision=PREC), P


@triton.jit
def _layer(W, M, x, u, d, a, gam, c, gam_p, c_p, Keta, Keta_p, G, G_p, eye,
           LOG_BT: tl.constexpr, PREC: tl.constexpr):
    """One weight's in-chunk solve and dual read (steps 2 and 3 of the module docstring):
    ``(Z, E)`` with ``Z[t] = W_t a_t`` and ``E[t] = W_{t-1} u_t``."""
    Wt = tl.trans(W)
    Mt = tl.trans(M)
    ut = tl.trans(u)
    xt = tl.trans(x)
    E, _P = _solve(W, M, x, u, d, gam_p, c_p, Keta_p, G_p, eye, LOG_BT, PREC)
    Z = (gam[:, None] * tl.dot(a, Wt, input_precision=PREC)
         + c[:, None] * tl.dot(a, Mt, input_precision=PREC)
         - tl.dot(Keta * tl.dot(a, ut, input_precision=PREC), E, input_precision=PREC)
         - tl.dot(G * tl.dot(a, xt, input_precision=PREC), d, input_precision=PREC))
    return Z, E


@triton.jit
def _chunk_end(W, M, x, u, d, E, gam_e, c_e, b_e, keta_e, g_e, B_e, PREC: tl.constexpr):
    """Step 4: one weight's and its momentum's state after the chunk."""
    Wn = (gam_e * W + c_e * M
          - tl.dot(tl.trans(E * keta_e[:, None]), u, input_precision=PREC)
          - tl.dot(tl.trans(d * g_e[:, None]), x, input_precision=PREC))
    Mn = b_e * M + tl.dot(tl.trans(d * B_e[:, None]), x, input_precision=PREC)
    return Wn, Mn


@triton.jit
def _coefficients(log_lam, log_beta, eta, le, lt, PREC: tl.constexpr):
    """A chunk's gate coefficients (``dgd_dual.dgd_coefficients``), shared by the forward and the
    backward kernels: inclusive / exclusive log-cumsums by masked row sums, the decay products
    ``K`` (``Kp``: exclusive), ``Keta = K diag(lr)``, the momentum products ``Bm``, ``G = Keta Bm``
    and the read coefficients ``gam`` / ``c`` (``_p``: of the token's own pre-update state)."""
    LL = tl.sum(tl.where(le, log_lam[None, :], 0.0), 1)
    LLx = tl.sum(tl.where(lt, log_lam[None, :], 0.0), 1)
    LB = tl.sum(tl.where(le, log_beta[None, :], 0.0), 1)
    K = tl.exp(tl.where(le, LL[:, None] - LL[None, :], float("-inf")))
    Kp = tl.exp(tl.where(lt, LLx[:, None] - LL[None, :], float("-inf")))
    Keta = K * eta[None, :]
    Keta_p = Kp * eta[None, :]
    Bm = tl.exp(tl.where(le, LB[:, None] - LB[None, :], float("-inf")))
    bvec = tl.exp(LB)
    gam = tl.exp(LL)
    gam_p = tl.exp(LLx)
    G = tl.dot(Keta, Bm, input_precision=PREC)
    G_p = tl.dot(Keta_p, Bm, input_precision=PREC)
    c = -tl.sum(Keta * bvec[None, :], 1)
    c_p = -tl.sum(Keta_p * bvec[None, :], 1)
    return LL, LB, K, Kp, Keta, Keta_p, Bm, bvec, gam, gam_p, G, G_p, c, c_p


@triton.jit
def _end_coefficients(log_lam, log_beta, eta, LL, LB, Bm, bvec):
    """The chunk-end rows of the coefficients (step 4): ``keta_e`` (Keta's last row), ``g_e``
    (G's), ``B_e`` (B's), and the scalars ``gam_e``, ``b_e``, ``c_e``."""
    LL_e = tl.sum(log_lam, 0)
    LB_e = tl.sum(log_beta, 0)
    keta_e = tl.exp(LL_e - LL) * eta
    g_e = tl.sum(keta_e[:, None] * Bm, 0)
    return keta_e, g_e, tl.exp(LB_e - LB), tl.exp(LL_e), tl.exp(LB_e), -tl.sum(keta_e * bvec, 0)


@triton.jit
def _dgd_mlp_fwd_kernel(
    q_ptr, k_ptr, v_ptr, y_ptr,          # [B, H, T, D], last dim contiguous (y: contiguous)
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    lr_ptr, decay_ptr, beta_ptr,         # [B, H, T], any strides (0 for broadcast gates)
    slr_b, slr_h, slr_t, sdc_b, sdc_h, sdc_t, sbt_b, sbt_h, sbt_t,
    w0_ptr, w1_ptr, m0_ptr, m1_ptr,      # [B, H, D, D], each D x D block row-major
    sw0_b, sw0_h, sw1_b, sw1_h, sm0_b, sm0_h, sm1_b, sm1_h,
    w0_out, w1_out, m0_out, m1_out, a0_out, a1_out,  # [B, H, D, D] contiguous
    s0_out, s1_out, sm0_out, sm1_out,    # [B, H, S, D, D] contiguous: the saved chunk-start states
    H, n_chunks, clip, save_every, n_saved,
    BT: tl.constexpr, LOG_BT: tl.constexpr, D: tl.constexpr, CLIP: tl.constexpr, PREC: tl.constexpr,
    SAVE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B*H*T*D passes 2^31 at long contexts
    b = pid // H
    h = pid % H
    rt = tl.arange(0, BT)
    rd = tl.arange(0, D)
    w_off = rd[:, None] * D + rd[None, :]
    out_off = pid * D * D + w_off

    # the fast state, fp32, held on-chip for the whole sequence
    W0 = tl.load(w0_ptr + b * sw0_b + h * sw0_h + w_off).to(tl.float32)
    W1 = tl.load(w1_ptr + b * sw1_b + h * sw1_h + w_off).to(tl.float32)
    M0 = tl.load(m0_ptr + b * sm0_b + h * sm0_h + w_off).to(tl.float32)
    M1 = tl.load(m1_ptr + b * sm1_b + h * sm1_h + w_off).to(tl.float32)

    le = rt[:, None] >= rt[None, :]  # [t, s]: s <= t
    lt = rt[:, None] > rt[None, :]   # s < t
    eye = tl.where(rt[:, None] == rt[None, :], 1.0, 0.0)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    y_base = y_ptr + pid * n_chunks * BT * D
    lr_base = lr_ptr + b * slr_b + h * slr_h
    dc_base = decay_ptr + b * sdc_b + h * sdc_h
    bt_base = beta_ptr + b * sbt_b + h * sbt_h

    for ci in range(n_chunks):
        if SAVE:  # the backward's checkpoints: the state at the start of every save_every-th chunk
            if ci % save_every == 0:
                s_off = (pid * n_saved + ci // save_every) * D * D + w_off
                tl.store(s0_out + s_off, W0)
                tl.store(s1_out + s_off, W1)
                tl.store(sm0_out + s_off, M0)
                tl.store(sm1_out + s_off, M1)
        tok = ci * BT + rt
        q = tl.load(q_base + tok[:, None] * sq_t + rd[None, :]).to(tl.float32)
        k = tl.load(k_base + tok[:, None] * sk_t + rd[None, :]).to(tl.float32)
        v = tl.load(v_base + tok[:, None] * sv_t + rd[None, :]).to(tl.float32)
        eta = tl.load(lr_base + tok * slr_t).to(tl.float32)
        log_lam = tl.log(tl.maximum(1.0 - tl.load(dc_base + tok * sdc_t).to(tl.float32), 1e-30))
        log_beta = tl.log(tl.maximum(tl.load(bt_base + tok * sbt_t).to(tl.float32), 1e-30))

        # gate coefficients (dgd_dual.dgd_coefficients): inclusive / exclusive log-cumsums by
        # masked row sums, products by exp of differences, zero above the diagonal
        LL, LB, _K, _Kp, Keta, Keta_p, Bm, bvec, gam, gam_p, G, G_p, c, c_p = _coefficients(
            log_lam, log_beta, eta, le, lt, PREC)
        keta_e, g_e, B_e, gam_e, b_e, c_e = _end_coefficients(log_lam, log_beta, eta, LL, LB, Bm, bvec)

        # 1. error signals and layer inputs at the chunk-start weights (MLPMemory.error_signals)
        z0 = tl.dot(k, tl.trans(W0), input_precision=PREC)
        x1 = _gelu(z0)
        d1 = 2.0 * (k + tl.dot(x1, tl.trans(W1), input_precision=PREC) - v)
        d0 = tl.dot(d1, W1, input_precision=PREC) * _gelu_grad(z0)
        if CLIP:  # chunks.chunk_signals: each token's whole gradient to norm <= clip
            sq = tl.sum(d1 * d1, 1) * tl.sum(x1 * x1, 1) + tl.sum(d0 * d0, 1) * tl.sum(k * k, 1)
            f = clip / tl.sqrt(tl.maximum(sq, clip * clip))
            d1 = d1 * f[:, None]
            d0 = d0 * f[:, None]
        u0 = _normalize(k)
        u1 = _normalize(x1)

        # 2-3. solves and dual reads, layer by layer (W1 reads gelu of W0's read)
        Z0, E0 = _layer(W0, M0, k, u0, d0, q, gam, c, gam_p, c_p, Keta, Keta_p, G, G_p, eye, LOG_BT, PREC)
        Z1, E1 = _layer(W1, M1, x1, u1, d1, _gelu(Z0), gam, c, gam_p, c_p, Keta, Keta_p, G, G_p, eye,
                        LOG_BT, PREC)
        tl.store(y_base + tok[:, None] * D + rd[None, :], q + Z1)

        if ci == n_chunks - 1:  # the carried anchor: the last chunk's start state
            tl.store(a0_out + out_off, W0)
            tl.store(a1_out + out_off, W1)
        # 4. chunk-end state
        W0, M0 = _chunk_end(W0, M0, k, u0, d0, E0, gam_e, c_e, b_e, keta_e, g_e, B_e, PREC)
        W1, M1 = _chunk_end(W1, M1, x1, u1, d1, E1, gam_e, c_e, b_e, keta_e, g_e, B_e, PREC)

    tl.store(w0_out + out_off, W0)
    tl.store(w1_out + out_off, W1)
    tl.store(m0_out + out_off, M0)
    tl.store(m1_out + out_off, M1)


def _rows(x: Tensor) -> Tensor:
    """``x`` with a contiguous last dim (a copy only where it has none)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _square(x: Tensor, d: int) -> Tensor:
    """A ``[B, H, D, D]`` tensor whose ``D x D`` blocks are row-major (broadcast over B is kept)."""
    return x if (x.stride(-1) == 1 and x.stride(-2) == d) else x.contiguous()


def bwd_carry_mem() -> bool:
    """Where the fused backward keeps the four carried adjoints between chunks: in the output
    buffers (L2; the default) or, with ``NESTLEARN_DGD_BWD_CARRY=registers``, in registers. ptxas
    at D 64 / chunk 16 (sm_90, ieee): memory spills 6.4 KB a thread at 16 warps against 8.6 KB,
    and needs 144 KB of shared memory against 231 KB (so it also fits an A100's 164 KB). On an
    H100 (2026-12-07, ``python -m bench.triton_dgd --train``, HOPE's 8 x 2,048, both rows in one
    process; ``bench/results/h100_2026-12-07_session10/``) forward + backward took 92.7 ms with
    the adjoints in memory against 105.1 ms in registers (176.7K against 155.8K tokens/s)."""
    return os.environ.get("NESTLEARN_DGD_BWD_CARRY", "memory") != "registers"


def launch_options(d: int, num_warps: int | None = None, maxnreg: int | None = None) -> dict[str, int]:
    """``num_warps`` and ptxas's register cap. The kernel is persistent (one program per SM at a
    time), so the cap defaults to the whole register file of one program, ``65536 / threads``
    (at most 255): left to itself ptxas chose as few as 32 registers at some sizes and spilled
    the rest. 16 warps at D >= 64: on sm_90 (Triton 3.9, ptxas's own report, fp32 dots) that
    halves each thread's products and spills least (D = 64: ~3.8 KB of spill stores per thread
    against ~5.9 KB at 8 warps; D = 128: ~15 KB against ~76 KB). Untimed: tune on the GPU
    (``python -m bench.triton_dgd --num-warps N --maxnreg R``)."""
    warps = num_warps or (16 if d >= 64 else 4)
    out = {"num_warps": warps}
    if torch.version.hip is None:  # an NVIDIA option
        out["maxnreg"] = maxnreg or min(255, 65536 // (32 * warps))
    return out


def dgd_mlp_fwd(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, decay: Tensor, beta: Tensor,
    weights: tuple[Tensor, Tensor], momenta: tuple[Tensor, Tensor], *,
    chunk: int, clip: float | None = None, precision: str = "ieee", num_warps: int | None = None,
    maxnreg: int | None = None, save_every: int = 0,
) -> DGDMLPOut:
    """Run HOPE's MLP memory (``x + W1 gelu(W0 x)``, l2 objective, DGD) over ``T`` tokens from a
    state at a chunk boundary: ``q, k, v`` are ``[B, H, T, D]``, the gates ``[B, H, T]``
    (expanded views are fine), ``weights`` / ``momenta`` are ``(W0, W1)`` each ``[B, H, D, D]``
    laid out ``[out, in]``. fp32 throughout; ``T`` a multiple of ``chunk``; ``chunk`` and ``D``
    powers of two >= 16 on a GPU (the interpreter takes any power of two). ``precision`` is
    ``tl.dot``'s (``ieee``: fp32; ``tf32x3`` / ``tf32``: tensor cores); ``num_warps`` / ``maxnreg``
    are launch options for tuning (``python -m bench.triton_dgd --ptxas`` shows their spills).
    ``save_every = e > 0`` also returns the state at the start of every ``e``-th chunk (``saved``)."""
    bsz, heads, t, d = q.shape
    if t % chunk or chunk & (chunk - 1) or d & (d - 1):
        raise ValueError(f"dgd_mlp_fwd: T={t} must be whole chunks of {chunk}; chunk and D={d} powers of two")
    tensors = (q, k, v, lr, decay, beta, *weights, *momenta)
    if any(x.dtype != torch.float32 for x in tensors):
        raise TypeError("dgd_mlp_fwd: fp32 tensors only (the inner loop runs in fp32)")
    q, k, v = _rows(q), _rows(k), _rows(v)
    w0, w1 = (_square(w, d) for w in weights)
    m0, m1 = (_square(m, d) for m in momenta)
    y = torch.empty(bsz, heads, t, d, device=q.device, dtype=torch.float32)
    outs = [torch.empty(bsz, heads, d, d, device=q.device, dtype=torch.float32) for _ in range(6)]
    n_saved = -(-(t // chunk) // save_every) if save_every > 0 else 0
    saved = [torch.empty(bsz, heads, n_saved, d, d, device=q.device, dtype=torch.float32) for _ in range(4)]
    if t == 0:
        return DGDMLPOut(y, (w0.clone(), w1.clone()), (m0.clone(), m1.clone()), (w0.clone(), w1.clone()),
                         (saved[0], saved[1], saved[2], saved[3]) if save_every > 0 else None)
    grid = (bsz * heads,)
    _dgd_mlp_fwd_kernel[grid](
        q, k, v, y,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        lr, decay, beta,
        lr.stride(0), lr.stride(1), lr.stride(2), decay.stride(0), decay.stride(1), decay.stride(2),
        beta.stride(0), beta.stride(1), beta.stride(2),
        w0, w1, m0, m1,
        w0.stride(0), w0.stride(1), w1.stride(0), w1.stride(1), m0.stride(0), m0.stride(1),
        m1.stride(0), m1.stride(1),
        *outs,
        *(saved if save_every > 0 else outs[:4]),  # unused pointers without SAVE
        heads, t // chunk, float(clip or 0.0), max(save_every, 1), n_saved,
        BT=chunk, LOG_BT=chunk.bit_length() - 1, D=d, CLIP=clip is not None, PREC=precision,
        SAVE=save_every > 0, **launch_options(d, num_warps, maxnreg),
    )
    w0n, w1n, m0n, m1n, a0, a1 = outs
    return DGDMLPOut(y, (w0n, w1n), (m0n, m1n), (a0, a1),
                     (saved[0], saved[1], saved[2], saved[3]) if save_every > 0 else None)


SAVE_EVERY = 4
"""Default checkpoint spacing (chunks) of the differentiable entry ``dgd_mlp``: the forward keeps
``4 D x D`` fp32 per (batch, head) per checkpoint (HOPE's size: 134 MB per call at 4, 537 MB
at 1); the backward recomputes ``SAVE_EVERY`` chunks per step, so a larger spacing also means
fewer, larger recompute steps (fewer launches and Python round trips). The fused backward
saves every chunk."""

BACKWARD = "fused"
"""``dgd_mlp``'s default backward: the fused Triton kernel (``dgd_mlp_bwd.py``); ``"recompute"``
is the PyTorch one (``dgd_mlp_bwd``), also what a device without the resources falls back to."""


def dgd_mlp(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, decay: Tensor, beta: Tensor,
    weights: tuple[Tensor, Tensor], momenta: tuple[Tensor, Tensor], *,
    chunk: int, clip: float | None = None, precision: str = "ieee", save_every: int = SAVE_EVERY,
    compiled: bool = False, num_warps: int | None = None, maxnreg: int | None = None,
    backward: str = BACKWARD,
) -> DGDMLPOut:
    """``dgd_mlp_fwd``, differentiable: where grad mode is on and an input requires grad it runs
    as ``DGDMLPFunction`` (every output, the anchor included, differentiates to q / k / v, the
    gates and the initial weights and momenta, as ``dgd_dual`` with ``grad: unroll`` would);
    elsewhere it is ``dgd_mlp_fwd`` itself. ``backward``: ``"fused"`` (the Triton backward kernel,
    ``dgd_mlp_bwd.py``; checkpoints at every chunk, ``save_every`` ignored) or ``"recompute"``
    (groups of ``save_every`` chunks through ``dgd_dual``). ``compiled``: the recompute runs
    ``dgd_dual``'s chunk step through torch.compile (``MemoryProblem.compiled``)."""
    if backward not in ("fused", "recompute"):
        raise ValueError(f"dgd_mlp: backward={backward!r}, not 'fused' or 'recompute'")
    ins = (q, k, v, lr, decay, beta, *weights, *momenta)
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in ins)):
        return dgd_mlp_fwd(q, k, v, lr, decay, beta, weights, momenta, chunk=chunk, clip=clip, precision=precision,
                           num_warps=num_warps, maxnreg=maxnreg)
    launch = {"num_warps": num_warps, "maxnreg": maxnreg}
    # a size whose backward kernel did not fit this device: the recompute, with its sparser checkpoints
    fused = backward == "fused" and (q.shape[-1], chunk, q.device) not in _bwd_too_big
    y, w0, w1, m0, m1, a0, a1 = DGDMLPFunction.apply(*ins, chunk, clip, precision, 1 if fused else save_every,
                                                     compiled, launch, fused)
    return DGDMLPOut(y, (w0, w1), (m0, m1), (a0, a1))


class DGDMLPFunction(torch.autograd.Function):
    """The kernel's forward, which also writes the state at every ``save_every``-th chunk start,
    with one of two backwards that walk the chunks in reverse from those checkpoints:

    - ``fused`` (``save_every = 1``): the Triton backward kernel (``dgd_mlp_bwd.py``), one
      persistent program per (batch, head) that recomputes each chunk's forward quantities from
      its checkpoint and applies the hand-derived adjoints (``dgd_mlp_bwd_ref.py``, its spec).
      Where the device lacks the resources it warns once and falls back to the recompute.
    - ``recompute``: each group of chunks re-run from its saved state through ``dgd_dual``'s
      closed form (PyTorch, ``grad: unroll``) and back-propagated with ``torch.autograd.grad``:
      exactly ``dgd_dual``'s ops, the fused backward's oracle.

    Either way what stays alive between forward and backward is the inputs and the checkpoints,
    not every chunk's intermediates."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, lr: Tensor, decay: Tensor, beta: Tensor,
                w0: Tensor, w1: Tensor, m0: Tensor, m1: Tensor, chunk: int, clip: float | None,
                precision: str, save_every: int, compiled: bool, launch: dict[str, Any],
                fused: bool = False) -> tuple[Tensor, ...]:
        out = dgd_mlp_fwd(q, k, v, lr, decay, beta, (w0, w1), (m0, m1), chunk=chunk, clip=clip,
                          precision=precision, save_every=save_every, **launch)
        assert out.saved is not None
        ctx.save_for_backward(q, k, v, lr, decay, beta, *out.saved)
        ctx.cfg = (chunk, clip, save_every, compiled, precision, launch, fused and save_every == 1)
        ctx.set_materialize_grads(False)  # None for outputs the loss does not use: less work
        return (out.y, *out.weights, *out.momenta, *out.anchor)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *cots: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, lr, decay, beta, *saved = ctx.saved_tensors
        chunk, clip, every, compiled, precision, launch, fused = ctx.cfg
        needs = ctx.needs_input_grad[:10]
        inputs = (q, k, v, lr, decay, beta)
        grads: list[Tensor | None] | None = None
        if fused:
            grads = _fused_bwd(inputs, saved, cots, chunk=chunk, clip=clip, precision=precision, launch=launch)
        if grads is not None:
            grads = [g if need else None for g, need in zip(grads, needs)]
        else:
            grads = dgd_mlp_bwd(inputs, saved, cots, chunk=chunk, clip=clip, save_every=every, needs=needs,
                                compiled=compiled)
        return (*grads, None, None, None, None, None, None, None)


_bwd_too_big: set[tuple[int, int, torch.device]] = set()
"""(width, chunk, device) where the fused backward ran out of resources: the recompute after."""


def _fused_bwd(inputs: tuple[Tensor, ...], saved: list[Tensor], cots: tuple[Tensor | None, ...], *, chunk: int,
               clip: float | None, precision: str, launch: dict[str, Any]) -> list[Tensor | None] | None:
    """The fused kernel's gradients, or None where this device cannot run it at this size
    (imported here: importing the module decorates the kernel, which must follow any
    ``TRITON_INTERPRET`` setting, as for the forward)."""
    from nestlearn.loops.triton.dgd_mlp_bwd import dgd_mlp_bwd_fused

    size = (inputs[0].shape[-1], chunk, inputs[0].device)
    if size in _bwd_too_big:
        return None
    try:
        return list(dgd_mlp_bwd_fused(inputs, saved, cots, chunk=chunk, clip=clip, precision=precision,
                                      carry_mem=bwd_carry_mem(), **launch))
    except Exception as exc:  # a device without the shared memory / registers this size needs
        if type(exc).__name__ != "OutOfResources":
            raise
        _bwd_too_big.add(size)
        import warnings

        warnings.warn(f"nestlearn: the fused DGD backward does not fit this device at width {size[0]}, chunk "
                      f"{chunk} ({exc}); the recompute backward runs instead", stacklevel=2)
        return None


def dgd_mlp_bwd(
    inputs: tuple[Tensor, ...], saved: list[Tensor], cots: tuple[Tensor | None, ...], *,
    chunk: int, clip: float | None, save_every: int, needs: tuple[bool, ...], compiled: bool = False,
) -> list[Tensor | None]:
    """The adjoints of ``(q, k, v, lr, decay, beta, W0, W1, M0, M1)`` from those of
    ``(y, W0', W1', M0', M1', anchor0, anchor1)`` (``None``: unused): one ``autograd.grad`` per
    group of ``save_every`` chunks, last group first, each through ``dgd_dual`` recomputed from
    the group's saved start state; the state adjoint carries from group to group."""
    t = inputs[0].shape[2]
    span = save_every * chunk
    n_groups = saved[0].shape[2]
    gy = cots[0]
    g_state: list[Tensor | None] = list(cots[1:5])  # adjoint of the state at the current group's end
    g_anchor = cots[5:7]
    out: list[Tensor | None] = [torch.zeros(x.shape, dtype=x.dtype, device=x.device) if need else None
                                for x, need in zip(inputs, needs[:6])]
    state_needed = any(needs[6:])
    for g in range(n_groups - 1, -1, -1):
        t0, t1 = g * span, min(t, (g + 1) * span)
        with torch.enable_grad():
            # the start state always differentiates but in the first group (there only if the
            # initial state wants it); the inputs where the caller asked
            start = [s[:, :, g].detach().requires_grad_(g > 0 or state_needed) for s in saved]
            xs = [x[:, :, t0:t1].detach().requires_grad_(need) for x, need in zip(inputs, needs[:6])]
            xq, xk, xv, xlr, xdc, xbt = xs
            ref = dgd_mlp_fwd_reference(xq, xk, xv, xlr, xdc, xbt, (start[0], start[1]), (start[2], start[3]),
                                        chunk=chunk, clip=clip, grad="unroll", compiled=compiled)
            pairs = [(ref.y, None if gy is None else gy[:, :, t0:t1]),
                     *zip((*ref.weights, *ref.momenta), g_state)]
            if g == n_groups - 1:  # the anchor is the last chunk's start, inside the last group
                pairs += list(zip(ref.anchor, g_anchor))
            # an output can be constant in this group (e.g. W' in the first one when only q wants a gradient)
            pairs = [(o, c) for o, c in pairs if c is not None and o.requires_grad]
            wrt = [x for x in (*xs, *start) if x.requires_grad]
            if not pairs or not wrt:  # nothing reaches this group's inputs or start
                g_state = [None] * 4
                continue
            res = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [c for _, c in pairs], allow_unused=True))
        for i, x in enumerate(xs):
            if x.requires_grad:
                gi = next(res)
                acc = out[i]
                if gi is not None and acc is not None:
                    acc[:, :, t0:t1] = gi
        g_state = [next(res) if s.requires_grad else None for s in start]
    # the initial state's adjoints; expanded inputs (e.g. weights shared over the batch) take
    # the full-shape gradient, autograd sums it back through the expand
    init = [None if not need or gs is None else gs for gs, need in zip(g_state, needs[6:])]
    return [*out, *init]


def dgd_mlp_fwd_reference(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, decay: Tensor, beta: Tensor,
    weights: tuple[Tensor, Tensor], momenta: tuple[Tensor, Tensor], *,
    chunk: int, clip: float | None = None, grad: str = "stop", compiled: bool = False,
) -> DGDMLPOut:
    """``dgd_mlp_fwd``'s contract computed by the PyTorch closed form (``loops/dgd_dual.py``);
    with ``grad="unroll"`` it is differentiable (the backward's recompute, the tests' reference)."""
    from nestlearn import objectives, rules
    from nestlearn.loops.common import GradMode, MemoryProblem, MemoryState
    from nestlearn.loops.dgd_dual import run_dgd_dual
    from nestlearn.memories import MLPMemory

    heads, d = q.shape[1], q.shape[3]
    arch = MLPMemory(d, d, heads, expand=1, depth=2, act="gelu", residual=True, bias=False)
    pb = MemoryProblem(arch, rules.dgd(0.0, 0.0, 0.0), objectives.l2, q, k, v,
                       {"lr": lr, "decay": decay, "beta": beta}, chunk, GradMode(grad), clip=clip, compiled=compiled)
    params = {"W0": weights[0], "W1": weights[1]}
    state = MemoryState(params=params, opt={"m": {"W0": momenta[0], "W1": momenta[1]}}, anchor=params,
                        offset=0, chunks=0)
    y, st = run_dgd_dual(pb, state)
    p, m, a = st["params"], st["opt"]["m"], st["anchor"]
    return DGDMLPOut(y, (p["W0"], p["W1"]), (m["W0"], m["W1"]), (a["W0"], a["W1"]))
