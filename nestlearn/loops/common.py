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


def clip_grads(grads: Params, clip: float | None, lead: int = 2) -> Params:
    """Per-token gradients ``grads`` (leading ``lead`` dims index the token: ``[B, H]`` or
    ``[n, B, H]``) clipped jointly over every weight to norm ``clip`` (None: unchanged)."""
    if clip is None:
        return grads
    sq = sum(g.pow(2).flatten(lead).sum(-1) for g in grads.values())
    f = clip_factor(sq, clip)  # type: ignore[arg-type]
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

