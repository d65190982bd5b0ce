"""The compiled module: embedding, ``depth`` copies of the spec's block DAG, norm, head.

``forward(tokens_or_embeddings, state=None) -> (output, state)``: the state carries every
in-context level's fast weights, optimiser state and chunk position (and the attention
caches and convolution tails), so a long stream can be fed in pieces.
"""

from __future__ import annotations

import re
from typing import Any, cast

import torch
from torch import Tensor, nn

from nestlearn.compile import basic
from nestlearn.compile.hypers import Hypers
from nestlearn.compile.levels import Level
from nestlearn.compile.memory_op import MemoryOp, NestedInit
from nestlearn.compile.ops import OPS, OpContext
from nestlearn.compile.selfmod import SelfModOp
from nestlearn.compile.wavefront import BlockStreams, run_wavefront
from nestlearn.graph import LevelGraph, build_graph
from nestlearn.rules.base import Rule
from nestlearn.spec import schema as S


class Block(nn.Module):
    def __init__(self, graph: LevelGraph, levels: dict[str, Level]):
        super().__init__()
        spec = graph.spec
        self.order = graph.build_order
        by_id = {n.id: n for n in spec.block}
        self.inputs = {i: by_id[i].input_ids() for i in self.order}
        dims = graph.node_dims
        ops = {}
        for i in self.order:
            node = by_id[i]
            nest = graph.nested_inits.get(i)
            ctx = OpContext(spec.model, levels, dims[node.input_ids()[0]], dims[i], levels[nest] if nest else None)
            ops[i] = OPS[node.op](node, ctx)
        self.ops = nn.ModuleDict(ops)
        self.output = graph.output

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

    def carried(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` less the ops that do not carry across training batches."""
        return {i: st for i, st in state.items() if cast(basic.Op, self.ops[i]).carries_across_batches}


class CompiledModel(nn.Module):
    """The module of a checked spec: built from its ``LevelGraph`` (``compile_spec``)."""

    def __init__(self, graph: LevelGraph):
        super().__init__()
        spec = graph.spec
        self.spec = spec
        self.graph = graph
        m = spec.model
        self.levels: dict[str, Level] = {n: Level(n, lv) for n, lv in spec.levels.items()}
        for lv in self.levels.values():
            lv.model = self
        self.embed = nn.Embedding(m.vocab, m.dim) if m.input == "tokens" else None
        self.blocks = nn.ModuleList([Block(graph, self.levels) for _ in range(m.depth)])
        self.norm = basic.RMSNorm(m.dim) if m.norm == "rmsnorm" else basic.LayerNorm(m.dim)
        self.head = nn.Linear(m.dim, m.vocab, bias=False) if m.input == "tokens" else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=0.02)
        if self.head is not None and m.tie_embeddings and self.embed is not None:
            self.head.weight = self.embed.weight
        self.wavefront: int | None = None
        self._streams = BlockStreams()

    def set_wavefront(self, segment: int | None) -> None:
        """Run the blocks as a wavefront over segments of ``segment`` tokens (``wavefront.py``):
        block b+1 starts on a segment as soon as block b has finished it, on its own CUDA
        stream. Exactly the same outputs, state and gradients; faster where the blocks' work
        is launch- or latency-bound (HOPE's chunk recurrences). ``None`` turns it off."""
        if segment is not None and (isinstance(segment, bool) or not isinstance(segment, int) or segment < 1):
            raise ValueError(f"wavefront segment: expected a positive number of tokens, got {segment!r}")
        self.wavefront = segment

    def set_executor(self, executor: str) -> None:
        """``auto`` (default), ``sequential`` (the reference) or ``scan`` for every level."""
        for lv in self.levels.values():
            lv.executor = executor  # type: ignore[assignment]

    def compile_chunk_steps(self, enabled: bool = True) -> None:
        """Run the closed-form chunk steps of every in-context level through torch.compile (or
        not): each level's memory problems carry the switch (``MemoryProblem.compiled``), and the
        executor rows marked ``compilable`` take the compiled step where it traces. Off by
        default; ``nestlearn run --compile`` turns it on."""
        for lv in self.levels.values():
            lv.compile_chunk_steps = enabled and not lv.is_outer

    def forward(self, inputs: Tensor, state: dict[str, Any] | None = None) -> tuple[Tensor, dict[str, Any]]:
        h = self.embed(inputs) if self.embed is not None else inputs
        state = state or {}
        new_state: dict[str, Any] = {}
        if self.wavefront is not None and h.shape[1] > self.wavefront and len(self.blocks) > 1:
            h, new_state = run_wavefront(list(self.blocks), h, state, self.wavefront, self._streams)
        else:
            for i, block in enumerate(self.blocks):
                h, new_state[str(i)] = block(h, state.get(str(i)))
        h, _ = self.norm([h], {}, None)
        out = self.head(h) if self.head is not None else h
        return out, new_state

    def carried(self, state: dict[str, Any]) -> dict[str, Any]:
        """What ``--carry-state`` takes from one training batch's final state to the next: all of
        it but the state of ops that do not carry across batches (an attention without a window:
        its cache would grow without bound)."""
        blocks = cast(list[Block], list(self.blocks))
        return {b: blocks[int(b)].carried(st) for b, st in state.items()}

    # ------------------------------------------------------------------ rule swaps
    def rebuild_hypers(self, level: Level, rule: Rule) -> str:
        """Rebuild the hyper-parameter modules every op of ``level`` built from its rule for
        ``rule`` (``Level.rule``'s setter calls this); what was removed and added, in words
        (empty if nothing changed). Checks every op before changing any."""
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
        """Per level: its period, rule, objective, gradient mode, outer parameters, in-context
        state (numbers per sequence, all blocks) and ``kept_per_token``: the bytes of fast state
        its backward keeps per token of each sequence (``_kept_per_token``)."""
        owned: dict[str, int] = {n: 0 for n in self.levels}
        state: dict[str, int] = {n: 0 for n in self.levels}
        kept: dict[str, float] = {n: 0.0 for n in self.levels}
        outer = self.spec.outer_level
        for mod in self.modules():
            if isinstance(mod, (MemoryOp, SelfModOp)):
                level: Level = mod.level  # type: ignore[assignment]
                state[level.name] += sum(p.numel() for p in mod.init.values())  # type: ignore[union-attr,operator]
                kept[level.name] += _kept_per_token(mod)
            if isinstance(mod, MemoryOp) and mod.nest is not None:  # Φ: the slow level's state (Eq. 72)
                slow: Level = mod.nest.level  # type: ignore[assignment]
                numel = sum(p.numel() for p in mod.init.values())
                state[slow.name] += numel
                kept[slow.name] += _state_bytes_per_token(numel, slow, int(slow.period))
        owned[outer] = self.num_parameters()
        rows = []
        for n, lv in self.levels.items():
            rows.append({
                "name": n, "period": lv.period, "rule": lv.rule.describe(),
                "objective": "-" if lv.is_outer else lv.objective_name,
                "grad": "-" if lv.is_outer else lv.spec.grad,
                "params": owned[n], "state": state[n],
                # period 1: what is kept depends on the executor (the delta rule keeps one state
                # per compute chunk, the sequential loop one per token), so no figure is given
                "kept_per_token": None if lv.is_outer or int(lv.period) == 1 else kept[n],
            })
        return rows


def _kept_per_token(op: MemoryOp | SelfModOp) -> float:
    """Bytes of fast state that the backward of ``op``'s inner loop keeps per token of each
    sequence (``_state_bytes_per_token``); HOPE's generators count at their own period."""
    level: Level = op.level  # type: ignore[assignment]
    if isinstance(op, SelfModOp):
        main = sum(p.numel() for k, p in op.init.items() if k.startswith("main__"))
        gen = sum(p.numel() for k, p in op.init.items() if not k.startswith("main__"))
        return (_state_bytes_per_token(main, level, int(level.period))
                + _state_bytes_per_token(gen, level, int(op.gen_period or level.period)))
    return _state_bytes_per_token(sum(p.numel() for p in op.init.values()), level, int(level.period))


def _state_bytes_per_token(numel: int, level: Level, period: int) -> float:
    """A memory of ``numel`` weights learning at ``level`` every ``period`` tokens: its weights
    and the rule's state per weight (momentum: one more copy) in fp32 (inner loops run in fp32),
    kept once per chunk, or once per ``remat`` group of chunks. The closed forms and the kernels
    keep each chunk's start state for the backward (docs/execution.md); activations come on top."""
    copies = 1 + _rule_state_per_weight(level)
    return 4.0 * numel * copies / (period * int(level.spec.remat or 1))


def _rule_state_per_weight(level: Level) -> int:
    """How many tensors of a weight's size the level's rule carries (momentum 1, Adam 2)."""
    try:
        state = level.rule.init({"w": torch.zeros(2)})
    except Exception:  # noqa: BLE001 - a rule that cannot init on a stand-in counts none
        return 0
    leaves = torch.utils._pytree.tree_leaves(state)
    return sum(1 for leaf in leaves if isinstance(leaf, Tensor) and leaf.numel() == 2)


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


def compile_spec(spec: S.Spec | LevelGraph, *, dtype: torch.dtype | None = None) -> CompiledModel:
    """The module of a spec, built from its level graph (``build_graph``: every structural check,
    the build order, the widths, the nested inits; given a ``Spec``, built here first)."""
    graph = spec if isinstance(spec, LevelGraph) else build_graph(spec)
    model = CompiledModel(graph)
    return model.to(dtype) if dtype is not None else model
