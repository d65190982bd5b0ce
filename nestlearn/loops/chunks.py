"""The chunk machinery every executor shares: where chunks start, the chunk loop, gate algebra.

- ``segments``: the spans of one call that lie in one chunk, given the carried offset;
- ``run_segments``: the chunk loop (anchor moves, ``stop`` / ``truncate:N`` cut the graph, the
  position within the chunk carries across calls), around a per-span step;
- ``segsum`` / ``masks`` / ``identity`` / ``safe_log``: the log-space products of gates the
  closed forms are built from;
- ``per_token``: one hyper-parameter (float or tensor) as ``[B, H, T]``;
- ``chunk_signals``: every layer's error signal and input at the chunk-start state, in one pass
  (the closed forms' inner gradients, ``delta x^T`` per weight);
- ``traceable_step`` / ``keep_saved``: what torch.compile and ``remat`` need to know;
  ``chunk_step``: the eager or the compiled chunk step of a problem (``MemoryProblem.compiled``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from nestlearn.loops.common import MemoryProblem, MemoryState, Params, detach_tree
from nestlearn.memories.base import MemoryArch, plain_lin
from nestlearn.objectives import BUILTIN, error_signal


def segments(offset: int, period: int, total: int) -> Iterator[tuple[int, int]]:
    """Spans ``[t0, t1)`` of this call that lie in one chunk, given the carried offset."""
    t0 = 0
    while t0 < total:
        t1 = min(total, t0 + period - offset)
        yield t0, t1
        offset = 0
        t0 = t1


SegmentStep = Callable[[Params, dict[str, Any], Params, int, int], tuple[Tensor, Params, dict[str, Any]]]


def run_segments(pb: MemoryProblem, state: MemoryState, step: SegmentStep) -> tuple[Tensor, MemoryState]:
    """The chunk loop every executor shares: ``step(params, opt, anchor, t0, t1)`` handles the
    span ``[t0, t1)`` of one chunk; the anchor moves (and ``stop`` / ``truncate:N`` cut the
    graph) at chunk starts, and the position within the chunk carries across calls."""
    stop = pb.grad.kind == "stop"
    params, opt, anchor = state["params"], state["opt"], state["anchor"]
    offset, chunks = state["offset"], state["chunks"]
    ys = []
    for t0, t1 in segments(offset, pb.period, pb.q.shape[2]):
        if offset == 0:
            if stop or pb.grad.cuts_at(chunks):
                params, opt = detach_tree(params), detach_tree(opt)
            anchor = params
            chunks += 1
        y, params, opt = step(params, opt, anchor, t0, t1)
        ys.append(y)
        offset = (offset + t1 - t0) % pb.period
    return torch.cat(ys, dim=2), MemoryState(params=params, opt=opt, anchor=anchor, offset=offset, chunks=chunks)


RunFn = Callable[[MemoryProblem, MemoryState], tuple[Tensor, MemoryState]]


def on_whole_chunks(pb: MemoryProblem, state: MemoryState,
                    kernel: Callable[[MemoryProblem, MemoryState], tuple[Tensor, MemoryState] | None],
                    closed_form: RunFn) -> tuple[Tensor, MemoryState]:
    """``closed_form``'s result with the whole chunks on ``kernel`` (a fused kernel runs whole
    chunks from a chunk boundary): the rest of a chunk already begun (a carried ``offset``) first
    and a trailing partial chunk last go to ``closed_form``, so any call is exact. ``kernel`` may
    return None (it cannot run here): its part and the rest then go to ``closed_form`` too."""
    n, t = pb.period, pb.q.shape[2]
    head = min(t, (-state["offset"]) % n)
    whole = (t - head) // n * n
    if whole == 0:
        return closed_form(pb, state)
    ys = []
    if head:
        y, state = closed_form(pb.slice(0, head), state)
        ys.append(y)
    done = kernel(pb.slice(head, head + whole), state)
    rest = head if done is None else head + whole
    if done is not None:
        y, state = done
        ys.append(y)
    if rest < t:
        y, state = closed_form(pb.slice(rest, t), state)
        ys.append(y)
    return (ys[0] if len(ys) == 1 else torch.cat(ys, 2)), state


def chunk_spans(pb: MemoryProblem, state: MemoryState) -> list[tuple[int, int]]:
    """``segments`` of ``pb``'s tokens from ``state``'s offset."""
    return list(segments(state["offset"], pb.period, pb.q.shape[2]))


def split(x: Tensor, sizes: list[int], dim: int) -> tuple[Tensor, ...]:
    """``x.split(sizes, dim)``, or ``(x,)`` for one piece (no split node in the graph)."""
    return x.split(sizes, dim) if len(sizes) > 1 else (x,)


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


def safe_log(x: Tensor) -> Tensor:
    """``log(x)`` with ``x`` floored at 1e-30 (a gate of exactly 0 gives a finite log)."""
    return torch.log(x.clamp_min(1e-30))


def per_token(h: Tensor | float, ref: Tensor) -> Tensor:
    """A hyper-parameter (a float, a ``[B, H, T]`` tensor or one with fewer trailing dims, e.g.
    a chunk gate ``[B, H]``) as ``[B, H, T]`` like ``ref``, in ``ref``'s dtype."""
    if isinstance(h, Tensor):
        h = h.to(ref.dtype)
        if h.dim() == 3:
            return h.expand_as(ref)
        return h.reshape(h.shape + (1,) * (3 - h.dim())).expand_as(ref)
    return torch.full_like(ref, float(h))


def hp_tokens(pb: MemoryProblem, name: str) -> Tensor:
    """Hyper-parameter ``name`` of ``pb`` (0 where it has none) over all of its tokens, ``[B, H, T]``."""
    return per_token(pb.hp.get(name, 0.0), pb.q[..., 0])


def gain_rates(pb: MemoryProblem, sl: slice | int) -> Tensor | None:
    """The ``lr`` of tokens ``sl`` (``[B, H, n]``, or ``[B, H]`` for one index) where the level
    has a ``max_gain`` (which scales each token by its own rate); None elsewhere."""
    return None if pb.max_gain is None else hp_tokens(pb, "lr")[:, :, sl]


def chunk_signals(pb: MemoryProblem, anchor: Params, k: Tensor, v: Tensor,
                  rate: Tensor | None = None) -> tuple[Params, Params]:
    """Every layer's error signal ``dL/dz`` and input at the chunk-start state, for all of the
    chunk's tokens in one batched pass: ``(deltas, inputs)`` keyed by weight name.

    With the level's ``clip`` or ``max_gain``, the signals are scaled per token by
    ``common.TokenScale`` (the token's whole gradient, ``delta x^T`` per weight and ``delta``
    per bias, clipped to the norm ``clip``; its chunk gain held at ``max_gain``, which needs the
    chunk's rates ``rate``, ``[B, H, n]``): the same scaling as ``common.scale_grads`` on the
    gradients themselves."""
    deltas, inputs, err = _signals(pb, anchor, k, v)
    if not pb.token_scale:
        return deltas, inputs
    sq_signal = None if pb.max_gain is None else err.pow(2).sum(-1)
    f = pb.token_scale.factor(token_sq_norm(pb.arch, deltas, inputs, anchor), sq_signal, rate)
    assert f is not None
    return {n: d * f.unsqueeze(-1) for n, d in deltas.items()}, inputs


def token_sq_norm(arch: MemoryArch, deltas: Params, inputs: Params, params: Params) -> Tensor:
    """Each token's whole inner gradient's squared norm, ``[B, H, n]``, from its signals:
    ``|delta|^2 |x|^2`` per weight (``delta x^T``), ``|delta|^2`` per bias present in ``params``."""
    sq: Tensor | float = 0.0
    for layer in arch.layers:
        d2 = deltas[layer.weight].pow(2).sum(-1)  # [B, H, n]
        sq = sq + d2 * inputs[layer.weight].pow(2).sum(-1)
        if layer.bias is not None and layer.bias in params:
            sq = sq + d2
    assert isinstance(sq, Tensor)
    return sq


def _signals(pb: MemoryProblem, anchor: Params, k: Tensor, v: Tensor) -> tuple[Params, Params, Tensor]:
    """``(deltas, inputs, dL/dpred)`` at ``anchor`` (``chunk_signals``)."""
    stop = pb.grad.kind == "stop"
    # a graph for the inner gradient only where the caller records one: under no_grad
    # (evaluation) a retained inner graph is never freed by an outer backward, and the saved
    # tensors ``keep_saved`` holds as themselves (an op's output saved by its own node, e.g.
    # rsqrt's) form reference cycles through autograd that Python's gc cannot see: every
    # evaluation forward leaked its inner graphs (Titans-MAG, 1.9 GB a forward on the GPU)
    create = pb.grad.create_graph and not stop and torch.is_grad_enabled()
    src = detach_tree(anchor) if stop else anchor
    seen: list[Tensor] = []

    def dloss(pred: Tensor) -> Tensor:
        seen.append(error_signal(pb.objective, pred, v, create))
        return seen[-1]

    if pb.objective in BUILTIN.values():  # an explicit backward where the memory has one
        with torch.set_grad_enabled(torch.is_grad_enabled() and create):
            sig = pb.arch.error_signals(src, k, dloss)
        if sig is not None:
            return (*sig, seen[-1]) if create else (detach_tree(sig[0]), detach_tree(sig[1]), seen[-1].detach())
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
        err = dloss(pred)  # dL/dpred (in closed form for the built-in objectives)
        grads = torch.autograd.grad(pred, wrt, err, create_graph=create)
        deltas = dict(zip(names, grads))
    if not create:
        deltas, inputs, err = detach_tree(deltas), detach_tree(inputs), err.detach()
    return deltas, inputs, err


def _keep(t: Tensor) -> Tensor:
    return t


def keep_saved() -> AbstractContextManager[Any]:
    """Saved tensors kept as they are, even inside a ``remat`` checkpoint: for a graph that an
    ``autograd.grad`` inside the forward unpacks at once (a checkpointed save would make every
    such unpack re-run the whole group's forward).

    Only where other saved-tensor hooks are active (a checkpoint): elsewhere there is nothing to
    override, and a pack hook that returns its tensor ties an op's output saved by its own node
    (e.g. rsqrt's) to that node: a reference cycle through autograd that Python's gc cannot free,
    so a forward dropped without a backward leaked its whole graph (``tests/test_no_leak.py``)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # private: checked
    if top is not None and top(False) is None:
        return nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)


def traceable_step(pb: MemoryProblem) -> bool:
    """The chunk step differentiates nothing itself (built-in objective, a memory with an
    explicit backward), so torch.compile can take it whole; elsewhere its inner
    ``autograd.grad`` would lose the inner-gradient graph under dynamo."""
    return pb.objective in BUILTIN.values() and type(pb.arch).error_signals is not MemoryArch.error_signals


StepFn = Callable[..., tuple[Tensor, Params, dict[str, Any]]]


def chunk_step(pb: MemoryProblem, eager: StepFn) -> StepFn:
    """The chunk step that runs ``pb``: ``eager`` through torch.compile where the problem asks
    for it (``pb.compiled``) and the step can be traced (``traceable_step``); ``eager`` itself
    elsewhere (under dynamo the inner ``autograd.grad`` of other problems loses its graph)."""
    return compiled(eager) if pb.compiled and traceable_step(pb) else eager


@functools.cache
def compiled(eager: StepFn) -> StepFn:
    """``eager`` through ``torch.compile``, built once per function and shared by every problem
    that asks for it: its element-wise work fuses into a few kernels. One compile per variant
    (chunk length, grad mode, first / later chunk, ... per level), so dynamo's recompile limit
    is raised to 64 for it."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if isinstance(getattr(dynamo_config, name, None), int):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    return torch.compile(eager, dynamic=False)  # type: ignore[no-any-return]
