"""What every executor shares: the carried state of one memory, gradient modes, inputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, TypedDict

import torch
from torch import Tensor

from nestlearn.memories.base import MemoryArch
from nestlearn.objectives import Objective
from nestlearn.rules.base import Rule

Params = dict[str, Tensor]


@dataclass(frozen=True)
class GradMode:
    """How the outer loss sees the inner updates: ``unroll`` (exact), ``first_order`` (inner
    gradients are constants), ``stop`` (the fast state is a constant; reads still
    differentiate through queries) or ``truncate:N`` (at most N consecutive updates)."""

    kind: str = "unroll"
    n: int = 0

    @classmethod
    def parse(cls, text: str) -> GradMode:
        if text.startswith("truncate:"):
            return cls("truncate", int(text.split(":", 1)[1]))
        return cls(text)

    @property
    def create_graph(self) -> bool:
        return self.kind in ("unroll", "truncate")

    def cuts_at(self, chunks: int) -> bool:
        """Whether ``truncate:N`` cuts the graph before a chunk, ``chunks`` chunks into the stream."""
        return self.kind == "truncate" and chunks > 0 and chunks % self.n == 0


@dataclass
class MemoryProblem:
    """One memory's inner problem over a span of tokens. Tensors are ``[B, H, T, d]``; each
    hyper-parameter is a ``[B, H, T]`` tensor or a float."""

    arch: MemoryArch
    rule: Rule
    objective: Objective
    q: Tensor
    k: Tensor
    v: Tensor
    hp: Mapping[str, Tensor | float]
    period: int
    grad: GradMode
    level: str = ""
    """The level's name (for diagnostics: ``loops/stats.py``)."""
    read_start: bool = False
    """Read every token with its chunk-start state (the level's ``read: chunk_start``)."""
    chunk: int | None = None
    """Compute chunk of a period-1 parallel form (the level's ``chunk:``); None: the executor's default."""
    remat: int | None = None
    """Recompute the backward per group of this many chunks (the level's ``remat:``; ``loops/remat.py``)."""
    clip: float | None = None
    """Clip each token's inner gradient (per sequence and head, over all of the memory's fast
    weights) to this norm before the rule sees it (the level's ``clip:``; ``clip_factor``)."""
    max_gain: float | None = None
    """Scale each token's inner gradient so that its chunk gain ``gain_steps * lr_t * c_t`` is at
    most this (the level's ``max_gain:``; ``gain_factor``)."""
    gain_steps: float = 1.0
    """``S(C, beta)`` of ``max_gain``: the chunk's accumulated step in units of one gradient (the
    level's period, its momentum's largest value; ``stability.accumulated_step``)."""

    @property
    def token_scale(self) -> TokenScale:
        return TokenScale(self.clip, self.max_gain, self.gain_steps)
    compiled: bool = False
    """Run the executor's chunk step through torch.compile where it can be traced
    (``chunks.chunk_step``; the executor table's ``compilable`` rows honour it): the level's
    ``compile_chunk_steps``, which ``nestlearn run --compile`` turns on. Off by default."""

    def slice(self, t0: int, t1: int) -> MemoryProblem:
        """The same problem over tokens ``[t0, t1)``."""
        sl = slice(t0, t1)
        return replace(self, q=self.q[:, :, sl], k=self.k[:, :, sl], v=self.v[:, :, sl], hp=hp_at(self.hp, sl))


class MemoryState(TypedDict):
    """What one memory carries from call to call (a plain dict: checkpoints and pytrees see it as one)."""

    params: Params
    """The fast weights, ``[B, H, ...]`` each."""
    opt: dict[str, Any]
    """The rule's state."""
    anchor: Params
    """The state at the current chunk's start (every gradient of the chunk is taken there)."""
    offset: int
    """Tokens of the current chunk already taken (0: the next token starts a chunk)."""
    chunks: int
    """Chunks started so far (``truncate:N`` cuts every N)."""


def clip_factor(sq_norm: Tensor, clip: float) -> Tensor:
    """``min(1, clip / ||g||)`` from ``||g||^2``: the scale that clips a gradient to norm ``clip``.

    Written as ``clip * rsqrt(max(||g||^2, clip^2))`` so that its derivative is finite at
    ``g = 0`` (the outer loss differentiates through it where it clips, and sees 1 elsewhere)."""
    return clip * torch.rsqrt(sq_norm.clamp_min(clip * clip))


def token_gain(sq_norm: Tensor, sq_signal: Tensor, rate: Tensor, steps: float) -> Tensor:
    """Each token's chunk gain ``steps * rate * c`` from its gradient's squared norm ``||g||^2``
    and its error signal's ``||dL/dpred||^2``: ``c = ||g||^2 / ||dL/dpred||^2`` is the memory's
    curvature along the token's own error (``g = J^T dL/dpred``, so ``c = e^T J J^T e / ||e||^2``:
    ``|k|^2`` for a linear memory, ``|h|^2 + |k|^2 |D W1^T e|^2 / |e|^2`` for a two-layer MLP). For
    the ``l2`` objective one step multiplies that error by ``1 - 2 rate c``, and a chunk pushing
    one way by ``1 - 2 steps rate c``, which overshoots past a gain of 1 (``stability.py``). A
    token with no error has no curvature to bound (gain 0)."""
    return steps * rate * sq_norm / sq_signal.clamp_min(torch.finfo(sq_norm.dtype).tiny)


def gain_factor(sq_norm: Tensor, sq_signal: Tensor, rate: Tensor, steps: float, max_gain: float) -> Tensor:
    """``min(1, max_gain / token_gain)`` per token: the scale that holds the token's chunk gain at
    ``max_gain``. Differentiable (the outer loss sees the cap)."""
    return max_gain / token_gain(sq_norm, sq_signal, rate, steps).clamp_min(max_gain)


@dataclass(frozen=True)
class TokenScale:
    """A level's per-token bounds on its inner gradients: ``clip`` (the norm) and ``max_gain``
    (the chunk gain, with ``steps = S(C, beta)``)."""

    clip: float | None = None
    max_gain: float | None = None
    steps: float = 1.0

    def __bool__(self) -> bool:
        return self.clip is not None or self.max_gain is not None

    def factor(self, sq_norm: Tensor, sq_signal: Tensor | None, rate: Tensor | None) -> Tensor | None:
        """What each token's inner gradient is multiplied by: the clip, then the gain cap on the
        clipped step (None where the level has neither). ``sq_norm``: the token's whole
        gradient's squared norm; ``sq_signal``: ``||dL/dpred||^2``; ``rate``: its ``lr`` (both
        needed only with ``max_gain``)."""
        f = None if self.clip is None else clip_factor(sq_norm, self.clip)
        if self.max_gain is not None:
            assert sq_signal is not None and rate is not None
            g = gain_factor(sq_norm, sq_signal, rate if f is None else rate * f, self.steps, self.max_gain)
            f = g if f is None else f * g
        return f


def scale_grads(pb: MemoryProblem, grads: Params, sq_signal: Tensor | None, rate: Tensor | None,
                lead: int = 2) -> Params:
    """Per-token gradients ``grads`` (leading ``lead`` dims index the token: ``[B, H]`` or
    ``[n, B, H]``) scaled by ``TokenScale.factor`` jointly over every weight (unchanged where the
    level has neither ``clip`` nor ``max_gain``)."""
    if not pb.token_scale:
        return grads
    sq = sum(g.pow(2).flatten(lead).sum(-1) for g in grads.values())
    f = pb.token_scale.factor(sq, sq_signal, rate)  # type: ignore[arg-type]
    assert f is not None
    return {n: g * f.reshape(f.shape + (1,) * (g.dim() - lead)) for n, g in grads.items()}


def with_rule_constants(rule: Rule, hp: Mapping[str, Tensor | float]) -> dict[str, Tensor | float]:
    """``hp`` with the rule's constant hyper-parameters filled in where ``hp`` has no value."""
    consts = {n: float(h) for n, h in rule.hypers.items() if isinstance(h, (int, float))}
    return {**consts, **hp}


def hp_at(hp: Mapping[str, Tensor | float], sl: slice | int) -> dict[str, Tensor | float]:
    return {n: (h[..., sl] if isinstance(h, Tensor) and h.dim() > 0 else h) for n, h in hp.items()}


def init_state(arch: MemoryArch, rule: Rule, init: Params, batch: int) -> MemoryState:
    """Per-sequence copies of the (meta-learned) initial state ``init`` ([H, ...] each)."""
    return start_state(rule, {k: p.unsqueeze(0).expand(batch, *p.shape) for k, p in init.items()})


def start_state(rule: Rule, params: Params) -> MemoryState:
    """A stream's first state from per-sequence fast weights ``params``."""
    return MemoryState(params=params, opt=rule.init(params), anchor=params, offset=0, chunks=0)


def detach_tree(x: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, x)


def leaf_grads_ready(p: Params) -> tuple[Params, bool]:
    """Tensors to differentiate against: the originals where they carry a graph, fresh
    leaves where they don't (e.g. under ``torch.no_grad`` at generation time)."""
    connected = all(t.requires_grad for t in p.values())
    if connected:
        # fresh aliases: the inner gradient must follow only the memory's own use of its
        # parameters, not other uses of the same tensors (e.g. self-generated targets)
        return {k: t.view_as(t) for k, t in p.items()}, True
    return {k: t.detach().requires_grad_() for k, t in p.items()}, False

