"""The chunk-to-chunk recurrence of the delta rule's WY form, with a hand-written backward.

After the in-chunk triangular solve (``loops/delta.py``) only this part is sequential. With
the state ``S = W^T [dk, dv]`` at the start of chunk ``c``:

    E_c     = TV_c - TK_c S_c                  (the chunk's errors,      [n, dv])
    S_{c+1} = g_c S_c + KB_c^T E_c             (the chunk-end state,     [dk, dv])

``scan`` runs it as two (three with a gate) batched matmuls per chunk into preallocated
buffers. Autograd through a Python loop would record ~6 nodes per chunk; the backward here
is the reverse recurrence

    dE_c     = gE_c + KB_c dS_{c+1}
    dS_c     = g_c dS_{c+1} + gS_c - TK_c^T dE_c

(again two or three ops per chunk), and every other gradient (``TV, TK, KB, g``) comes from
one batched product over all chunks afterwards. The backward is written in differentiable
ops, so a second-order gradient through it works too. ``scan_reference`` is the same
recurrence written plainly; ``tests/test_chunk_scan.py`` checks both against each other in
float64 (values, gradients, second-order gradients).

Layout is chunk-major: ``[nc, N, ...]`` with ``N`` the flattened batch x heads, so that
chunk ``c`` is one contiguous ``[N, ...]`` block for ``bmm``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def scan_reference(tv: Tensor, tk: Tensor | None, kb: Tensor, g: Tensor | None, s0: Tensor) -> tuple[Tensor, Tensor]:
    """``tv [nc,N,n,dv]``, ``tk, kb [nc,N,n,dk]`` (``tk=None``: ``E = TV``, no state
    dependence), ``g [nc,N]`` or None, ``s0 [N,dk,dv]`` -> ``(E [nc,N,n,dv], states
    [nc+1,N,dk,dv])`` with ``states[c]`` the state at the start of chunk ``c``."""
    s, errors, states = s0, [], [s0]
    for c in range(tv.shape[0]):
        e = tv[c] if tk is None else tv[c] - tk[c] @ s
        decayed = s if g is None else g[c][:, None, None] * s
        s = decayed + kb[c].transpose(-1, -2) @ e
        errors.append(e)
        states.append(s)
    return torch.stack(errors), torch.stack(states)


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tv: Tensor, tk: Tensor | None, kb: Tensor, g: Tensor | None,
                s0: Tensor) -> tuple[Tensor, Tensor]:
        nc = tv.shape[0]
        states = s0.new_empty((nc + 1, *s0.shape))
        states[0] = s0
        errors = tv.clone() if tk is None else torch.empty_like(tv)
        kbt = kb.transpose(-1, -2)
        for c in range(nc):
            if tk is not None:
                torch.baddbmm(tv[c], tk[c], states[c], alpha=-1.0, out=errors[c])
            prev = states[c] if g is None else states[c] * g[c][:, None, None]
            torch.baddbmm(prev, kbt[c], errors[c], out=states[c + 1])
        ctx.save_for_backward(tk, kb, g, errors, states)
        return errors, states

    @staticmethod
    def backward(ctx: Any, g_errors: Tensor | None, g_states: Tensor | None) -> tuple[Tensor | None, ...]:
        tk, kb, g, errors, states = ctx.saved_tensors
        nc = errors.shape[0]
        if g_errors is None:
            g_errors = torch.zeros_like(errors)
        if g_states is None:
            g_states = torch.zeros_like(states)
        ds = g_states[nc]
        d_next: list[Tensor] = []  # dS_{c+1} for c = nc-1 .. 0
        d_err: list[Tensor] = []
        for c in range(nc - 1, -1, -1):
            d_next.append(ds)
            de = torch.baddbmm(g_errors[c], kb[c], ds)
            d_err.append(de)
            carried = ds if g is None else ds * g[c][:, None, None]
            ds = carried + g_states[c]
            if tk is not None:
                ds = torch.baddbmm(ds, tk[c].transpose(-1, -2), de, alpha=-1.0)
        d_s_next = torch.stack(d_next[::-1])
        d_e = torch.stack(d_err[::-1])
        starts = states[:-1]
        need = ctx.needs_input_grad
        d_tv = d_e if need[0] else None
        d_tk = -(d_e @ starts.transpose(-1, -2)) if tk is not None and need[1] else None
        d_kb = errors @ d_s_next.transpose(-1, -2) if need[2] else None
        d_g = (starts * d_s_next).sum((-1, -2)) if g is not None and need[3] else None
        return d_tv, d_tk, d_kb, d_g, ds


def scan(tv: Tensor, tk: Tensor | None, kb: Tensor, g: Tensor | None, s0: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as ``scan_reference``; the fast path (two or three ops per chunk each way)."""
    out: tuple[Tensor, Tensor] = _Scan.apply(tv, tk, kb, g, s0)  # type: ignore[no-untyped-call]
    return out
