"""The CMS chunk loop for training with the chunk-start weights rebuilt in the backward instead
of saved: ``SGDMLPChunks``, one ``autograd.Function`` over whole chunks.

Why. ``SGDMLPStep`` (``sgd_mlp.py``), one autograd node per chunk, keeps every chunk's start
weights alive until the backward: at HOPE's fast CMS level (512 -> 1,024 -> 512, chunks of 16)
that is 4 MB per sequence and chunk, 16 GB per layer at 1 x 65,536 tokens and 4 GB per layer at
8 x 2,048 -- most of what stopped HOPE at 32 x 2,048 and 64K tokens on an 80 GB card. SGD without
decay moves the weights by a rank-``n`` step built from the chunk's error signals,

    ``W0' = W0 - (lr * d0)^T k``,   ``W1' = W1 - (lr * d1)^T gelu(z)``

(``sgd_mlp.py``'s step 3), so a chunk's start weights follow from its end weights and its
signals ``z [n, Hd]``, ``d0 [n, Hd]``, ``d1 [n, Do]`` (``k`` and ``lr`` are inputs, saved
anyway). The forward kernel writes those signals, and ``zq = q W0^T``, which it computes anyway
(``sgd_mlp_step_fwd(signals=...)``): ``n (3 Hd + Do)`` numbers per sequence and chunk against
``Hd (Di + Do)`` weights, 18x fewer at the fast level's shape. The backward walks the chunks in
reverse, adds each step back to the weights it holds, and runs the fused backward
(``sgd_mlp_bwd``) of that chunk from them and the saved ``z, zq, d1``, which spares its first
two launches (they recompute exactly those).

Exactness. ``fl(fl(W - s) + s)`` is ``W`` within an ulp of ``W``, and the rebuilt step is the
kernel's up to its summation order, so each rebuilt chunk adds about one ulp of the weights. The
weights of every ``keep``-th chunk start are saved exactly, and the walk restarts from them,
so no rebuilt weight is more than ``keep - 1`` steps from a saved one (``KEEP_EVERY`` = 16:
with the signals, about 8x less than saving every chunk at the fast level's shape;
``NESTLEARN_CMS_KEEP_EVERY=1`` saves every chunk through ``SGDMLPStep``, the old path).
``tests/test_triton_cms.py`` checks outputs and every outer gradient against the closed form
(``run_dual``) and the saved bytes against their formula.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from nestlearn.loops.common import TokenScale
from nestlearn.loops.triton.sgd_mlp import SGDMLPOut, sgd_mlp_step_fwd, signal_tokens
from nestlearn.loops.triton.sgd_mlp_bwd import LAUNCH, sgd_mlp_step_bwd

KEEP_EVERY = 16
"""Chunk-start weights saved exactly every this many chunks (the rest are rebuilt)."""


def keep_every() -> int:
    """``NESTLEARN_CMS_KEEP_EVERY`` (a positive integer; 1 saves every chunk's weights), else
    ``KEEP_EVERY`` (with a warning, once, where the variable holds anything else)."""
    raw = os.environ.get("NESTLEARN_CMS_KEEP_EVERY", "").strip()
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    if raw and raw not in _warned:
        _warned.add(raw)
        warnings.warn(f"NESTLEARN_CMS_KEEP_EVERY={raw!r} is not a positive integer (1 saves every chunk's "
                      f"weights); using {KEEP_EVERY}", stacklevel=2)
    return KEEP_EVERY


_warned: set[str] = set()


def scaled_rate(w0: Tensor, w1: Tensor, k: Tensor, v: Tensor, lr: Tensor, scale: TokenScale) -> Tensor:
    """Each token's rate ``lr [B, H, n]`` times its ``TokenScale.factor`` at the chunk-start
    weights (the clip of its whole inner gradient, its chunk gain held at ``max_gain``), from the
    memory's own error signals and ``chunks.token_sq_norm``, as ``chunks.chunk_signals`` scales
    the closed form's signals: the kernels then run with this rate. Differentiable."""
    from nestlearn import objectives
    from nestlearn.loops.chunks import token_sq_norm
    from nestlearn.memories import MLPMemory

    arch = MLPMemory(k.shape[-1], v.shape[-1], k.shape[1], expand=w0.shape[-2] / k.shape[-1], depth=2, act="gelu",
                     residual=False, bias=False)
    params = {"W0": w0, "W1": w1}
    seen: list[Tensor] = []

    def dloss(pred: Tensor) -> Tensor:
        seen.append(objectives.error_signal(objectives.l2, pred, v, True))
        return seen[-1]

    sig = arch.error_signals(params, k, dloss)
    assert sig is not None  # an MLP memory has its explicit backward
    f = scale.factor(token_sq_norm(arch, *sig, params), seen[-1].pow(2).sum(-1), lr)
    assert f is not None
    return lr * f


def _add_step(w: Tensor, d: Tensor, lr: Tensor, x: Tensor) -> Tensor:
    """``w + (lr * d)^T x`` per row in one kernel: ``w [B, H, A, C]`` (the chunk's end weights),
    ``d [R, BT, A]`` (signal rows, padded ones zero), ``lr [R, n]``, ``x [R, n, C]``."""
    n = x.shape[1]
    rows = d.shape[0]
    return torch.baddbmm(w.reshape(rows, *w.shape[-2:]), (d[:, :n] * lr[:, :, None]).transpose(1, 2), x).view(w.shape)


class SGDMLPChunks(torch.autograd.Function):
    """``sgd_mlp.sgd_mlp``'s outputs ``(y, W0', W1', anchor W0, anchor W1)`` over ``T / chunk``
    whole chunks (at least two), saving the signals and every ``keep``-th start weights."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, lr: Tensor, w0: Tensor, w1: Tensor, chunk: int,
                keep: int, precision: str, read_start: bool, scale: TokenScale
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        bsz, heads, t, _ = q.shape
        hd, do = w0.shape[-2], w1.shape[-2]
        n_chunks, bt, rows = t // chunk, signal_tokens(chunk), bsz * heads
        z = q.new_empty(n_chunks, rows, bt, hd)
        zq, d0 = torch.empty_like(z), torch.empty_like(z)
        d1 = q.new_empty(n_chunks, rows, bt, do)
        kept: list[Tensor] = []
        ys = []
        a0, a1 = w0, w1
        rate = lr if not scale else torch.empty_like(lr, memory_format=torch.contiguous_format)
        for c in range(n_chunks):
            if c % keep == 0:
                kept += [w0, w1]
            a0, a1 = w0, w1
            sl = slice(c * chunk, (c + 1) * chunk)
            if scale:  # each token's clipped / capped rate (kept: the rebuilt steps use it)
                rate[:, :, sl] = scaled_rate(w0, w1, k[:, :, sl], v[:, :, sl], lr[:, :, sl], scale)
            y, w0, w1 = sgd_mlp_step_fwd(q[:, :, sl], k[:, :, sl], v[:, :, sl], rate[:, :, sl], w0, w1,
                                         precision=precision, read_start=read_start,
                                         signals=(z[c], zq[c], d1[c], d0[c]))
            ys.append(y)
        ctx.save_for_backward(q, k, v, lr, rate, w0, w1, z, zq, d0, d1, *kept)
        ctx.cfg = (chunk, keep, precision, read_start, scale)
        ctx.set_materialize_grads(False)
        return torch.cat(ys, 2), w0, w1, a0, a1

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor | None, g0: Tensor | None, g1: Tensor | None, ga0: Tensor | None,
                 ga1: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, lr, rate, w0, w1, z, zq, d0, d1, *kept = ctx.saved_tensors
        chunk, keep, precision, read_start, scale = ctx.cfg
        bsz, heads, t, di = q.shape
        n_chunks, rows = t // chunk, bsz * heads
        dq, dk, dv, dlr = q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape), q.new_empty(bsz, heads, t)
        # the rebuilt steps are fp32 products like the kernel's, whatever autocast the backward runs under
        with torch.autocast(q.device.type, enabled=False):
            for c in reversed(range(n_chunks)):
                sl = slice(c * chunk, (c + 1) * chunk)
                if c % keep == 0:
                    w0, w1 = kept[2 * (c // keep)], kept[2 * (c // keep) + 1]
                else:  # W = W' + step: the chunk's own step added back to its end weights
                    lr_c = rate[:, :, sl].reshape(rows, chunk)
                    k_c = k[:, :, sl].reshape(rows, chunk, di)
                    h_c = F.gelu(z[c][:, :chunk])
                    w0 = _add_step(w0, d0[c], lr_c, k_c)
                    w1 = _add_step(w1, d1[c], lr_c, h_c)
                gy_c = None if gy is None else gy[:, :, sl]
                dq_c, dk_c, dv_c, dlr_c, g0, g1 = sgd_mlp_step_bwd(
                    q[:, :, sl], k[:, :, sl], v[:, :, sl], rate[:, :, sl], w0, w1, gy_c, g0, g1,
                    precision=precision, read_start=read_start, block_h=LAUNCH.get("block_h"),
                    block_d=LAUNCH.get("block_d"), num_warps=LAUNCH.get("num_warps", 4),
                    signals=(z[c], zq[c], d1[c]))
                if scale:  # through the scaled rate: rate = scaled_rate(W, k, v, lr)
                    with torch.enable_grad():
                        ins = [t.detach().requires_grad_() for t in (w0, w1, k[:, :, sl], v[:, :, sl], lr[:, :, sl])]
                        r = scaled_rate(ins[0], ins[1], ins[2], ins[3], ins[4], scale)
                        e0, e1, ek, ev, dlr_c = torch.autograd.grad(r, ins, dlr_c)
                    g0, g1, dk_c, dv_c = g0 + e0, g1 + e1, dk_c + ek, dv_c + ev
                if c == n_chunks - 1:  # the anchor is the last chunk's start weights
                    g0 = g0 if ga0 is None else g0 + ga0
                    g1 = g1 if ga1 is None else g1 + ga1
                dq[:, :, sl], dk[:, :, sl], dv[:, :, sl], dlr[:, :, sl] = dq_c, dk_c, dv_c, dlr_c
        needs = ctx.needs_input_grad
        grads = (dq, dk, dv, dlr, g0, g1)
        return (*[g if need else None for g, need in zip(grads, needs)], None, None, None, None, None)


def sgd_mlp_chunks(q: Tensor, k: Tensor, v: Tensor, lr: Tensor, w0: Tensor, w1: Tensor, *, chunk: int,
                   keep: int | None = None, precision: str = "ieee", read_start: bool = False,
                   scale: TokenScale = TokenScale()) -> SGDMLPOut:
    """``sgd_mlp.sgd_mlp`` for training: whole chunks of ``chunk`` tokens
    (at least two) through ``SGDMLPChunks``, every ``keep``-th chunk's start weights saved
    (default ``keep_every()``), the rest rebuilt in the backward (module docstring); ``scale``:
    the level's per-token clip and gain cap (``scaled_rate``)."""
    t = q.shape[2]
    if t % chunk or t < 2 * chunk:
        raise ValueError(f"sgd_mlp_chunks: T={t} must be at least two whole chunks of {chunk}")
    y, w0n, w1n, a0, a1 = SGDMLPChunks.apply(q, k, v, lr, w0, w1, chunk, keep or keep_every(), precision,
                                               read_start, scale)
    return SGDMLPOut(y, (w0n, w1n), (a0, a1))
