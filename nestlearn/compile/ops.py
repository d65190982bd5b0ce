"""``OPS``: the block's ops, one builder per op name of the spec (``spec/schema.py``'s node classes).

A builder takes the validated node and an ``OpContext`` (what the level graph computed for it:
its input and output widths, the in-context level that meta-learns its initial state) and
returns the op module. A new op is a schema class (with its facts), a module and a row here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nestlearn.compile import basic
from nestlearn.compile.attention import Attention
from nestlearn.compile.levels import Level
from nestlearn.compile.mac import MACOp
from nestlearn.compile.memory_op import MemoryOp
from nestlearn.compile.selfmod import SelfModOp
from nestlearn.spec import schema as S


@dataclass(frozen=True)
class OpContext:
    model: S.ModelSpec
    levels: dict[str, Level]
    d_in: int
    """Width of the node's first input."""
    d_out: int
    """The node's own width."""
    nest: Level | None
    """The slower in-context level that meta-learns the node's initial state (nested init), if any."""


def _memory(node: Any, c: OpContext) -> basic.Op:
    m = c.model
    return MemoryOp(
        m.dim, node.heads or m.heads, c.levels[node.level], node.memory, query=node.query,
        key=node.key, value=node.value, qk_norm=node.qk_norm, conv=node.conv,
        learned_init=node.init != "zeros", out_proj=node.out_proj, nest=c.nest,
    )


def _mlp(node: Any, c: OpContext) -> basic.Op:
    m = c.model
    if c.levels[node.level].is_outer:
        return basic.FeedForward(m.dim, node.expand, node.act)
    # a Continuum Memory System level: the FFN's weights learn in context every period
    mem = S.MemorySpec(type="mlp", expand=node.expand, act=node.act, residual=False)
    return MemoryOp(m.dim, 1, c.levels[node.level], mem, query="input", qk_norm=False, kv_norm=node.kv_norm,
                    learned_init=node.init != "zeros", out_proj=False, nest=c.nest)


OPS: dict[str, Callable[[Any, OpContext], basic.Op]] = {
    "rmsnorm": lambda node, c: basic.RMSNorm(c.d_in),
    "layernorm": lambda node, c: basic.LayerNorm(c.d_in),
    "l2norm": lambda node, c: basic.L2Norm(),
    "linear": lambda node, c: basic.Linear(c.d_in, c.d_out, node.bias),
    "conv": lambda node, c: basic.Conv(c.d_in, node.width),
    "add": lambda node, c: basic.Add(),
    "mul": lambda node, c: basic.Mul(),
    "act": lambda node, c: basic.Act(node.fn),
    "attention": lambda node, c: Attention(c.model.dim, node.heads or c.model.heads, node.window, node.persistent,
                                           node.rope),
    "memory": _memory,
    "mlp": _mlp,
    "selfmod": lambda node, c: SelfModOp(c.model.dim, node.heads or c.model.heads, c.levels[node.level], node.memory,
                                         node.conv, gen_period=node.gen_period, gen_lr_max=node.gen_lr_max),
    "mac": lambda node, c: MACOp.build(node, c.model.dim, c.model.heads, c.levels),
}
"""Every op a block node can name (the keys are the schema's op names; ``tests/test_tables.py``)."""
