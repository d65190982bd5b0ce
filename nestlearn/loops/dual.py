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

and the chunk-end weights need one matmul per layer: no weight copy per token is ever
materialised. The coefficients of every chunk of a call are computed at once (they depend
on the gates only), so each chunk dispatches just its matmuls and their element-wise glue.
The sequential reference is ``rules/momentum.py`` stepped by ``loops/sequential.py``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from nestlearn.loops.chunked import segments
from nestlearn.loops.common import MemoryProblem, Params, clip_factor, detach_tree, weighted_sum
from nestlearn.memories.base import MemoryArch, plain_lin
from nestlearn.objectives import BUILTIN, error_signal


def segsum(x: Tensor) -> Tensor:
    """``out[..., t, j] = sum_{r=j+1..t} x[..., r]`` for j <= t, ``-inf`` above the diagonal.

    Built by a masked cumulative sum (no subtraction of large numbers, exact zeros where a
    factor is zero)."""
    n = x.shape[-1]
    xx = x.unsqueeze(-1).expand(*x.shape, n)  # [..., r, j] = x_r
    not_below, above = masks(n, x.device)
    seg = xx.masked_fill(not_below, 0.0).cumsum(-2)
    return seg.masked_fill(above, float("-inf"))


@functools.lru_cache(maxsize=64)
def masks(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(r <= j, j > t)`` over an ``n x n`` chunk: built once per size and device, not per chunk."""
    ones = torch.ones(n, n, dtype=torch.bool, device=device)
    return ~ones.tril(-1), ~ones.tril(0)


@functools.lru_cache(maxsize=64)
def identity(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.eye(n, dtype=dtype, device=device)


def _log(x: Tensor) -> Tensor:
    return torch.log(x.clamp_min(1e-30))


def coefficients(lr: Tensor, beta: Tensor | None, decay: Tensor) -> dict[str, Tensor]:
    """The chunk's scalar coefficients, each over ``[B, H, n(, n)]``."""
    logf = _log(1 - decay)
    keep = torch.exp(segsum(logf))  # prod_{r=j+1..t} (1 - decay_r)
    a = torch.exp(torch.cumsum(logf, -1))  # prod_{r<=t} (1 - decay_r)
    if beta is None:
        return {"a": a, "c": -keep * lr.unsqueeze(-2)}
    logb = _log(beta)
    carry = torch.exp(segsum(logb))  # prod_{r=s+1..j} beta_r
    b0 = torch.exp(torch.cumsum(logb, -1))
    return {
        "a": a,
        "c": -(keep @ carry) * lr.unsqueeze(-2),
        "s": (keep @ b0.unsqueeze(-1)).squeeze(-1),
        "mc": -carry[..., -1, :] * lr,  # momentum at chunk end: sum_s mc_s g_s
        "mb": b0[..., -1],  # and b0_n S
    }


def chunk_coefficients(lr: Tensor, beta: Tensor | None, decay: Tensor, sizes: list[int]) -> list[dict[str, Tensor]]:
    """``coefficients`` of consecutive spans of ``sizes`` tokens of the ``[B, H, T]`` gates, in
    the shapes ``_segment`` uses them: computed once per run of equal-length spans (every full
    chunk at once), not once per chunk, then unbound into one dict per span."""
    runs = [(n, len(list(g))) for n, g in itertools.groupby(sizes)]
    gates = [g for g in (lr, beta, decay) if g is not None]
    pieces = zip(*(_split(g, [n * m for n, m in runs], -1) for g in gates))
    out: list[dict[str, Tensor]] = []
    for (n, m), piece in zip(runs, pieces):
        lr_r, *beta_r, decay_r = (g.unflatten(-1, (m, n)) for g in piece)  # [B, H, m, n]
        co = coefficients(lr_r, beta_r[0] if beta_r else None, decay_r)
        shaped = {"a": co["a"].unsqueeze(-1), "c": co["c"], "c_end": co["c"][..., -1, :].unsqueeze(-1),
                  "a_end": co["a"][..., -1, None, None]}
        if "s" in co:
            shaped.update(s=co["s"].unsqueeze(-1), s_end=co["s"][..., -1, None, None],
                          mc=co["mc"].unsqueeze(-1), mb=co["mb"][..., None, None])
        out.extend(dict(zip(shaped, ts)) for ts in zip(*(t.unbind(2) for t in shaped.values())))
    return out


def run_dual(pb: MemoryProblem, state: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    has_m = "S" in state["opt"]
    spans = list(segments(state["offset"], pb.period, pb.q.shape[2]))
    parts = dict(zip([t0 for t0, _ in spans], _chunk_inputs(pb, [t1 - t0 for t0, t1 in spans], has_m)))
    step = _compiled_segment if _compiled_segment is not None and traceable_step(pb) else _segment
    return run_segments(pb, state, lambda p, o, a, t0, t1: step(pb, p, o, a, parts[t0], has_m))


_compiled_segment: Callable[..., tuple[Tensor, Params, dict[str, Any]]] | None = None


def compile_chunk_steps(enabled: bool = True) -> None:
    """Run this executor's chunk step (error signals, dual read, chunk-end state) through
    ``torch.compile``: its element-wise work fuses into a few kernels. Possible because the
    step differentiates nothing itself where the memory has an explicit backward
    (``MemoryArch.error_signals``) and the objective is built in (``traceable_step``); other
    problems keep the eager step (under dynamo their inner ``autograd.grad`` loses its graph).
    One compile per variant (chunk length, grad mode, ...; dynamo's recompile limit is raised
    to 64 for that). The DGD closed form's chunk step (``dgd_dual``: HOPE's self-modifying
    memory) is switched with it. ``nestlearn run --compile`` turns both on."""
    from nestlearn.loops import dgd_dual

    global _compiled_segment
    if enabled:  # one variant per chunk length, grad mode, first/later chunk, ... per level
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if isinstance(getattr(dynamo_config, name, None), int):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    _compiled_segment = torch.compile(_segment, dynamic=False) if enabled else None
    dgd_dual.compiled_segment = torch.compile(dgd_dual._segment, dynamic=False) if enabled else None


SegmentStep = Callable[[Params, dict[str, Any], Params, int, int], tuple[Tensor, Params, dict[str, Any]]]
ChunkInputs = tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]


def _chunk_inputs(pb: MemoryProblem, sizes: list[int], has_m: bool) -> Iterator[ChunkInputs]:
    """Every span's ``(q, k, v, coefficients)``, prepared for the whole call at once: one split
    per tensor (whose backward is one ``cat``, where a slice per chunk would cost a full-size
    zero gradient per chunk), q/k/v made contiguous once (so no matmul of a chunk copies them)."""
    stop = pb.grad.kind == "stop"
    q, k, v = pb.q, pb.k, pb.v
    lr, decay = _hp_all(pb, "lr", q), _hp_all(pb, "decay", q)
    beta = _hp_all(pb, "beta", q) if has_m else None
    if stop:
        k, v, lr, decay = k.detach(), v.detach(), lr.detach(), decay.detach()
        beta = beta.detach() if beta is not None else None
    cos = chunk_coefficients(lr, beta, decay, sizes)
    qs, ks, vs = (_split(x.contiguous(), sizes, 2) for x in (q, k, v))
    return zip(qs, ks, vs, cos)


def _split(x: Tensor, sizes: list[int], dim: int) -> tuple[Tensor, ...]:
    return x.split(sizes, dim) if len(sizes) > 1 else (x,)


def run_segments(pb: MemoryProblem, state: dict[str, Any], step: SegmentStep) -> tuple[Tensor, dict[str, Any]]:
    """The chunk loop every closed-form executor shares: ``step(params, opt, anchor, t0, t1)``
    handles the span ``[t0, t1)`` of one chunk; the anchor moves (and ``stop`` / ``truncate:N``
    cut the graph) at chunk starts, and the position within the chunk carries across calls."""
    stop = pb.grad.kind == "stop"
    params, opt, anchor = state["params"], state["opt"], state["anchor"]
    offset, chunks = state["offset"], state["chunks"]
    ys = []
    for t0, t1 in segments(offset, pb.period, pb.q.shape[2]):
        if offset == 0:
            if stop or (pb.grad.kind == "truncate" and chunks > 0 and chunks % pb.grad.n == 0):
                params, opt = detach_tree(params), detach_tree(opt)
            anchor = params
            chunks += 1
        y, params, opt = step(params, opt, anchor, t0, t1)
        ys.append(y)
        offset = (offset + t1 - t0) % pb.period
    new_state = {"params": params, "opt": opt, "anchor": anchor, "offset": offset, "chunks": chunks}
    return torch.cat(ys, dim=2), new_state


def chunk_signals(pb: MemoryProblem, anchor: Params, k: Tensor, v: Tensor) -> tuple[Params, Params]:
    """Every layer's error signal ``dL/dz`` and input at the chunk-start state, for all of the
    chunk's tokens in one batched pass: ``(deltas, inputs)`` keyed by weight name.

    With the level's ``clip``, the signals are scaled per token so that the token's whole
    gradient (``delta x^T`` per weight, ``delta`` per bias) has at most that norm: the same
    clip as ``common.clip_grads`` on the gradients themselves."""
    deltas, inputs = _signals(pb, anchor, k, v)
    if pb.clip is None:
        return deltas, inputs
    sq: Tensor | float = 0.0
    for layer in pb.arch.layers:
        d2 = deltas[layer.weight].pow(2).sum(-1)  # [B, H, n]
        sq = sq + d2 * inputs[layer.weight].pow(2).sum(-1)
        if layer.bias is not None and layer.bias in anchor:
            sq = sq + d2
    f = clip_factor(sq, pb.clip).unsqueeze(-1)  # type: ignore[arg-type]
    return {n: d * f for n, d in deltas.items()}, inputs


def _signals(pb: MemoryProblem, anchor: Params, k: Tensor, v: Tensor) -> tuple[Params, Params]:
    stop = pb.grad.kind == "stop"
    create = pb.grad.create_graph and not stop
    src = detach_tree(anchor) if stop else anchor
    if pb.objective in BUILTIN.values():  # an explicit backward where the memory has one
        with torch.set_grad_enabled(torch.is_grad_enabled() and create):
            sig = pb.arch.error_signals(src, k, lambda pred: error_signal(pb.objective, pred, v, create))
        if sig is not None:
            return sig if create else (detach_tree(sig[0]), detach_tree(sig[1]))
    inputs: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}
    # The tensors this inner graph saves are kept as they are even inside a level's ``remat``
    # checkpoint: the autograd.grad below unpacks them at once, and a checkpointed save would
    # make every such unpack re-run the whole group's forward (quadratic work and memory).
    with torch.enable_grad(), keep_saved():
        def record(name: str, w: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
            z = plain_lin(name, w, a, b)
            if not z.requires_grad:
                z = z.detach().requires_grad_()
            inputs[name], outs[name] = a, z
            return z

        pred = pb.arch.apply(src, k, record)
        names = [layer.weight for layer in pb.arch.layers]
        wrt = [outs[n] for n in names]
        if pb.objective in BUILTIN.values():  # dL/dpred in closed form: no loss, no seed, fewer ops
            err = error_signal(pb.objective, pred, v, create)
            grads = torch.autograd.grad(pred, wrt, err, create_graph=create)
        else:
            grads = torch.autograd.grad(pb.objective(pred, v).sum(), wrt, create_graph=create)
        deltas = dict(zip(names, grads))
    if not create:
        deltas, inputs = detach_tree(deltas), detach_tree(inputs)
    return deltas, inputs


def _keep(t: Tensor) -> Tensor:
    return t


def keep_saved() -> torch.autograd.graph.saved_tensors_hooks:
    """Saved tensors kept as they are, even inside a ``remat`` checkpoint: for a graph that an
    ``autograd.grad`` inside the forward unpacks at once (a checkpointed save would make every
    such unpack re-run the whole group's forward)."""
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)


def traceable_step(pb: MemoryProblem) -> bool:
    """The chunk step differentiates nothing itself (built-in objective, a memory with an
    explicit backward), so torch.compile can take it whole; elsewhere its inner
    ``autograd.grad`` would lose the inner-gradient graph under dynamo."""
    return pb.objective in BUILTIN.values() and type(pb.arch).error_signals is not MemoryArch.error_signals


def _segment(
    pb: MemoryProblem, params: Params, opt: dict[str, Any], anchor: Params, part: ChunkInputs, has_m: bool,
) -> tuple[Tensor, Params, dict[str, Any]]:
    stop = pb.grad.kind == "stop"
    q, k, v, co = part

    # 1. error signals and layer inputs at the chunk-start state, one batched pass
    deltas, inputs = chunk_signals(pb, anchor, k, v)
    S = opt.get("S", {})
    bias_of = {layer.weight: layer.bias for layer in pb.arch.layers}

    # 2. the dual read: every token with its own in-chunk weights, via masked matmuls
    def read(name: str, w: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
        x, d = inputs[name], deltas[name]
        scores = (a @ x.transpose(-1, -2)) * co["c"]  # [B,H,n,n]
        z = co["a"] * (a @ w.transpose(-1, -2)) + scores @ d
        if has_m:
            z = z + co["s"] * (a @ S[name].transpose(-1, -2))
        bn = bias_of[name]
        if b is not None and bn is not None:
            z = z + co["a"] * b.unsqueeze(-2) + co["c"] @ d
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
        new_p[n] = co["a_end"] * cur[n] + (d * co["c_end"]).transpose(-1, -2) @ x
        if has_m:
            new_p[n] = new_p[n] + co["s_end"] * S[n]
            new_S[n] = co["mb"] * S[n] + (d * co["mc"]).transpose(-1, -2) @ x
        if layer.bias is not None:  # the same over [B,H,o]
            bn = layer.bias
            new_p[bn] = co["a_end"][..., 0] * cur[bn] + weighted_sum(co["c_end"][..., 0], d)
            if has_m:
                new_p[bn] = new_p[bn] + co["s_end"][..., 0] * S[bn]
                new_S[bn] = co["mb"][..., 0] * S[bn] + weighted_sum(co["mc"][..., 0], d)
    return y, new_p, ({"S": new_S} if has_m else {})


def _hp_all(pb: MemoryProblem, name: str, like: Tensor) -> Tensor:
    """Hyper-parameter ``name`` over all of ``like``'s tokens, ``[B, H, T]``."""
    h = pb.hp.get(name, 0.0)
    shape = like.shape[:-1]
    if isinstance(h, Tensor):
        return h if h.dim() == 3 else h.reshape(h.shape + (1,)).expand(shape)
    return torch.full(shape, float(h), dtype=like.dtype, device=like.device)


def _hp(pb: MemoryProblem, name: str, t0: int, t1: int, like: Tensor) -> Tensor:
    h = pb.hp.get(name, 0.0)
    ref = like[..., 0]  # [B, H, n]
    if isinstance(h, Tensor):
        return (h[..., t0:t1] if h.dim() == 3 else h.reshape(h.shape + (1,))).expand_as(ref)
    return torch.full_like(ref, float(h))


def _scale(c: Tensor, p: Tensor) -> Tensor:
    return c.reshape(c.shape + (1,) * (p.dim() - c.dim())) * p
