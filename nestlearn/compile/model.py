"""The compiled module: embedding, ``depth`` copies of the spec's block DAG, norm, head.

``forward(tokens_or_embeddings, state=None) -> (output, state)``: the state carries every
in-context level's fast weights, optimiser state and chunk position (and the attention
caches and convolution tails), so a long stream can be fed in pieces.
"""

from __future__ import annotations

import re
from typing import Any

import networkx as nx
import torch
from torch import Tensor, nn

from nestlearn.compile import basic
from nestlearn.compile.attention import Attention
from nestlearn.compile.hypers import Hypers
from nestlearn.compile.levels import Level
from nestlearn.compile.mac import MACOp
from nestlearn.compile.memory_op import MemoryOp, NestedInit
from nestlearn.rules.base import Rule
from nestlearn.spec import schema as S


def node_order(spec: S.Spec) -> list[str]:
    g = nx.DiGraph()
    for node in spec.block:
        g.add_node(node.id)
        for i in node.input_ids():
            g.add_edge(i, node.id)
        for s in _sources(node):
            g.add_edge(s, node.id)
    return [n for n in nx.topological_sort(g) if n != "x"]


def _sources(node: Any) -> list[str]:
    if isinstance(node, S.MemoryNode):
        return [s for s in (node.query, node.key, node.value) if s not in ("proj", "input")]
    return []


def build_op(node: Any, spec: S.Spec, levels: dict[str, Level], dims: dict[str, int]) -> basic.Op:
    m = spec.model
    d_in = dims[node.input_ids()[0]]
    if isinstance(node, S.NormNode):
        return basic.RMSNorm(d_in) if node.op == "rmsnorm" else basic.LayerNorm(d_in)
    if isinstance(node, S.L2NormNode):
        return basic.L2Norm()
    if isinstance(node, S.LinearNode):
        return basic.Linear(d_in, node.dim or m.dim, node.bias)
    if isinstance(node, S.ConvNode):
        return basic.Conv(d_in, node.width)
    if isinstance(node, S.AddNode):
        return basic.Add()
    if isinstance(node, S.MulNode):
        return basic.Mul()
    if isinstance(node, S.ActNode):
        return basic.Act(node.fn)
    if isinstance(node, S.AttentionNode):
        return Attention(m.dim, node.heads or m.heads, node.window, node.persistent, node.rope)
    if isinstance(node, S.MemoryNode):
        return MemoryOp(
            m.dim, node.heads or m.heads, levels[node.level], node.memory, query=node.query,
            key=node.key, value=node.value, qk_norm=node.qk_norm, conv=node.conv,
            learned_init=node.init != "zeros", out_proj=node.out_proj, nest=nested_init(node, levels),
        )
    if isinstance(node, S.MLPNode):
        if levels[node.level].is_outer:
            return basic.FeedForward(m.dim, node.expand, node.act)
        # a Continuum Memory System level: the FFN's weights learn in context every period
        mem = S.MemorySpec(type="mlp", expand=node.expand, act=node.act, residual=False)
        return MemoryOp(m.dim, 1, levels[node.level], mem, query="input", qk_norm=False,
                        learned_init=node.init != "zeros", out_proj=False, nest=nested_init(node, levels))
    if isinstance(node, S.SelfModNode):
        if nested_init(node, levels) is not None:
            raise ValueError(f"block node {node.id!r}: a selfmod node's memories start from the outer level "
                             f"or 'zeros'; nested init from {node.init!r} is for memory and mlp nodes")
        from nestlearn.compile.selfmod import SelfModOp

        return SelfModOp(m.dim, node.heads or m.heads, levels[node.level], node.memory, node.conv,
                         learned_init=node.init != "zeros", gen_period=node.gen_period)
    if isinstance(node, S.MACNode):
        return MACOp.build(node, m.dim, m.heads, levels)
    raise TypeError(f"no op for {node.op!r}")


def nested_init(node: Any, levels: dict[str, Level]) -> Level | None:
    """The slower in-context level that meta-learns ``node``'s initial state (Eq. 72), if any.

    ``init: outer`` (or any outer level) keeps the initial state an outer parameter; ``zeros``
    starts from zero; an in-context level makes the node a nested CMS level."""
    init = getattr(node, "init", None)
    if init is None or init not in levels or levels[init].is_outer:
        return None
    if init == node.level or levels[node.level].is_outer:
        raise ValueError(f"block node {node.id!r}: init {init!r} must be an in-context level slower than "
                         f"the node's own level {node.level!r}")
    return levels[init]


class Block(nn.Module):
    def __init__(self, spec: S.Spec, levels: dict[str, Level]):
        super().__init__()
        self.order = node_order(spec)
        by_id = {n.id: n for n in spec.block}
        self.inputs = {i: by_id[i].input_ids() for i in self.order}
        dims: dict[str, int] = {"x": spec.model.dim}
        ops = {}
        for i in self.order:
            node = by_id[i]
            ops[i] = build_op(node, spec, levels, dims)
            dims[i] = node.dim or spec.model.dim if isinstance(node, S.LinearNode) else dims[node.input_ids()[0]]
        self.ops = nn.ModuleDict(ops)
        self.output = spec.output or spec.block[-1].id

    def forward(self, x: Tensor, state: dict[str, Any] | None) -> tuple[Tensor, dict[str, Any]]:
        values = {"x": x}
        state = state or {}
        new_state: dict[str, Any] = {}
        for i in self.order:
            op: basic.Op = self.ops[i]  # type: ignore[assignment]
            src = {s: values[s] for s in op.sources}
            values[i], st = op([values[j] for j in self.inputs[i]], src, state.get(i))
            if st is not None:
                new_state[i] = st
        return values[self.output], new_state


class CompiledModel(nn.Module):
    def __init__(self, spec: S.Spec):
        super().__init__()
        self.spec = spec
        m = spec.model
        self.levels: dict[str, Level] = {n: Level(n, lv) for n, lv in spec.levels.items()}
        for lv in self.levels.values():
            lv.model = self
        self.embed = nn.Embedding(m.vocab, m.dim) if m.input == "tokens" else None
        self.blocks = nn.ModuleList([Block(spec, self.levels) for _ in range(m.depth)])
        self.norm = basic.RMSNorm(m.dim) if m.norm == "rmsnorm" else basic.LayerNorm(m.dim)
        self.head = nn.Linear(m.dim, m.vocab, bias=False) if m.input == "tokens" else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=0.02)
        if self.head is not None and m.tie_embeddings and self.embed is not None:
            self.head.weight = self.embed.weight

    def set_executor(self, executor: str) -> None:
        """``auto`` (default), ``sequential`` (the reference) or ``scan`` for every level."""
        for lv in self.levels.values():
            lv.executor = executor  # type: ignore[assignment]

    def forward(self, inputs: Tensor, state: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        h = self.embed(inputs) if self.embed is not None else inputs
        state = state or {}
        new_state: dict[str, Any] = {}
        for i, block in enumerate(self.blocks):
            h, new_state[str(i)] = block(h, state.get(str(i)))
        h, _ = self.norm([h], {}, None)
        out = self.head(h) if self.head is not None else h
        return out, new_state

    # ------------------------------------------------------------------ rule swaps
    def rebuild_hypers(self, level: Level, rule: Rule) -> str:
        """Rebuild the hyper-parameter modules every op of ``level`` built from its rule for
        ``rule`` (``Level.rule``'s setter calls this); what was removed and added, in words
        (empty if nothing changed). Checks every op before changing any."""
        from nestlearn.compile.selfmod import SelfModOp

        owners: list[tuple[str, Any]] = []
        for name, mod in self.named_modules():
            if isinstance(mod, (MemoryOp, NestedInit)) and mod.level is level:
                owners.append((f"{name}.hypers", mod.hypers))
            elif isinstance(mod, SelfModOp) and mod.level is level:
                owners.append((name, mod))
        like = next(self.parameters())
        removed: list[str] = []
        added: list[str] = []
        for prefix, owner in owners:
            gone, new = owner.rebuild(rule.hypers, like) if isinstance(owner, Hypers) else owner.rebuild_hypers(rule, like)
            removed += [_any_block(f"{prefix}.{n}") for n in gone]
            added += [_any_block(f"{prefix}.{n}") for n in new]
        return _changes(removed, added)

    # ------------------------------------------------------------------ introspection
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def level_summary(self) -> list[dict[str, Any]]:
        owned: dict[str, int] = {n: 0 for n in self.levels}
        state: dict[str, int] = {n: 0 for n in self.levels}
        outer = self.spec.outer_level
        for mod in self.modules():
            if isinstance(mod, MemoryOp) or type(mod).__name__ == "SelfModOp":
                level: Level = mod.level  # type: ignore[assignment]
                state[level.name] += sum(p.numel() for p in mod.init.values())  # type: ignore[union-attr,operator]
            if isinstance(mod, MemoryOp) and mod.nest is not None:  # Φ: the slow level's state (Eq. 72)
                state[mod.nest.level.name] += sum(p.numel() for p in mod.init.values())
        owned[outer] = self.num_parameters()
        rows = []
        for n, lv in self.levels.items():
            rows.append({
                "name": n, "period": lv.period, "rule": lv.rule.describe(),
                "objective": "-" if lv.is_outer else lv.objective_name,
                "grad": "-" if lv.is_outer else lv.spec.grad,
                "params": owned[n], "state": state[n],
            })
        return rows


def _any_block(name: str) -> str:
    return re.sub(r"^blocks\.\d+\.", "blocks.*.", name)


def _changes(removed: list[str], added: list[str]) -> str:
    def unique(names: list[str]) -> str:
        return ", ".join(dict.fromkeys(names))

    parts = []
    if removed:
        parts.append(f"removed its hyper-parameter modules the new rule has no use for: {unique(removed)}")
    if added:
        parts.append(f"added fresh (untrained) ones: {unique(added)}")
    return "; ".join(parts)


def compile_spec(spec: S.Spec, *, dtype: torch.dtype | None = None) -> CompiledModel:
    model = CompiledModel(spec)
    return model.to(dtype) if dtype is not None else model
