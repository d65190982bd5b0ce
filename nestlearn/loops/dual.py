"""Closed-form chunked executor for linear rules (sgd / momentum / decay), any memory.

Within a chunk every gradient is taken at the chunk-start state, and the rule

    S_t = beta_t S_{t-1} - lr_t g_t,      W_t = (1 - decay_t) W_{t-1} + S_t

is linear in the gradients, so for every token t of the chunk

    W_t = a_t W + s_t S + sum_{s<=t} c_{ts} g_s

with scalar coefficients from log-space cumulative products of the gates. Each weight is
used as ``z = W x``, so its per-token gradient is an outer product ``g_s = delta_s x_s^T``
(delta the error signal at that layer's output). The in-chunk read of layer ``W_t`` on an
input ``x'_t`` is therefore (the dual form, an attention-like masked matmul)

    W_t x'_t = a_t W x'_t + s_t S x'_t + sum_s c_{ts} (x_s . x'_t) delta_s

With ``decay_to: init`` the same holds for ``W - home`` (the rule state's initial weights):
``W_t = home + a_t (W - home) + s_t S + sum c_{ts} g_s``. The chunk-end weights need one
matmul per layer: no weight copy per token is ever
materialised. The coefficients of every chunk of a call are computed at once (they depend
on the gates only), so each chunk dispatches just its matmuls and their element-wise glue.
The sequential reference is ``rules/momentum.py`` stepped by ``loops/sequential.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
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


def coefficients(lr: Tensor, beta: Tensor | None, decay: Tensor | None) -> dict[str, Tensor]:
    """The chunk's scalar coefficients, each over ``[B, H, n(, n)]``. ``decay`` None: the rule
    forgets nothing (HOPE's CMS levels), where ``keep`` is the causal mask and ``a`` is 1 -- the
    values the general path gives for a decay of 0, to the bit, without its ``n x n`` cumulative
    sum and exponential (at a period of 2,048 the largest tensors of the step)."""
    if decay is None:
        keep = torch.ones_like(lr).unsqueeze(-1).expand(*lr.shape, lr.shape[-1]).tril()
        a = torch.ones_like(lr)
    else:
        logf = safe_log(1 - decay)
        keep = torch.exp(segsum(logf))  # prod_{r=j+1..t} (1 - decay_r)
        a = torch.exp(torch.cumsum(logf, -1))  # prod_{r<=t} (1 - decay_r)
    if beta is None:
        return {"a": a, "c": -keep * lr.unsqueeze(-2)}
    logb = safe_log(beta)
    carry = torch.exp(segsum(logb))  # prod_{r=s+1..j} beta_r
    b0 = torch.exp(torch.cumsum(logb, -1))
    return {
        "a": a,
        "c": -(keep @ carry) * lr.unsqueeze(-2),
        "s": (keep @ b0.unsqueeze(-1)).squeeze(-1),
        "mc": -carry[..., -1, :] * lr,  # momentum at chunk end: sum_s mc_s g_s
        "mb": b0[..., -1],  # and b0_n S
    }


def chunk_coefficients(lr: Tensor, beta: Tensor | None, decay: Tensor | None,
                       sizes: list[int], dense: Callable[[int], bool] = lambda n: True) -> list[dict[str, Tensor]]:
    """``coefficients`` of consecutive spans of ``sizes`` tokens of the ``[B, H, T]`` gates, in
    the shapes ``_segment`` uses them: computed once per run of equal-length spans (every full
    chunk at once), not once per chunk, then unbound into one dict per span.

    A rule without forgetting or momentum has ``c_ts = -lr_s`` (``s <= t``): spans whose read
    needs no ``n x n`` matrix (``dense(n)`` false: a blocked read, or a read at the chunk start)
    get ``c_end = -lr`` alone, the values the matrix's last row holds, without building it."""
    runs = [(n, len(list(g))) for n, g in itertools.groupby(sizes)]
    gates = {k: g for k, g in (("lr", lr), ("beta", beta), ("decay", decay)) if g is not None}
    pieces = zip(*(split(g, [n * m for n, m in runs], -1) for g in gates.values()))
    out: list[dict[str, Tensor]] = []
    for (n, m), piece in zip(runs, pieces):
        g_r = {k: g.unflatten(-1, (m, n)) for k, g in zip(gates, piece)}  # [B, H, m, n]
        if len(g_r) == 1 and not dense(n):
            out.extend({"c_end": c} for c in (-g_r["lr"].unsqueeze(-1)).unbind(2))
            continue
        co = coefficients(g_r["lr"], g_r.get("beta"), g_r.get("decay"))
        shaped = {"c": co["c"], "c_end": co["c"][..., -1, :].unsqueeze(-1)}
        if "decay" in g_r:  # without forgetting, what is kept is all: no factor of 1 to multiply by
            shaped.update(a=co["a"].unsqueeze(-1), a_end=co["a"][..., -1, None, None])
        if "s" in co:
            shaped.update(s=co["s"].unsqueeze(-1), s_end=co["s"][..., -1, None, None],
                          mc=co["mc"].unsqueeze(-1), mb=co["mb"][..., None, None])
        out.extend(dict(zip(shaped, ts)) for ts in zip(*(t.unbind(2) for t in shaped.values())))
    return out


BLOCK = 64
"""Tokens per block of a long chunk's blocked read (``blocked_read``)."""


def run_dual(pb: MemoryProblem, state: MemoryState) -> tuple[Tensor, MemoryState]:
    has_m = "S" in state["opt"]
    spans = chunk_spans(pb, state)
    weights = [state["params"][layer.weight] for layer in pb.arch.layers]

    def dense(n: int) -> bool:  # whether a span of n tokens needs the n x n coefficients
        return not pb.read_start and not blocks_pay(n, weights)

    parts = dict(zip([t0 for t0, _ in spans], _chunk_inputs(pb, [t1 - t0 for t0, t1 in spans], has_m, dense)))
    step = chunk_step(pb, _segment)  # through torch.compile where pb.compiled (error signals, read, chunk end fused)
    return run_segments(pb, state, lambda p, o, a, t0, t1: step(pb, p, o, a, parts[t0], has_m))


ChunkInputs = tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]


def forgets_nothing(pb: MemoryProblem) -> bool:
    """The level's decay is absent or the constant 0 (a gate is a tensor: never taken as zero,
    which would need a host sync to check)."""
    decay = pb.hp.get("decay", 0.0)
    return not isinstance(decay, Tensor) and float(decay) == 0.0


def blocks_pay(n: int, weights: list[Tensor]) -> bool:
    """Whether a span of ``n`` tokens is read in blocks of ``BLOCK`` (``blocked_read``): at least
    two whole blocks, and each layer's per-block weights (``o x i`` per block) no larger than the
    ``n x n`` scores they replace. So long chunks of small memories (a slow CMS level on a CPU:
    period 2,048, 64 -> 128) are read in ``O(n o i)``, and a wide memory, whose per-block
    weights would outgrow the scores (HOPE's CMS at dim 512), keeps the dense read."""
    return n > BLOCK and n % BLOCK == 0 and all(w.shape[-1] * w.shape[-2] <= n * BLOCK for w in weights)


def blocked_read(a: Tensor, w: Tensor, x: Tensor, u: Tensor) -> Tensor:
    """``sum_{s<=t} (a_t . x_s) u_s + W a_t`` for every token ``t`` of a span, block by block: the
    dual read of a rule without forgetting or momentum (``u_s = -lr_s delta_s``), where token t
    reads ``W_t = W + sum_{s<=t} u_s x_s^T``. Each block of ``BLOCK`` tokens reads the weights
    updated by the blocks before it (one matmul per block) plus a masked ``BLOCK x BLOCK``
    product within itself: ``O(n o i + n BLOCK (o + i))`` where the dense read is
    ``O(n^2 (o + i))``. ``a``, ``x``: ``[B, H, n, i]``; ``u``: ``[B, H, n, o]``; ``w``: ``[B, H, o, i]``."""
    m = a.shape[-2] // BLOCK
    ab, xb, ub = (t.unflatten(-2, (m, BLOCK)) for t in (a, x, u))
    dw = ub.transpose(-1, -2) @ xb  # [B, H, m, o, i]: each block's update
    before = torch.cat([torch.zeros_like(dw[:, :, :1]), dw[:, :, :-1].cumsum(2)], 2)  # the blocks' before it
    z = ab @ (w.unsqueeze(2) + before).transpose(-1, -2) + (ab @ xb.transpose(-1, -2)).tril() @ ub
    return z.flatten(2, 3)


def _chunk_inputs(pb: MemoryProblem, sizes: list[int], has_m: bool,
                  dense: Callable[[int], bool]) -> Iterator[ChunkInputs]:
    """Every span's ``(q, k, v, coefficients)``, prepared for the whole call at once: one split
    per tensor (whose backward is one ``cat``, where a slice per chunk would cost a full-size
    zero gradient per chunk), q/k/v made contiguous once (so no matmul of a chunk copies them)."""
    stop = pb.grad.kind == "stop"
    q, k, v = pb.q, pb.k, pb.v
    lr = hp_tokens(pb, "lr")
    # no decay (absent or the constant 0): no forgetting coefficients to compute
    decay = None if forgets_nothing(pb) else hp_tokens(pb, "decay")
    beta = hp_tokens(pb, "beta") if has_m else None
    if stop:
        k, v, lr = k.detach(), v.detach(), lr.detach()
        decay = decay.detach() if decay is not None else None
        beta = beta.detach() if beta is not None else None
    cos = chunk_coefficients(lr, beta, decay, sizes, dense)
    if pb.max_gain is not None:  # each token's own rate: its chunk gain is held at max_gain
        for co, rate in zip(cos, split(lr, sizes, 2)):
            co["rate"] = rate
    qs, ks, vs = (split(x.contiguous(), sizes, 2) for x in (q, k, v))
    return zip(qs, ks, vs, cos)


def _segment(
    pb: MemoryProblem, params: Params, opt: dict[str, Any], anchor: Params, part: ChunkInputs, has_m: bool,
) -> tuple[Tensor, Params, dict[str, Any]]:
    stop = pb.grad.kind == "stop"
    q, k, v, co = part

    # 1. error signals and layer inputs at the chunk-start state, one batched pass
    deltas, inputs = chunk_signals(pb, anchor, k, v, co.get("rate"))
    S = opt.get("S", {})
    home: Params | None = opt.get("home")  # decay_to: init forgets toward it (W - home decays)
    bias_of = {layer.weight: layer.bias for layer in pb.arch.layers}

    forgets = "a" in co  # no decay: every ``kept`` is ``w`` itself (one full-size pass fewer per weight)

    def kept(c: Tensor | None, w: Tensor, h: Tensor | None) -> Tensor:
        """What forgetting leaves of ``w`` (or of a product linear in it, ``h`` the same product
        of home): ``c w``, or ``h + c (w - h)`` with ``decay_to: init``; ``w`` where nothing is
        forgotten (``c`` None)."""
        if c is None:
            return w
        return c * w if h is None else h + c * (w - h)

    # 2. the dual read: every token with its own in-chunk weights, via masked matmuls
    def read(name: str, w: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
        x, d = inputs[name], deltas[name]
        if "c" not in co:  # a long chunk, no forgetting or momentum: read block by block
            u = d * co["c_end"]
            z = blocked_read(a, w, x, u)
            bn = bias_of[name]
            return z if b is None or bn is None else z + b.unsqueeze(-2) + u.cumsum(-2)
        scores = (a @ x.transpose(-1, -2)) * co["c"]  # [B,H,n,n]
        at_home = None if home is None or not forgets else a @ home[name].transpose(-1, -2)
        z = kept(co.get("a"), a @ w.transpose(-1, -2), at_home) + scores @ d
        if has_m:
            z = z + co["s"] * (a @ S[name].transpose(-1, -2))
        bn = bias_of[name]
        if b is not None and bn is not None:
            z = z + kept(co.get("a"), b.unsqueeze(-2), None if home is None else home[bn].unsqueeze(-2)) + co["c"] @ d
            if has_m:
                z = z + co["s"] * S[bn].unsqueeze(-2)
        return z

    cur = detach_tree(params) if stop else params
    if pb.read_start:  # weights constant within the chunk: a plain read at its start
        y = pb.arch.apply(detach_tree(anchor) if stop else anchor, q)
    else:
        y = pb.arch.apply(cur, q, read)

    # 3. chunk-end state: one matmul per layer (coefficients shaped [B,H,n,1] / [B,H,1,1])
    new_p: Params = {}
    new_S: Params = {}
    for layer in pb.arch.layers:
        n, x, d = layer.weight, inputs[layer.weight], deltas[layer.weight]
        new_p[n] = kept(co.get("a_end"), cur[n], None if home is None else home[n]) + (d * co["c_end"]).transpose(-1, -2) @ x
        if has_m:
            new_p[n] = new_p[n] + co["s_end"] * S[n]
            new_S[n] = co["mb"] * S[n] + (d * co["mc"]).transpose(-1, -2) @ x
        if layer.bias is not None:  # the same over [B,H,o]
            bn = layer.bias
            new_p[bn] = (kept(co["a_end"][..., 0] if forgets else None, cur[bn], None if home is None else home[bn])
                         + weighted_sum(co["c_end"][..., 0], d))
            if has_m:
                new_p[bn] = new_p[bn] + co["s_end"][..., 0] * S[bn]
                new_S[bn] = co["mb"][..., 0] * S[bn] + weighted_sum(co["mc"][..., 0], d)
    new_opt: dict[str, Any] = {"S": new_S} if has_m else {}
    if home is not None:
        new_opt["home"] = home
    return y, new_p, new_opt


def weighted_sum(c: Tensor, d: Tensor) -> Tensor:
    """``sum_s c_s d_s``: ``[B,H,n] x [B,H,n,o] -> [B,H,o]``."""
    return (c.unsqueeze(-2) @ d).squeeze(-2)
