"""Closed-form chunked executor for DGD (delta gradient descent with momentum, HOPE's rule).

Within a chunk every gradient and layer input is taken at the chunk-start state, and the
sequential reference (``rules/dgd.py`` stepped by ``loops/sequential.py``) is, per weight
``W`` used as ``z = W x`` (gradient ``g_t = delta_t x_t^T``, unit input ``u_t = x_t/|x_t|``):

    m_t = beta_t m_{t-1} + delta_t x_t^T
    W_t = lam_t W_{t-1} - pi_t (W_{t-1} u_t) u_t^T - eta_t m_t,        lam_t = 1 - decay_t

(``pi = eta`` unless the rule has its own ``proj`` rate). Unrolled over the chunk
(``Gam_t = prod_{j<=t} lam_j``, ``b_t = prod_{j<=t} beta_j``, ``K_ts = Gam_t / Gam_s``,
``B_sr = b_s / b_r``, ``e_t = W_{t-1} u_t``):

    W_t = Gam_t W_0 + c_t m_0 - sum_{s<=t} K_ts pi_s e_s u_s^T - sum_{r<=t} G_tr delta_r x_r^T
    c_t = -sum_s K_ts eta_s b_s,          G = (K diag(eta)) B

so ``e`` solves one unit-lower-triangular system per chunk, ``(I + L) E = R`` with
``L_ts = K_{t-1,s} pi_s (u_s . u_t)`` for s < t, and every in-chunk read ``W_t x'_t`` is a
masked matmul (the dual form) -- no weight copy per token. Biases follow the same formula
without the ``u u^T`` term. Coefficients come from log-space cumulative sums (``chunks.segsum``).

Launch-bound on GPU (tiny products per chunk), so each chunk dispatches as few ops as it can:
the coefficients of every chunk of a call are computed at once, q/k/v/gates split once, every
product is a plain ``bmm`` / ``baddbmm`` over ``[B*H, ...]``, and the solve's rows (``u_t``) and
the read's (``x'_t``) are stacked so that one matmul per term serves both.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from nestlearn.loops.chunks import (
    chunk_signals,
    chunk_spans,
    chunk_step,
    hp_tokens,
    run_segments,
    safe_log,
    segsum,
    split,
)
from nestlearn.loops.common import MemoryProblem, MemoryState, Params, detach_tree
from nestlearn.memories.base import Lin, MemoryArch


def supports(pb: MemoryProblem) -> bool:
    """DGD on a memory whose every parameter is a layer weight or bias."""
    from nestlearn.rules.dgd import DGD

    if not isinstance(pb.rule, DGD):
        return False
    return _all_layer_params(pb.arch)


def _all_layer_params(arch: MemoryArch) -> bool:
    """Every parameter of ``arch`` is a layer's weight or bias (cached on the arch; the names come
    from ``init_params``, built under a forked CPU generator so that asking leaves the run's
    random stream as it was; not on the meta device, whose context imports dynamo)."""
    known = getattr(arch, "_dgd_dual_ok", None)
    if known is None:
        names = {n for layer in arch.layers for n in (layer.weight, layer.bias) if n is not None}
        with torch.random.fork_rng(devices=[]):
            known = names == set(arch.init_params())
        arch._dgd_dual_ok = known  # type: ignore[attr-defined]
    return bool(known)


def dgd_coefficients(lr: Tensor, beta: Tensor, decay: Tensor, proj: Tensor | None = None) -> dict[str, Tensor]:
    """Scalar coefficients over ``[B, H, n(, n)]`` (see the module docstring): ``Kpi`` the
    projection term's ``K diag(pi)`` (``pi = proj``, else ``lr``), ``G`` and ``c`` the gradient step's."""
    log_lam, log_beta = safe_log(1 - decay), safe_log(beta)
    K = torch.exp(segsum(log_lam))  # K[t, s] = prod_{r=s+1..t} lam_r, 0 above diagonal
    B = torch.exp(segsum(log_beta))  # B[s, r] = prod_{j=r+1..s} beta_j
    gam = torch.exp(torch.cumsum(log_lam, -1))
    b = torch.exp(torch.cumsum(log_beta, -1))
    Keta = K * lr.unsqueeze(-2)  # K[t, s] eta_s
    G = Keta @ B
    c = -(Keta @ b.unsqueeze(-1)).squeeze(-1)
    Kpi = Keta if proj is None else K * proj.unsqueeze(-2)  # K[t, s] pi_s
    # the same at t-1 (row t holds step t-1's values; the state before the chunk at t = 1)
    prev = {n: _shift(x) for n, x in (("Kpi", Kpi), ("G", G))}
    gam_p = torch.cat([torch.ones_like(gam[..., :1]), gam[..., :-1]], -1)
    c_p = torch.cat([torch.zeros_like(c[..., :1]), c[..., :-1]], -1)
    return {"Kpi": Kpi, "G": G, "gam": gam, "c": c, "b_end": b[..., -1], "B_end": B[..., -1, :],
            "Kpi_p": prev["Kpi"], "G_p": prev["G"], "gam_p": gam_p, "c_p": c_p}


def _shift(x: Tensor) -> Tensor:
    """Rows moved down by one (row 0 becomes zeros): ``out[t] = x[t-1]``."""
    return torch.cat([torch.zeros_like(x[..., :1, :]), x[..., :-1, :]], -2)


def run_dgd_dual(pb: MemoryProblem, state: MemoryState) -> tuple[Tensor, MemoryState]:
    """Every chunk of the call in ``[B*H, ...]`` tensors (so each product is one ``bmm``, not a
    broadcasting ``matmul`` of views and expands), its inputs split and its coefficients
    computed once for all chunks; the state is flattened on entry and restored on exit."""
    bh = pb.q.shape[:2]
    spans = chunk_spans(pb, state)
    parts = dict(zip([t0 for t0, _ in spans], _chunk_inputs(pb, [t1 - t0 for t0, t1 in spans])))
    flat = MemoryState(params=_flat(state["params"]), opt={"m": _flat(state["opt"]["m"])},
                       anchor=_flat(state["anchor"]), offset=state["offset"], chunks=state["chunks"])
    step = chunk_step(pb, _segment)  # through torch.compile where pb.compiled
    y, new = run_segments(pb, flat, lambda p, o, a, t0, t1: step(pb, p, o, a, parts[t0], bh))
    out = MemoryState(params=_unflat(new["params"], bh), opt={"m": _unflat(new["opt"]["m"], bh)},
                      anchor=_unflat(new["anchor"], bh), offset=new["offset"], chunks=new["chunks"])
    return y, out


Chunk = tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]


def _flat(p: Params) -> Params:
    return {k: t.flatten(0, 1) for k, t in p.items()}


def _unflat(p: Params, bh: torch.Size) -> Params:
    return {k: t.unflatten(0, bh) for k, t in p.items()}


def _chunk_inputs(pb: MemoryProblem, sizes: list[int]) -> Iterator[Chunk]:
    """Every span's ``(q, k, v, coefficients)`` over ``[B*H, n, ...]``, prepared for the whole
    call at once: one split per tensor (a slice per chunk would cost a full-size zero gradient
    per chunk in backward), q/k/v contiguous once, and the coefficients of every run of
    equal-length spans in one batched pass (they depend on the gates only)."""
    stop = pb.grad.kind == "stop"
    q, k, v = pb.q, pb.k, pb.v
    names = ("lr", "decay", "beta", "proj") if "proj" in pb.hp else ("lr", "decay", "beta")
    gates = [hp_tokens(pb, n).flatten(0, 1) for n in names]  # lr, decay, beta(, proj)
    if stop:
        k, v, gates = k.detach(), v.detach(), [g.detach() for g in gates]
    runs = [(n, len(list(g))) for n, g in itertools.groupby(sizes)]
    pieces = zip(*(split(g, [n * m for n, m in runs], -1) for g in gates))
    cos: list[dict[str, Tensor]] = []
    for (n, m), piece in zip(runs, pieces):
        lr_r, decay_r, beta_r, *proj_r = (g.unflatten(-1, (m, n)) for g in piece)  # [BH, m, n]
        co = dgd_coefficients(lr_r, beta_r, decay_r, proj_r[0] if proj_r else None)
        gam, c, kpi, g_ = co["gam"], co["c"], co["Kpi"], co["G"]
        shaped = {
            "gam": gam.unsqueeze(-1), "c": c.unsqueeze(-1), "gam_p": co["gam_p"].unsqueeze(-1),
            "c_p": co["c_p"].unsqueeze(-1), "nKpi": -kpi, "nG": -g_, "Kpi_p": co["Kpi_p"],
            "nG_p": -co["G_p"], "gam_end": gam[..., -1, None, None], "c_end": c[..., -1, None, None],
            **({"rate": lr_r} if pb.max_gain is not None else {}),  # each token's own rate, for max_gain
            "b_end": co["b_end"][..., None, None], "nkpi_end": -kpi[..., -1, :, None],
            "ng_end": -g_[..., -1, :, None], "B_end": co["B_end"].unsqueeze(-1),
        }
        # the solve's right-hand side (rows at t-1) stacked over the read (rows at t): one
        # product per term serves both (see ``_segment``)
        shaped.update(gam2=torch.cat([shaped["gam_p"], shaped["gam"]], -2),
                      c2=torch.cat([shaped["c_p"], shaped["c"]], -2),
                      nG2=torch.cat([shaped["nG_p"], shaped["nG"]], -2),
                      K2=torch.cat([shaped["Kpi_p"], shaped["nKpi"]], -2))
        cos.extend(dict(zip(shaped, ts)) for ts in zip(*(t.unbind(1) for t in shaped.values())))
    qs, ks, vs = (split(x.contiguous().flatten(0, 1), sizes, 1) for x in (q, k, v))
    return zip(qs, ks, vs, cos)


def _segment(
    pb: MemoryProblem, params: Params, opt: dict[str, Any], anchor: Params, part: Chunk, bh: torch.Size,
) -> tuple[Tensor, Params, dict[str, Any]]:
    stop = pb.grad.kind == "stop"
    q, k, v, co = part

    # 1. error signals and layer inputs at the chunk-start state, one batched pass; the memory
    #    sees [B, H, ...] (its own per-head outer parameters, e.g. TTT's layer norm, broadcast
    #    over that), its layers' tensors come back as [B*H, ...]
    rate = co["rate"].unflatten(0, bh) if "rate" in co else None
    deltas, inputs = (_flat(t) for t in chunk_signals(pb, _unflat(anchor, bh), k.unflatten(0, bh),
                                                      v.unflatten(0, bh), rate))
    names = [layer.weight for layer in pb.arch.layers]

    m0: Params = opt["m"]
    cur = detach_tree(params) if stop else params
    if stop:
        m0 = detach_tree(m0)
    bias_of = {layer.weight: layer.bias for layer in pb.arch.layers}
    units = {n: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) for n, x in inputs.items()}
    xT = {n: inputs[n].transpose(1, 2) for n in names}
    uT = {n: units[n].transpose(1, 2) for n in names}
    wT = {n: cur[n].transpose(1, 2) for n in names}
    mT = {n: m0[n].transpose(1, 2) for n in names}

    # 2. e_t = W_{t-1} u_t for every weight: one triangular solve per chunk
    #    (I + L) e = r,  r_t = gam_{t-1} W u_t + c_{t-1} m0 u_t - sum_r G_{t-1,r} (u_t . x_r) d_r
    es: dict[str, Tensor] = {}

    def solve(name: str, L: Tensor, r: Tensor) -> Tensor:  # L strictly lower: unit diagonal implied
        if r.dtype in (torch.float16, torch.bfloat16):  # no half kernel; the n x n system wants fp32
            e = torch.linalg.solve_triangular(L.float(), r.float(), upper=False, unitriangular=True).to(r.dtype)
        else:
            e = torch.linalg.solve_triangular(L, r, upper=False, unitriangular=True)
        es[name] = e
        return e

    def solve_alone(name: str) -> None:
        u, d = units[name], deltas[name]
        r = torch.baddbmm(torch.bmm(co["gam_p"] * u, wT[name]), co["c_p"] * u, mT[name])
        r = torch.baddbmm(r, co["nG_p"] * torch.bmm(u, xT[name]), d)
        solve(name, co["Kpi_p"] * torch.bmm(u, uT[name]), r)

    # 3. the dual read: every token with its own in-chunk weights. The solve's rows (u_t, the
    #    coefficients at t-1) and the read's (a_t, at t) take the same products: stacked, each
    #    product is one matmul for both, and the solve happens here, just before its e is read
    def read(name: str, w: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
        d = deltas[name]
        if name in es:  # already solved (a weight read twice): the read alone
            z = torch.baddbmm(torch.bmm(co["gam"] * a, wT[name]), co["c"] * a, mT[name])
            z = torch.baddbmm(z, co["nKpi"] * torch.bmm(a, uT[name]), es[name])
            z = torch.baddbmm(z, co["nG"] * torch.bmm(a, xT[name]), d)
        else:
            n = a.shape[1]
            ua = torch.cat([units[name], a], 1)  # [BH, 2n, i]
            z2 = torch.baddbmm(torch.bmm(co["gam2"] * ua, wT[name]), co["c2"] * ua, mT[name])
            z2 = torch.baddbmm(z2, co["nG2"] * torch.bmm(ua, xT[name]), d)
            r, z = z2.split(n, 1)
            L, ku = (co["K2"] * torch.bmm(ua, uT[name])).split(n, 1)
            z = torch.baddbmm(z, ku, solve(name, L, r))
        bn = bias_of[name]
        if b is not None and bn is not None:
            z = z + co["gam"] * b.unsqueeze(-2) + co["c"] * m0[bn].unsqueeze(-2) + co["nG"] @ d
        return z

    if pb.read_start:  # weights constant within the chunk: a plain read at its start
        y = pb.arch.apply(_unflat(detach_tree(anchor) if stop else anchor, bh), q.unflatten(0, bh))
    else:
        y = pb.arch.apply(_unflat(cur, bh), q.unflatten(0, bh), _flat_lin(read, bh))
    for n in names:
        if n not in es:  # not read (read_start): solved on its own
            solve_alone(n)

    # 4. chunk-end state: one matmul per weight
    new_p: Params = {}
    new_m: Params = {}
    for layer in pb.arch.layers:
        n, u, x, d, e = layer.weight, units[layer.weight], inputs[layer.weight], deltas[layer.weight], es[layer.weight]
        p = torch.addcmul(co["gam_end"] * cur[n], co["c_end"], m0[n])
        p = torch.baddbmm(p, (e * co["nkpi_end"]).transpose(1, 2), u)
        new_p[n] = torch.baddbmm(p, (d * co["ng_end"]).transpose(1, 2), x)
        new_m[n] = torch.baddbmm(co["b_end"] * m0[n], (d * co["B_end"]).transpose(1, 2), x)
        if layer.bias is not None:  # the same over [BH, o]: coefficients [BH, 1] / [BH, n, 1]
            bn = layer.bias
            p_b = torch.addcmul(co["gam_end"][..., 0] * cur[bn], co["c_end"][..., 0], m0[bn])
            new_p[bn] = p_b + (d * co["ng_end"]).sum(1)
            new_m[bn] = co["b_end"][..., 0] * m0[bn] + (d * co["B_end"]).sum(1)
    return y, new_p, {"m": new_m}


def _flat_lin(read: Lin, bh: torch.Size) -> Lin:
    """``read`` (over ``[B*H, ...]``) as a hook of a memory applied over ``[B, H, ...]``."""
    def lin(name: str, w: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
        return read(name, w.flatten(0, 1), a.flatten(0, 1), None if b is None else b.flatten(0, 1)).unflatten(0, bh)

    return lin
