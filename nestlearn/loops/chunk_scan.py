"""The chunk-to-chunk recurrence of the delta rule's WY form, with a hand-written backward.

After the in-chunk triangular solve (``loops/delta.py``) only this part is sequential. With
the state ``S = W^T [dk, dv]`` at the start of chunk ``c``:

    E_c     = TV_c - TK_c S_c                  (the chunk's errors,      [n, dv])
    S_{c+1} = g_c S_c + KB_c^T E_c             (the chunk-end state,     [dk, dv])

``scan`` runs it as two batched matmuls and one copy (or scale) of the state per chunk, in
place into preallocated buffers. Autograd through a Python loop would record ~6 nodes per
chunk; the backward here is the reverse recurrence

    dE_c     = gE_c + KB_c dS_{c+1}
    dS_c     = g_c dS_{c+1} + gS_c - TK_c^T dE_c

(again three kernels per chunk), and every other gradient (``TV, TK, KB, g``) comes from
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
        # in place into preallocated buffers: each matmul is one cuBLAS call accumulating into
        # its output (beta = 1), no temporaries, one copy of the state per chunk
        # (per-chunk views taken once with unbind: indexing inside the loop costs host time)
        errors = tv.clone()
        states = s0.new_empty((tv.shape[0] + 1, *s0.shape))
        states[0].copy_(s0)
        err, st, kbt = errors.unbind(0), states.unbind(0), kb.transpose(-1, -2).unbind(0)
        tks = tk.unbind(0) if tk is not None else None
        gs = g[:, :, None, None].unbind(0) if g is not None else None
        for c in range(len(err)):
            if tks is not None:
                err[c].baddbmm_(tks[c], st[c], alpha=-1.0)
            if gs is None:
                st[c + 1].copy_(st[c])
            else:
                torch.mul(st[c], gs[c], out=st[c + 1])
            st[c + 1].baddbmm_(kbt[c], err[c])
        ctx.save_for_backward(tk, kb, g, errors, states)
        return errors, states

    @staticmethod
    def backward(ctx: Any, g_errors: Tensor | None, g_states: Tensor | None) -> tuple[Tensor | None, ...]:
        tk, kb, g, errors, states = ctx.saved_tensors
        g_errors = torch.zeros_like(errors) if g_errors is None else g_errors
        g_states = torch.zeros_like(states) if g_states is None else g_states
        if torch.is_grad_enabled():  # create_graph: a backward autograd can differentiate
            d_e, d_s = _reverse_differentiable(tk, kb, g, g_errors, g_states)
        else:
            d_e, d_s = _reverse_in_place(tk, kb, g, g_errors, g_states)
        starts, d_s_next = states[:-1], d_s[1:]
        need = ctx.needs_input_grad
        d_tv = d_e if need[0] else None
        d_tk = -(d_e @ starts.transpose(-1, -2)) if tk is not None and need[1] else None
        d_kb = errors @ d_s_next.transpose(-1, -2) if need[2] else None
        d_g = (starts * d_s_next).sum((-1, -2)) if g is not None and need[3] else None
        return d_tv, d_tk, d_kb, d_g, d_s[0]


def _reverse_in_place(tk: Tensor | None, kb: Tensor, g: Tensor | None, g_errors: Tensor, g_states: Tensor,
                      ) -> tuple[Tensor, Tensor]:
    """The reverse recurrence into two buffers, three kernels per chunk: ``d_e[c]`` (gradient of
    ``E_c``, all paths) and ``d_s[c]`` (gradient of ``S_c``, all paths)."""
    d_e, d_s = g_errors.clone(), g_states.clone()
    de, ds, kbs = d_e.unbind(0), d_s.unbind(0), kb.unbind(0)
    tkt = tk.transpose(-1, -2).unbind(0) if tk is not None else None
    gs = g[:, :, None, None].unbind(0) if g is not None else None
    for c in range(len(de) - 1, -1, -1):
        de[c].baddbmm_(kbs[c], ds[c + 1])
        if gs is None:
            ds[c].add_(ds[c + 1])
        else:
            ds[c].addcmul_(ds[c + 1], gs[c])
        if tkt is not None:
            ds[c].baddbmm_(tkt[c], de[c], alpha=-1.0)
    return d_e, d_s


def _reverse_differentiable(tk: Tensor | None, kb: Tensor, g: Tensor | None, g_errors: Tensor,
                            g_states: Tensor) -> tuple[Tensor, Tensor]:
    """``_reverse_in_place`` out of place (for a second-order gradient)."""
    ds = g_states[-1]
    d_s, d_e = [ds], []
    for c in range(g_errors.shape[0] - 1, -1, -1):
        de = torch.baddbmm(g_errors[c], kb[c], ds)
        ds = g_states[c] + (ds if g is None else ds * g[c][:, None, None])
        if tk is not None:
            ds = torch.baddbmm(ds, tk[c].transpose(-1, -2), de, alpha=-1.0)
        d_e.append(de)
        d_s.append(ds)
    return torch.stack(d_e[::-1]), torch.stack(d_s[::-1])


def scan(tv: Tensor, tk: Tensor | None, kb: Tensor, g: Tensor | None, s0: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as ``scan_reference``; the fast path (two or three ops per chunk each way)."""
    out: tuple[Tensor, Tensor] = _Scan.apply(tv, tk, kb, g, s0)  # type: ignore[no-untyped-call]
    return out
