"""Exact chunk-parallel delta rule: period-1 linear memory, ``l2`` objective, sgd rule.

The sequential recurrence (``rules/momentum.py`` ``step`` with no ``beta``, gradient of
``||W k - v||^2`` -- not halved -- at the previous state, output read after the update) is

    W_t = (1 - decay_t) W_{t-1} - lr_t * 2 (W_{t-1} k_t - v_t) k_t^T
        = alpha_t W_{t-1} + beta_t e_t k_t^T,     e_t = v_t - W_{t-1} k_t,
    y_t = W_t q_t,

with ``alpha_t = 1 - decay_t`` and ``beta_t = 2 lr_t`` (the gated delta rule; with decay 0
DeltaNet). With ``gamma_t = prod_{r<=t} alpha_r`` inside a chunk started from ``W0``:

    W_t = gamma_t W0 + sum_{s<=t} (gamma_t / gamma_s) beta_s e_s k_s^T

so the chunk's errors solve one unit-lower-triangular system (the WY / UT transform)

    (I + L) E = V - diag(gamma_{t-1}) K W0^T,   L[t,s] = (gamma_{t-1}/gamma_s) (k_t . k_s) beta_s, s < t

and ``E = Tv - Tk W0^T`` with ``Tv = (I+L)^{-1} V`` and ``Tk = (I+L)^{-1} diag(gamma_prev) K``
computed for every chunk at once (one batched triangular inverse or solve). From chunk to chunk only

    E_c = Tv_c - Tk_c W_c^T,     W_{c+1}^T = gamma_n W_c^T + (beta (gamma_n/gamma_s) k_s)^T E_c

is sequential: two batched matmuls per chunk (``loops/chunk_scan.py``, with a hand-written
reverse recurrence for the backward). The reads are batched over all chunks:

    Y = diag(gamma) Q W_c^T + ((gamma_t/gamma_s) [s<=t] * Q K^T) (beta * E).

Gate ratios come from log-space cumulative sums (``chunks.segsum``). Computation is in float32
at least (fp32 fast weights with bf16 activations); the carried weights stay in that dtype.
The reference is ``loops/sequential.py``; ``tests/test_delta_fastpath.py`` checks equality in
float64, gradients included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nestlearn.loops.chunk_scan import scan
from nestlearn.loops.chunks import identity, masks, per_token, safe_log, segsum
from nestlearn.loops.common import MemoryProblem, MemoryState

DEFAULT_CHUNK = 64


def auto_chunk(t: int) -> int:
    """The compute chunk where the spec sets none: 64 tokens up to 1K, then longer chunks. The
    state passes from chunk to chunk sequentially (three small kernels per chunk each way, bound
    by their launches on a GPU), so on long sequences fewer, longer chunks pay for their larger
    in-chunk products; the thresholds come from a chunk sweep of the bare rule (docs/benchmarks.md)."""
    return DEFAULT_CHUNK if t <= 1024 else 128 if t <= 16384 else 256


def supports(pb: MemoryProblem) -> bool:
    """True when ``pb`` is exactly a (gated) delta rule this module computes."""
    from nestlearn.memories.linear import LinearMemory
    from nestlearn.objectives import l2
    from nestlearn.rules.momentum import Momentum

    return (
        pb.period == 1
        and not pb.read_start
        and pb.clip is None
        and pb.max_gain is None
        and type(pb.rule) is Momentum
        and "beta" not in pb.rule.hypers
        and pb.rule.decay_to == "zero"
        and isinstance(pb.arch, LinearMemory)
        and not pb.arch.bias
        and pb.objective is l2
        and pb.grad.kind in ("unroll", "first_order")
        and set(pb.hp) <= {"lr", "decay"}
    )


def delta_rule(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, alpha: Tensor | None, w0: Tensor,
    chunk: int | None = None, first_order: bool = False,
) -> tuple[Tensor, Tensor]:
    """``q, k [B,H,T,dk]``, ``v [B,H,T,dv]``, ``beta, alpha [B,H,T]`` (``alpha=None``: no decay),
    ``w0 [B,H,dv,dk]`` -> ``(y [B,H,T,dv], W_T)``. ``first_order`` treats every inner
    gradient (``e_t k_t^T``) as a constant, like ``GradMode('first_order')``. ``chunk``: the
    compute chunk (any value gives the same result), ``auto_chunk`` when None."""
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    n = min(chunk or auto_chunk(t), t)
    pad = (-t) % n
    if pad:  # padded tokens have beta = 0 and alpha = 1: they change nothing
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, pad))
        alpha = F.pad(alpha, (0, pad), value=1.0) if alpha is not None else None
    nc = (t + pad) // n
    # chunk-major layout [nc, N, n, d] (N = B*H): chunk c is one contiguous block for the scan
    qc, kc, vc = (x.reshape(b * h, nc, n, x.shape[-1]).transpose(0, 1).contiguous() for x in (q, k, v))
    bc = beta.reshape(b * h, nc, n).transpose(0, 1)
    not_strict_lower, above = masks(n, q.device)

    if alpha is not None:
        la = safe_log(alpha).reshape(b * h, nc, n).transpose(0, 1)
        ratio = torch.exp(segsum(la))  # [.., t, s] = gamma_t / gamma_s for s <= t, else 0
        gamma = torch.exp(torch.cumsum(la, -1))  # [.., n]
        g_prev = torch.cat([torch.ones_like(gamma[..., :1]), gamma[..., :-1]], -1)
        ratio_prev = torch.cat([torch.zeros_like(ratio[..., :1, :]), ratio[..., :-1, :]], -2)
    else:
        ratio = ratio_prev = gamma = g_prev = None  # type: ignore[assignment]

    def solve(kk: Tensor, vv: Tensor, bb: Tensor) -> tuple[Tensor, Tensor]:
        """The WY / UT transform of every chunk at once: ``(I+L)^{-1} [V | diag(g_prev) K]``."""
        lmat = (kk @ kk.transpose(-1, -2)) * bb.unsqueeze(-2)
        lmat = lmat * ratio_prev if ratio_prev is not None else lmat.masked_fill(not_strict_lower, 0.0)
        kg = kk * g_prev.unsqueeze(-1) if g_prev is not None else kk
        a = lmat + identity(n, lmat.dtype, lmat.device)
        if n < dk + dv:  # a triangular solve costs n^2 per right-hand side: invert, then two GEMMs
            inv = torch.linalg.solve_triangular(a, identity(n, a.dtype, a.device).expand_as(a),
                                                upper=False, unitriangular=True)
            return inv @ vv, inv @ kg
        sol = torch.linalg.solve_triangular(a, torch.cat([vv, kg], -1), upper=False, unitriangular=True)
        return sol[..., :dv].contiguous(), sol[..., dv:].contiguous()

    kr = kc.detach() if first_order else kc  # k inside the inner gradients
    kend = kr * ratio[..., -1, :].unsqueeze(-1) if ratio is not None else kr  # (gamma_n/gamma_s) k_s
    kb = (kend * bc.unsqueeze(-1)).contiguous()
    g_end = gamma[..., -1] if gamma is not None else None
    s0 = w0.reshape(b * h, dv, dk).transpose(-1, -2)
    if first_order:  # errors from the true recurrence, then held constant
        with torch.no_grad():
            tv, tk = solve(kc, vc, bc)
            e_all = scan(tv, tk, kb, g_end, s0)[0]
        e_all, states = scan(e_all, None, kb, g_end, s0)
    else:
        tv, tk = solve(kc, vc, bc)
        e_all, states = scan(tv, tk, kb, g_end, s0)
    scores = qc @ kr.transpose(-1, -2)
    scores = scores * ratio if ratio is not None else scores.masked_fill(above, 0.0)
    y = qc @ states[:-1]
    if gamma is not None:
        y = y * gamma.unsqueeze(-1)
    y = torch.baddbmm(y.flatten(0, 1), scores.flatten(0, 1), (e_all * bc.unsqueeze(-1)).flatten(0, 1))
    y = y.view(nc, b, h, n, dv).permute(1, 2, 0, 3, 4).reshape(b, h, nc * n, dv)[:, :, :t]
    w = states[-1].transpose(-1, -2).reshape(b, h, dv, dk)
    return y, w


def run_delta(
    pb: MemoryProblem, state: MemoryState, chunk: int | None = None,
) -> tuple[Tensor, MemoryState]:
    """Executor entry: same contract as ``run_sequential`` for problems ``supports`` accepts.

    The carried ``anchor`` is the final weights (the sequential path keeps the weights
    before the last token; both are overwritten at the next token of a period-1 level)."""
    dtype = torch.promote_types(pb.q.dtype, torch.float32)
    q, k, v = (x.to(dtype) for x in (pb.q, pb.k, pb.v))
    ref = q[..., 0]
    beta = 2.0 * per_token(pb.hp.get("lr", 0.0), ref)
    dec = pb.hp.get("decay", 0.0)
    alpha = None if (not isinstance(dec, Tensor) and float(dec) == 0.0) else 1.0 - per_token(dec, ref)
    w0 = state["params"]["W"].to(dtype)
    y, w = delta_rule(q, k, v, beta, alpha, w0, chunk, pb.grad.kind == "first_order")
    return y.to(pb.q.dtype), carried_weights(state, w, pb.q.shape[2])


def carried_weights(state: MemoryState, w: Tensor, tokens: int) -> MemoryState:
    """The state after ``tokens`` tokens of a period-1 delta rule that ended at weights ``w``."""
    return MemoryState(params={"W": w}, opt=state["opt"], anchor={"W": w}, offset=0, chunks=state["chunks"] + tokens)
