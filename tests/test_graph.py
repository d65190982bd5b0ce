"""The level graph: order, schedule, widths, typed level edges, export."""

from __future__ import annotations

import re
from pathlib import Path

import networkx as nx
import pytest

from nestlearn.graph import EDGE_TYPES, INPUT, ScheduleStep, build_graph
from nestlearn.spec.errors import SpecError
from nestlearn.spec.loader import parse_spec
from nestlearn.spec.schema import Spec

DATA = Path(__file__).parent / "data"
TINY = (DATA / "tiny.yaml").read_text()

# a CMS chain declared slow-first and in a shuffled block order, a nested init, a period-1 level
CMS = """\
nestlearn: 1
name: cms
model: {vocab: 64, dim: 16, depth: 1, heads: 2}
levels:
  slow:   {period: 64, rule: {name: sgd}, grad: first_order}
  outer:  {period: outer, rule: {name: adamw}}
  mid:    {period: 16, rule: {name: momentum}, grad: stop}
  fast:   {period: 4, rule: {name: dgd}}
  delta:  {period: 1, rule: {name: sgd}, chunk: 8}
block:
  - {id: out, op: add, in: [h2, m3]}
  - {id: m1, op: mlp, in: n1, level: fast, init: mid}
  - {id: n1, op: rmsnorm, in: x}
  - {id: h1, op: add, in: [x, m1]}
  - {id: m2, op: mlp, in: h1, level: mid}
  - {id: h2, op: add, in: [h1, m2]}
  - {id: m3, op: memory, in: h2, level: slow, key: m1}
  - {id: d, op: memory, in: x, level: delta}
  - {id: unused, op: linear, in: d, dim: 8}
output: out
"""


def graph_of(text: str, overrides: tuple[str, ...] = ()):  # noqa: ANN201
    return build_graph(parse_spec(text, "g.yaml", overrides))


def test_level_order_fast_to_slow_outer_last() -> None:
    g = graph_of(CMS)
    assert g.level_order == ["delta", "fast", "mid", "slow", "outer"]
    assert g.periods == {"delta": 1, "fast": 4, "mid": 16, "slow": 64}
    assert g.outer == "outer"


def test_ties_keep_declaration_order() -> None:
    text = CMS.replace("period: 16", "period: 4")
    g = graph_of(text.replace("init: mid", "init: outer"))
    assert g.level_order == ["delta", "mid", "fast", "slow", "outer"]


def test_block_in_any_order_runs_in_topological_order() -> None:
    g = graph_of(CMS)
    assert g.order == ["n1", "m1", "h1", "m2", "h2", "m3", "out", "d", "unused"]
    pos = {v: k for k, v in enumerate(g.order)}
    for u, v in g.data.edges:
        if u != INPUT:
            assert pos[u] < pos[v]
    assert nx.is_directed_acyclic_graph(g.data)


def test_output_defaults_to_the_last_node() -> None:
    assert graph_of(TINY).output == "out"
    with pytest.raises(SpecError, match="block.8: the block's output 'unused' is 8 wide"):
        graph_of(CMS.replace("output: out\n", ""))


def test_output_and_widths() -> None:
    g = graph_of(CMS)
    assert g.output == "out"
    assert g.node_dims == {INPUT: 16, "n1": 16, "m1": 16, "h1": 16, "m2": 16, "h2": 16, "m3": 16, "out": 16,
                           "d": 16, "unused": 8}


def test_linear_changes_width_and_back() -> None:
    text = TINY.replace(
        "  - {id: n2, op: rmsnorm, in: r1}",
        "  - {id: up, op: linear, in: r1, dim: 64}\n  - {id: act, op: act, in: up, fn: gelu}\n"
        "  - {id: n2, op: linear, in: act, dim: 32}",
    )
    g = graph_of(text)
    assert (g.node_dims["up"], g.node_dims["act"], g.node_dims["n2"]) == (64, 64, 32)
    with pytest.raises(SpecError, match="'memory' reads model.dim = 32 wide inputs, but 'n2' is 64 wide"):
        graph_of(text.replace("in: act, dim: 32}", "in: act}"))  # a linear keeps its input's width


def test_data_graph_nodes_and_edges() -> None:
    g = graph_of(TINY)
    assert set(g.data.nodes) == {INPUT, "n1", "att", "r1", "n2", "mem", "out"}
    assert set(g.data.edges) == {(INPUT, "n1"), ("n1", "att"), (INPUT, "r1"), ("att", "r1"), ("r1", "n2"),
                                 ("n2", "mem"), ("r1", "out"), ("mem", "out")}
    assert g.data.nodes["mem"]["level"] == "memory"
    assert g.data.nodes["att"]["level"] == "outer"  # its projections are outer parameters
    assert g.data.nodes["r1"]["level"] is None  # parameterless
    assert g.node_level("mem") == "memory"


def edge_set(g, kind: str) -> set[tuple[str, str]]:  # noqa: ANN001
    return {(u, v) for u, v, _ in g.edges(kind)}


def test_typed_level_edges() -> None:
    g = graph_of(CMS)
    assert {d["type"] for _, _, d in g.levels.edges(data=True)} <= set(EDGE_TYPES)
    # init: the slower level owns the initial state of the faster one
    assert edge_set(g, "init") == {("mid", "fast"), ("outer", "mid"), ("outer", "slow"), ("outer", "delta")}
    # generate: m3 (slow) reads its keys from m1 (fast)
    assert edge_set(g, "generate") == {("fast", "slow")}
    assert [d["via"] for _, _, d in g.edges("generate")] == [["m3"]]
    # condition: data flow between different levels' nodes
    cond = edge_set(g, "condition")
    assert ("outer", "fast") in cond and ("fast", "mid") in cond and ("mid", "slow") in cond
    assert ("slow", "outer") in cond  # the output m3 -> out feeds the outer loss
    # grad: every level except 'stop' ones reaches the outer loss; the nested init gets the fast grads
    grads = {(u, v): d["mode"] for u, v, d in g.edges("grad")}
    assert grads == {("delta", "outer"): "unroll", ("fast", "outer"): "unroll", ("slow", "outer"): "first_order",
                     ("fast", "mid"): "unroll"}


def test_selfmod_generates_its_own_values() -> None:
    text = TINY.replace("op: memory, in: n2, level: memory, memory: {type: mlp, expand: 2}",
                        "op: selfmod, in: n2, level: memory")
    g = graph_of(text)
    assert ("memory", "memory") in edge_set(g, "generate")


def test_levels_graph_node_attributes() -> None:
    g = graph_of(TINY)
    assert g.levels.nodes["memory"] == {"period": 8, "rule": "momentum", "objective": "l2", "grad": "unroll",
                                        "nodes": ["mem"]}
    assert g.levels.nodes["outer"]["period"] == "outer"


def test_schedule_chunks_and_updates() -> None:
    g = graph_of(CMS)
    steps = g.schedule(32)
    assert [(s.start, s.end) for s in steps] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 24),
                                                 (24, 28), (28, 32)]
    assert steps[0].updates == ("fast",)
    assert steps[3].updates == ("fast", "mid")
    assert all(s.every_token == ("delta",) for s in steps)
    full = g.schedule(64)
    assert full[-1] == ScheduleStep(60, 64, ("fast", "mid", "slow"), ("delta",))


def test_schedule_partial_final_chunk_does_not_update() -> None:
    g = graph_of(TINY)
    steps = g.schedule(20)
    assert steps == [ScheduleStep(0, 8, ("memory",)), ScheduleStep(8, 16, ("memory",)), ScheduleStep(16, 20, ())]
    assert steps[0].as_dict() == {"start": 0, "end": 8, "updates": ["memory"], "every_token": []}


def test_schedule_of_a_transformer_is_one_chunk() -> None:
    text = """\
levels:
  outer: {period: outer, rule: {name: adamw}}
block:
  - {id: n1, op: rmsnorm, in: x}
  - {id: att, op: attention, in: n1}
  - {id: r1, op: add, in: [x, att]}
  - {id: n2, op: rmsnorm, in: r1}
  - {id: ffn, op: mlp, in: n2}
  - {id: out, op: add, in: [r1, ffn]}
"""
    g = graph_of(text)
    assert g.level_order == ["outer"]
    assert g.schedule(10) == [ScheduleStep(0, 10, ())]
    assert g.edges() == []


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_schedule_needs_a_positive_length(bad: object) -> None:
    with pytest.raises(ValueError):
        graph_of(TINY).schedule(bad)  # type: ignore[arg-type]


def test_default_tokens_shows_updates() -> None:
    assert graph_of(TINY).default_tokens() == 16
    assert graph_of(CMS).default_tokens() == 128


def test_python_built_spec_errors_have_no_position() -> None:
    spec = Spec.model_validate({
        "levels": {"outer": {"period": "outer", "rule": {"name": "adamw"}}},
        "block": [{"id": "a", "op": "rmsnorm", "in": "y"}],
    })
    with pytest.raises(SpecError) as info:
        build_graph(spec)
    assert str(info.value) == "<spec>: block.0.in: unknown input 'y'"


def test_describe_is_json_ready() -> None:
    import json

    d = graph_of(CMS).describe()
    json.dumps(d)
    assert [lv["name"] for lv in d["levels"]] == ["delta", "fast", "mid", "slow", "outer"]
    assert {n["id"]: n["width"] for n in d["nodes"]}["unused"] == 8
    assert {"type": "generate", "from": "fast", "to": "slow", "via": ["m3"]} in d["edges"]


def test_dot_export() -> None:
    g = graph_of(CMS)
    dot = g.to_dot()
    assert dot.startswith('digraph "cms" {') and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    for nid in g.order:
        assert f'"{nid}" [label="{nid}\\n' in dot
    data_edges = re.findall(r'^    "[^"]+" -> "[^"]+"', dot, flags=re.M)
    level_edges = re.findall(r'^    "level:[^"]+" -> "level:[^"]+"', dot, flags=re.M)
    assert len(level_edges) == g.levels.number_of_edges()
    assert len(data_edges) == g.data.number_of_edges() + len(level_edges)
    assert 'label="key"' in dot and 'label="init"' in dot and 'label="grad (first_order)"' in dot
    assert "peripheries=2" in dot  # the output node


def test_mermaid_export() -> None:
    g = graph_of(CMS)
    mmd = g.to_mermaid()
    lines = mmd.splitlines()
    assert lines[0] == "flowchart TB"
    assert sum(1 for line in lines if line.strip().startswith("subgraph")) == 2
    assert sum(1 for line in lines if line.strip() == "end") == 2
    assert sum(1 for line in lines if re.match(r"^\s+L\d+ \S+\|", line)) == g.levels.number_of_edges()
    assert "-. key .->" in mmd
    for nid in g.order:
        assert f'"{nid}<br/>' in mmd
    # mermaid ids are safe whatever the spec's ids are
    for node_id in re.findall(r"^\s+(\w+)[\[\(\{]", mmd, flags=re.M):
        assert re.fullmatch(r"x_in|n\d+|L\d+", node_id)


def test_nested_init_from_an_in_context_level_needs_a_rule_without_layer_inputs() -> None:
    # m1 (fast) takes its initial state from mid (Eq. 72): mid's meta-step has no per-token inputs
    g = graph_of(CMS)
    assert [(u, v, d["via"]) for u, v, d in g.edges("init") if u == "mid"] == [("mid", "fast", ["m1"])]
    with pytest.raises(SpecError) as info:
        graph_of(CMS.replace("rule: {name: momentum}", "rule: {name: dgd}"))
    assert str(info.value) == (
        "g.yaml:12:50: block.1.init: nested init: 'mid' meta-learns this node's initial state with one step of "
        "its rule per chunk, but its rule 'dgd' needs a memory's per-token layer inputs, which that step does "
        "not have; give it another rule (e.g. sgd, momentum, adam)")
