"""``build_graph``: the spec checked as a whole, in named steps, then its two graphs.

Each step adds what it finds to one ``Issues`` list; every issue is raised at once (sorted by
position) after the widths, before the level graph is drawn. The order of the steps is the
order in which they need each other's results: ids, then the nodes (inputs, sources, levels,
init edges), the levels, the output, cycles, and the widths along a topological order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from nestlearn.graph.checks import (
    Issues,
    check_init,
    check_max_gain,
    check_objective,
    check_remat,
    check_rule,
    cycle_from,
    period_text,
    upstream_levels,
    width,
)
from nestlearn.graph.types import INPUT, SOURCE_ROLES, LevelGraph
from nestlearn.spec.errors import suggest
from nestlearn.spec.schema import Spec


@dataclass
class _Build:
    """What the steps share while a spec is checked."""

    spec: Spec
    issues: Issues
    outer: str
    periods: dict[str, int]
    """Period of every in-context level."""
    first: dict[str, int] = field(default_factory=dict)
    """Node id -> index of the block node that first declares it."""
    data: nx.DiGraph = field(default_factory=nx.DiGraph)
    used_levels: set[str] = field(default_factory=set)
    bad_levels: bool = False
    """A node names a wrong level: "declared but unused" would only add noise."""
    init_edges: list[tuple[str, str, str]] = field(default_factory=list)
    """``(slow level, fast level, node id)``."""
    generate_edges: list[tuple[str, str]] = field(default_factory=list)
    """``(source node, memory node)``."""
    output: str = ""
    out_loc: tuple[str | int, ...] = ("output",)
    acyclic: bool = True
    dims: dict[str, int] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)


def build_graph(spec: Spec) -> LevelGraph:
    """Check ``spec`` as a whole and build its data and level graphs (no tensors involved).

    Raises :class:`SpecError` listing every problem found, each at its place in the spec.
    """
    outer_names = [n for n, lv in spec.levels.items() if lv.is_outer]
    b = _Build(spec, Issues(spec), outer_names[0] if outer_names else "outer",
               {n: int(lv.period) for n, lv in spec.levels.items() if not lv.is_outer})
    b.used_levels.add(b.outer)
    _check_ids(b)
    _check_nodes(b)
    _check_levels(b)
    _check_output(b)
    _check_cycles(b)
    _widths(b)
    b.issues.raise_if_any()
    return _level_graph(b)


def _check_ids(b: _Build) -> None:
    """Every id unique and not the input's; the data graph's nodes."""
    for j, node in enumerate(b.spec.block):
        if node.id == INPUT:
            b.issues.add(("block", j, "id"), f"{INPUT!r} is reserved: it names the block's input")
        elif node.id in b.first:
            b.issues.add(("block", j, "id"), f"duplicate id {node.id!r} (already used by block.{b.first[node.id]}"
                         ")")
        else:
            b.first[node.id] = j
    b.data.add_node(INPUT, op="input", inputs=[], level=None, index=-1)
    for nid, j in b.first.items():
        node = b.spec.block[j]
        b.data.add_node(nid, op=node.op, inputs=node.input_ids(), level=_owner(node, b.outer), index=j, sources={})


def _owner(node: Any, outer: str) -> str | None:
    if node.owner == "level":
        return str(node.level)
    if node.owner == "none":
        return None
    return outer


def _check_nodes(b: _Build) -> None:
    """Each node's inputs and arity, memory sources (generate edges), level and init edge, heads."""
    spec, issues = b.spec, b.issues
    sources = set(b.first) | {INPUT}
    source_choices = sorted(sources)
    level_names = list(spec.levels)
    block: list[Any] = list(spec.block)
    for j, node in enumerate(block):
        primary = b.first.get(node.id) == j
        inputs = node.input_ids()
        listed = isinstance(node.inputs, list)
        in_loc: tuple[str | int, ...] = ("block", j, "in")
        n = len(inputs)
        if node.variadic and n < 2:
            issues.add(in_loc, f"'{node.op}' needs at least 2 inputs, got {n}")
        elif not node.variadic and n != 1:
            issues.add(in_loc, f"'{node.op}' takes exactly 1 input, got {n}")
        for k, src in enumerate(inputs):
            loc = (*in_loc, k) if listed else in_loc
            if src not in sources:
                issues.add(loc, f"unknown input {src!r}{suggest(src, source_choices)}")
            elif primary:
                b.data.add_edge(src, node.id, role="in")

        for role in SOURCE_ROLES if node.op == "memory" else ():
            src = getattr(node, role, "proj")
            if src in ("proj", "input"):
                continue
            if src not in sources:
                hint = suggest(src, ["proj", "input", *source_choices])
                issues.add(("block", j, role), f"unknown {role} source {src!r}: use 'proj', 'input' or a "
                           f"node id{hint}")
            elif primary:
                if not b.data.has_edge(src, node.id):
                    b.data.add_edge(src, node.id, role=role)
                b.data.nodes[node.id]["sources"][role] = src
                b.generate_edges.append((src, node.id))

        if node.owner == "level":
            lvl = node.level
            if lvl not in spec.levels:
                issues.add(("block", j, "level"), f"unknown level {lvl!r}{suggest(lvl, level_names)}")
                lvl, b.bad_levels = None, True
            else:
                b.used_levels.add(lvl)
                if node.op != "mlp" and spec.levels[lvl].is_outer:
                    issues.add(("block", j, "level"), f"a {node.op} node learns in context: its level must "
                               f"have a period, but {lvl!r} is the outer level")
                    lvl, b.bad_levels = None, True
            if node.op == "mlp" and getattr(node, "kv_norm", False) and lvl is not None \
                    and spec.levels[lvl].is_outer:
                issues.add(("block", j, "kv_norm"), "kv_norm applies to an mlp node of an in-context level "
                           "(a CMS level: it normalises that level's keys and values); an outer-level mlp "
                           "is a plain feed-forward with no keys or values; remove it")
            check_init(spec, issues, j, node, lvl, b.periods, b.init_edges)
            if node.init in spec.levels:
                b.used_levels.add(node.init)

        heads = getattr(node, "heads", None)
        if heads is not None and spec.model.dim % heads:
            issues.add(("block", j, "heads"), f"heads {heads} does not divide the width {spec.model.dim}")
        elif getattr(node, "rope", False) and (spec.model.dim // (n_heads := heads or spec.model.heads)) % 2:
            issues.add(("block", j, "rope"), f"rope rotates pairs of a head's channels, but the head width "
                       f"is odd ({spec.model.dim} / {n_heads} heads = {spec.model.dim // n_heads}); pick a "
                       f"width or head count that gives an even head width, or set rope: false")


def _check_levels(b: _Build) -> None:
    """Every level used; its chunk, remat, objective and rule."""
    for name, lv in b.spec.levels.items():
        if name not in b.used_levels and not b.bad_levels:
            b.issues.add(("levels", name), f"level {name!r} is declared but no node uses it (give a memory, "
                         f"selfmod or mlp node 'level: {name}', or remove the level)")
        if lv.chunk is not None and lv.period != 1:
            b.issues.add(("levels", name, "chunk"), f"'chunk' applies to period-1 levels only; this level has "
                         f"{period_text(lv.period)}")
        if lv.remat is not None:
            check_remat(b.issues, name, lv)
        check_objective(b.issues, name, lv.objective)
        check_rule(b.issues, name, lv.rule)
        if lv.max_gain is not None:
            check_max_gain(b.issues, name, lv)
        if lv.is_outer and getattr(lv.rule, "decay_to", "zero") != "zero":
            b.issues.add(("levels", name, "rule", "decay_to"), "decay_to applies to in-context levels only "
                         "(the outer level's weight decay is torch.optim's, toward zero); remove it")
        if lv.is_outer and getattr(lv.rule, "eps_root", None):
            b.issues.add(("levels", name, "rule", "eps_root"), "eps_root applies to in-context levels only "
                         "(the outer level trains with torch.optim, which has none); remove it")


def _check_output(b: _Build) -> None:
    spec = b.spec
    b.output = spec.output if spec.output is not None else spec.block[-1].id
    if spec.output is None:
        b.out_loc = ("block", len(spec.block) - 1)
    if spec.output is not None and spec.output not in b.first:
        b.issues.add(("output",), f"unknown node {spec.output!r}{suggest(spec.output, sorted(b.first))}")


def _check_cycles(b: _Build) -> None:
    data = b.data
    for comp in nx.strongly_connected_components(data):
        if len(comp) == 1:
            (only,) = comp
            if not data.has_edge(only, only):
                continue
        b.acyclic = False
        start = min(comp, key=lambda v: data.nodes[v]["index"])
        cycle = cycle_from(data.subgraph(comp), start)
        j = data.nodes[start]["index"]
        b.issues.add(("block", j, "in"), "cycle in the block: " + " -> ".join(cycle))


def _widths(b: _Build) -> None:
    """The execution order (ties keep the spec's order) and every node's width along it."""
    dim = b.spec.model.dim
    b.dims = {INPUT: dim}
    if not b.acyclic:
        return
    data = b.data
    by_index = {v: f"{data.nodes[v]['index'] + 1:09d}" for v in data}
    b.order = [v for v in nx.lexicographical_topological_sort(data, key=by_index.__getitem__) if v != INPUT]
    for nid in b.order:
        j = data.nodes[nid]["index"]
        w = width(b.spec.block[j], j, b.dims, dim, b.issues)
        if w is not None:
            b.dims[nid] = w
    if b.output in b.dims and b.dims[b.output] != dim:
        b.issues.add(b.out_loc, f"the block's output {b.output!r} is {b.dims[b.output]} wide, but must be "
                     f"model.dim = {dim} (the block is residual and stacked model.depth times)")


def _level_graph(b: _Build) -> LevelGraph:
    """The levels (fast to slow, outer last) and their typed edges."""
    spec, data, order, outer, periods = b.spec, b.data, b.order, b.outer, b.periods
    level_names = list(spec.levels)
    level_order = sorted(periods, key=lambda n: (periods[n], level_names.index(n))) + [outer]
    levels = nx.MultiDiGraph()
    for name in level_order:
        lv = spec.levels[name]
        levels.add_node(
            name,
            period=lv.period,
            rule=lv.rule.name,
            objective=None if lv.is_outer else lv.objective,
            grad=None if lv.is_outer else lv.grad,
            nodes=[nid for nid in order if data.nodes[nid].get("level") == name],
        )

    def link(u: str, v: str, kind: str, via: str | None = None, **attrs: Any) -> None:
        if levels.has_edge(u, v, key=kind):
            if via is not None and via not in levels.edges[u, v, kind]["via"]:
                levels.edges[u, v, kind]["via"].append(via)
            return
        levels.add_edge(u, v, key=kind, type=kind, via=[via] if via else [], **attrs)

    for slow, fast, nid in b.init_edges:
        link(slow, fast, "init", nid)
    for src, nid in b.generate_edges:
        a = data.nodes[src].get("level") or outer
        link(a, data.nodes[nid]["level"], "generate", nid)
    for nid in order:
        if data.nodes[nid]["op"] == "selfmod":
            lvl = data.nodes[nid]["level"]
            link(lvl, lvl, "generate", nid)
    # condition: plain data flow into each in-context node, and from the block's output into the
    # outer loss, seen through everything that is not itself an in-context node
    for nid in order:
        target = data.nodes[nid].get("level")
        if target is not None and target != outer:
            for a in upstream_levels(data, nid, outer):
                if a != target:
                    link(a, target, "condition", nid)
    for a in upstream_levels(data, b.output, outer, include_self=True):
        if a != outer:
            link(a, outer, "condition", b.output)
    for name in level_order[:-1]:
        mode = spec.levels[name].grad
        if mode != "stop":
            link(name, outer, "grad", mode=mode)
    for slow, fast, _ in b.init_edges:
        if slow != outer and spec.levels[fast].grad != "stop":
            link(fast, slow, "grad", mode=spec.levels[fast].grad)

    return LevelGraph(
        spec=spec, data=data, levels=levels, level_order=level_order, node_dims=b.dims, order=order,
        output=b.output, periods={n: periods[n] for n in level_order[:-1]},
        nested_inits={nid: slow for slow, _, nid in b.init_edges if slow != outer},
    )
