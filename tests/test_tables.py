"""One table per extension point: ``rules.RULES``, ``memories.MEMORIES``, ``compile.ops.OPS`` and
the executor table cover exactly what the schema accepts, and the facts they carry are read."""

from __future__ import annotations

from typing import Any, get_args

import pytest

from nestlearn import rules
from nestlearn.compile.ops import OPS
from nestlearn.loops.executors import EXECUTORS, remat_available
from nestlearn.memories import MEMORIES
from nestlearn.spec import schema
from nestlearn.spec.loader import parse_spec


def _union(annotated: Any) -> tuple[Any, ...]:
    return get_args(get_args(annotated)[0])


def _names(classes: tuple[Any, ...], field: str) -> set[str]:
    return {n for c in classes for n in get_args(c.model_fields[field].annotation)}


def test_every_schema_rule_has_a_row() -> None:
    assert set(rules.RULES) == _names(_union(schema.RuleSpec), "name")
    for name, entry in rules.RULES.items():
        assert entry.build is not None and issubclass(entry.cls, rules.Rule), name


def test_every_schema_op_has_a_builder() -> None:
    assert set(OPS) == _names(_union(schema.NodeSpec), "op")


def test_every_memory_type_has_a_builder() -> None:
    assert set(MEMORIES) == set(get_args(schema.MemorySpec.model_fields["type"].annotation))


def test_rule_facts_come_from_the_rule_classes() -> None:
    outer = [n for n, e in rules.RULES.items() if e.cls.usable_as_outer]
    assert outer == ["sgd", "momentum", "adam", "adamw"]
    assert [n for n, e in rules.RULES.items() if e.cls.needs_inputs] == ["dgd"]


def test_executor_table() -> None:
    assert [row.name for row in EXECUTORS][-2:] == ["chunked", "sequential"]  # the fall-backs come last
    assert remat_available(rules.sgd()) and remat_available(rules.dgd())
    assert not remat_available(rules.adam())
    assert {row.name for row in EXECUTORS if row.compilable} == {"dual", "dgd_dual"}  # chunks.chunk_step


def test_swapping_in_a_rule_object_the_nested_init_cannot_step_is_refused() -> None:
    import nestlearn

    text = """\
nestlearn: 1
model: {vocab: 16, dim: 8, depth: 1, heads: 2}
levels:
  outer: {period: outer, rule: {name: adamw}}
  slow:  {period: 4, rule: {name: sgd}}
  fast:  {period: 2, rule: {name: sgd}}
block:
  - {id: c1, op: mlp, in: x, level: fast, init: slow}
  - {id: c2, op: mlp, in: c1, level: slow}
"""
    model = nestlearn.compile(parse_spec(text, "t.yaml"))
    with pytest.raises(ValueError, match="meta-learns an initial state"):
        model.levels["slow"].rule = rules.dgd()
    model.levels["fast"].rule = rules.dgd()  # the fast level itself may take it


def test_a_mac_node_refuses_a_nested_init_in_the_graph() -> None:
    """The op fact ``nests``: only memory and mlp nodes take a nested init (a mac node's was
    refused at run time, without a position, before the graph knew it)."""
    from nestlearn.graph import build_graph
    from nestlearn.spec.errors import SpecError

    text = """\
nestlearn: 1
model: {vocab: 16, dim: 8, depth: 1, heads: 2}
levels:
  outer: {period: outer, rule: {name: adamw}}
  slow:  {period: 8, rule: {name: sgd}}
  mem:   {period: 4, rule: {name: sgd}}
block:
  - {id: mac, op: mac, in: x, level: mem, init: slow}
  - {id: c2, op: mlp, in: mac, level: slow}
"""
    with pytest.raises(SpecError, match=r"t\.yaml:8:\d+: block\.0\.init: nested init from 'slow' is implemented "
                       r"for memory and mlp nodes; a mac node's memories start from the outer level"):
        build_graph(parse_spec(text, "t.yaml"))
