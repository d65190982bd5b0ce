"""The level graph: the block's data flow and the levels' knowledge-transfer edges.

:func:`build_graph` checks everything that needs the whole spec (ids, cycles, levels, init
edges, sources, arities, widths, objectives, torchopt rules) before any tensor exists, and
reports *all* problems at once as one :class:`SpecError`, positioned in the spec's text.

Two graphs come out:

- ``data``: a DAG of the block's nodes plus the input node ``x``; edges carry what they feed
  (``in``, or ``query`` / ``key`` / ``value`` for a memory reading another node's output).
- ``levels``: one node per level, with typed edges (several may join the same two levels):

  - ``init``     slow -> fast: the fast level's initial state is a parameter of the slow one
    (the outer level's, meta-learned across sequences), or, from a slower *in-context* level, a
    state that level meta-learns in context and re-initialises the fast memory from at the start
    of each of its chunks (the nested CMS, Nested Learning Eq. 72; memory and mlp nodes);
  - ``generate`` a -> b: a node of level ``a`` produces keys/values of a memory of ``b``
    (a self-loop for self-modifying memories);
  - ``condition`` a -> b: plain data flow from ``a``'s nodes into ``b``'s;
  - ``grad``     fast -> slow: the slow level's parameters see the fast level's inner steps
    (the outer loss through the unrolled updates; ``mode`` is the fast level's ``grad``).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from nestlearn.spec.errors import SpecError, SpecIssue
from nestlearn.spec.loader import issue_at
from nestlearn.spec.schema import Spec, _suggest

__all__ = ["EDGE_TYPES", "INPUT", "LevelGraph", "ScheduleStep", "build_graph", "to_dot", "to_mermaid"]

INPUT = "x"
EDGE_TYPES = ("init", "generate", "condition", "grad")

VARIADIC_OPS = {"add", "mul"}
UNARY_OPS = {
    "rmsnorm", "layernorm", "l2norm", "linear", "conv", "act", "memory", "mlp", "attention", "selfmod", "mac",
}
SAME_WIDTH_OPS = {"rmsnorm", "layernorm", "l2norm", "conv", "act"}
MODEL_WIDTH_OPS = {"memory", "attention", "mlp", "selfmod", "mac"}
LEVEL_OPS = {"memory", "selfmod", "mlp", "mac"}
"""Ops whose parameters belong to a level named by their ``level`` field."""
PARAMETERLESS_OPS = {"add", "mul", "act", "l2norm"}
NEEDS_INPUTS_RULES = {"dgd"}
"""Rules whose step reads the memory's per-token layer inputs: no rule for a nested init's meta-step."""
SOURCE_ROLES = ("query", "key", "value")


@dataclass(frozen=True)
class ScheduleStep:
    """Tokens ``[start, end)`` of a stream, then the updates that follow token ``end - 1``.

    ``updates``: levels (fast to slow) whose period ends at ``end`` and that take one step of
    their rule on this chunk. ``every_token``: period-1 levels, which step after every token
    of the chunk. A final chunk shorter than a level's period does not update that level; its
    tokens are carried in the state until the period completes.
    """

    start: int
    end: int
    updates: tuple[str, ...]
    every_token: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "updates": list(self.updates),
                "every_token": list(self.every_token)}


@dataclass
class LevelGraph:
    """The validated structure of a spec (see the module docstring)."""

    spec: Spec
    data: nx.DiGraph
    levels: nx.MultiDiGraph
    level_order: list[str]
    """In-context levels fast to slow (by period, then declaration order), the outer level last."""
    node_dims: dict[str, int]
    """Output width of every node, ``x`` included."""
    order: list[str]
    """Block node ids in execution (topological) order; ties keep the spec's order."""
    output: str
    periods: dict[str, int] = field(default_factory=dict)
    """Period of every in-context level."""

    @property
    def outer(self) -> str:
        return self.level_order[-1]

    def node_level(self, node_id: str) -> str | None:
        """The level owning ``node_id``'s parameters (``None`` for parameterless ops)."""
        return self.data.nodes[node_id].get("level")  # type: ignore[no-any-return]

    def edges(self, kind: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
        """Level edges ``(src, dst, attrs)``, of one ``kind`` or all; ``attrs['type']`` is the kind."""
        return [(u, v, d) for u, v, d in self.levels.edges(data=True) if kind is None or d["type"] == kind]

    def schedule(self, n_tokens: int) -> list[ScheduleStep]:
        """Which levels update after which token offsets, chunk by chunk, over ``n_tokens``."""
        if not isinstance(n_tokens, int) or n_tokens <= 0:
            raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
        every = tuple(lv for lv in self.level_order if self.periods.get(lv) == 1)
        chunked = [lv for lv in self.level_order if self.periods.get(lv, 1) > 1]
        bounds = {n_tokens}
        for lv in chunked:
            p = self.periods[lv]
            bounds.update(range(p, n_tokens + 1, p))
        steps = []
        start = 0
        for end in sorted(bounds):
            updates = tuple(lv for lv in chunked if end % self.periods[lv] == 0)
            steps.append(ScheduleStep(start, end, updates, every))
            start = end
        return steps

    def default_tokens(self) -> int:
        """A stream length that shows every level's update at least twice (capped)."""
        chunked = [p for p in self.periods.values() if p > 1]
        if not chunked:
            return 8
        span = math.lcm(*chunked)
        if span > 1 << 16:
            span = max(chunked)
        return 2 * span if 2 * span // min(chunked) <= 64 else span

    def describe(self) -> dict[str, Any]:
        """A JSON-able description: levels, nodes, level edges."""
        levels = []
        for name in self.level_order:
            attrs = self.levels.nodes[name]
            levels.append({"name": name, **{k: v for k, v in attrs.items() if k != "spec"}})
        nodes = []
        for nid in self.order:
            attrs = self.data.nodes[nid]
            nodes.append({
                "id": nid, "op": attrs["op"], "in": list(attrs["inputs"]), "level": attrs.get("level"),
                "width": self.node_dims.get(nid),
                **{k: v for k, v in attrs.get("sources", {}).items()},
            })
        rank = {name: k for k, name in enumerate(self.level_order)}
        ordered = sorted(self.levels.edges(data=True),
                         key=lambda e: (EDGE_TYPES.index(e[2]["type"]), rank[e[0]], rank[e[1]]))
        edges = [{"type": d["type"], "from": u, "to": v, **{k: x for k, x in d.items() if k != "type"}}
                 for u, v, d in ordered]
        return {"levels": levels, "nodes": nodes, "edges": edges, "output": self.output}

    def to_dot(self) -> str:
        return to_dot(self)

    def to_mermaid(self) -> str:
        return to_mermaid(self)


# ----------------------------------------------------------------------------- building


class _Issues:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.items: list[SpecIssue] = []
        self._seen: set[tuple[tuple[Any, ...], str]] = set()

    def add(self, loc: Sequence[str | int], message: str) -> None:
        key = (tuple(loc), message)
        if key not in self._seen:
            self._seen.add(key)
            self.items.append(issue_at(self.spec, loc, message))

    def raise_if_any(self) -> None:
        if self.items:
            order = {id(i): n for n, i in enumerate(self.items)}
            self.items.sort(key=lambda i: (i.file, i.line or 0, i.col or 0, order[id(i)]))
            raise SpecError(self.items)


def _owner(node: Any, outer: str) -> str | None:
    if node.op in LEVEL_OPS:
        return str(node.level)
    if node.op in PARAMETERLESS_OPS:
        return None
    return outer


def _period_text(p: Any) -> str:
    return "outer" if p == "outer" else f"period {p}"


def build_graph(spec: Spec) -> LevelGraph:
    """Check ``spec`` as a whole and build its data and level graphs (no tensors involved).

    Raises :class:`SpecError` listing every problem found, each at its place in the spec.
    """
    issues = _Issues(spec)
    dim = spec.model.dim
    level_names = list(spec.levels)
    outer_names = [n for n, lv in spec.levels.items() if lv.is_outer]
    outer = outer_names[0] if outer_names else "outer"
    periods = {n: int(lv.period) for n, lv in spec.levels.items() if not lv.is_outer}

    # ---- ids
    block: list[Any] = list(spec.block)
    first: dict[str, int] = {}
    for j, node in enumerate(block):
        if node.id == INPUT:
            issues.add(("block", j, "id"), f"{INPUT!r} is reserved: it names the block's input")
        elif node.id in first:
            issues.add(("block", j, "id"), f"duplicate id {node.id!r} (already used by block.{first[node.id]}"
                       ")")
        else:
            first[node.id] = j
    ids = set(first)
    sources = ids | {INPUT}
    source_choices = sorted(sources)

    data = nx.DiGraph()
    data.add_node(INPUT, op="input", inputs=[], level=None, index=-1)
    for nid, j in first.items():
        node = spec.block[j]
        data.add_node(
            nid, op=node.op, inputs=node.input_ids(), level=_owner(node, outer), index=j, sources={}
        )

    # ---- inputs, arity, sources, levels, init edges
    used_levels = {outer}
    bad_levels = False  # a node naming a wrong level: "declared but unused" would only add noise
    init_edges: list[tuple[str, str, str]] = []  # (slow, fast, node id)
    generate_edges: list[tuple[str, str, str, str]] = []  # (src node, node id, role, ...)
    for j, node in enumerate(block):
        primary = first.get(node.id) == j
        inputs = node.input_ids()
        listed = isinstance(node.inputs, list)
        in_loc: tuple[str | int, ...] = ("block", j, "in")
        n = len(inputs)
        if node.op in VARIADIC_OPS and n < 2:
            issues.add(in_loc, f"'{node.op}' needs at least 2 inputs, got {n}")
        elif node.op in UNARY_OPS and n != 1:
            issues.add(in_loc, f"'{node.op}' takes exactly 1 input, got {n}")
        for k, src in enumerate(inputs):
            loc = (*in_loc, k) if listed else in_loc
            if src not in sources:
                issues.add(loc, f"unknown input {src!r}{_suggest(src, source_choices)}")
            elif primary:
                data.add_edge(src, node.id, role="in")

        for role in SOURCE_ROLES if node.op == "memory" else ():
            src = getattr(node, role, "proj")
            if src in ("proj", "input"):
                continue
            if src not in sources:
                hint = _suggest(src, ["proj", "input", *source_choices])
                issues.add(("block", j, role), f"unknown {role} source {src!r}: use 'proj', 'input' or a "
                           f"node id{hint}")
            elif primary:
                if not data.has_edge(src, node.id):
                    data.add_edge(src, node.id, role=role)
                data.nodes[node.id]["sources"][role] = src
                generate_edges.append((src, node.id, role, ""))

        if node.op in LEVEL_OPS:
            lvl = node.level
            if lvl not in spec.levels:
                issues.add(("block", j, "level"), f"unknown level {lvl!r}{_suggest(lvl, level_names)}")
                lvl, bad_levels = None, True
            else:
                used_levels.add(lvl)
                if node.op != "mlp" and spec.levels[lvl].is_outer:
                    issues.add(("block", j, "level"), f"a {node.op} node learns in context: its level must "
                               f"have a period, but {lvl!r} is the outer level")
                    lvl, bad_levels = None, True
            _check_init(spec, issues, j, node, lvl, periods, init_edges)
            if node.init in spec.levels:
                used_levels.add(node.init)

        if node.op in ("attention", "memory", "selfmod", "mac"):
            heads = getattr(node, "heads", None)
            if heads is not None and dim % heads:
                issues.add(("block", j, "heads"), f"heads {heads} does not divide the width {dim}")

    # ---- levels
    for name, lv in spec.levels.items():
        if name not in used_levels and not bad_levels:
            issues.add(("levels", name), f"level {name!r} is declared but no node uses it (give a memory, "
                       f"selfmod or mlp node 'level: {name}', or remove the level)")
        if lv.chunk is not None and lv.period != 1:
            issues.add(("levels", name, "chunk"), f"'chunk' applies to period-1 levels only; this level has "
                       f"{_period_text(lv.period)}")
        if lv.remat is not None:
            _check_remat(issues, name, lv)
        _check_objective(issues, name, lv.objective)
        _check_rule(issues, name, lv.rule)
        if lv.is_outer and getattr(lv.rule, "eps_root", None):
            issues.add(("levels", name, "rule", "eps_root"), "eps_root applies to in-context levels only "
                       "(the outer level trains with torch.optim, which has none); remove it")

    # ---- output
    output = spec.output if spec.output is not None else spec.block[-1].id
    out_loc: tuple[str | int, ...] = ("output",)
    if spec.output is None:
        out_loc = ("block", len(spec.block) - 1)
    if spec.output is not None and spec.output not in ids:
        issues.add(("output",), f"unknown node {spec.output!r}{_suggest(spec.output, sorted(ids))}")

    # ---- cycles
    acyclic = True
    for comp in nx.strongly_connected_components(data):
        if len(comp) == 1:
            (only,) = comp
            if not data.has_edge(only, only):
                continue
        acyclic = False
        start = min(comp, key=lambda v: data.nodes[v]["index"])
        cycle = _cycle_from(data.subgraph(comp), start)
        j = data.nodes[start]["index"]
        issues.add(("block", j, "in"), "cycle in the block: " + " -> ".join(cycle))

    # ---- widths
    dims: dict[str, int] = {INPUT: dim}
    order: list[str] = []
    if acyclic:
        by_index = {v: f"{data.nodes[v]['index'] + 1:09d}" for v in data}
        order = [v for v in nx.lexicographical_topological_sort(data, key=by_index.__getitem__) if v != INPUT]
        for nid in order:
            j = data.nodes[nid]["index"]
            w = _width(spec.block[j], j, dims, dim, issues)
            if w is not None:
                dims[nid] = w
        if output in dims and dims[output] != dim:
            issues.add(out_loc, f"the block's output {output!r} is {dims[output]} wide, but must be "
                       f"model.dim = {dim} (the block is residual and stacked model.depth times)")
    issues.raise_if_any()

    # ---- the level graph
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

    for slow, fast, nid in init_edges:
        link(slow, fast, "init", nid)
    for src, nid, _role, _ in generate_edges:
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
            for a in _upstream_levels(data, nid, outer):
                if a != target:
                    link(a, target, "condition", nid)
    for a in _upstream_levels(data, output, outer, include_self=True):
        if a != outer:
            link(a, outer, "condition", output)
    for name in level_order[:-1]:
        mode = spec.levels[name].grad
        if mode != "stop":
            link(name, outer, "grad", mode=mode)
    for slow, fast, _ in init_edges:
        if slow != outer and spec.levels[fast].grad != "stop":
            link(fast, slow, "grad", mode=spec.levels[fast].grad)

    return LevelGraph(
        spec=spec, data=data, levels=levels, level_order=level_order, node_dims=dims, order=order,
        output=output, periods={n: periods[n] for n in level_order[:-1]},
    )


def _check_init(
    spec: Spec, issues: _Issues, j: int, node: Any, lvl: str | None, periods: dict[str, int],
    init_edges: list[tuple[str, str, str]],
) -> None:
    init = getattr(node, "init", None)
    if init is None or init == "zeros":
        return
    loc = ("block", j, "init")
    if init not in spec.levels:
        issues.add(loc, f"unknown level {init!r}{_suggest(init, [*spec.levels, 'zeros'])} (init names the "
                   "slower level whose parameter is the initial state, or 'zeros')")
        return
    if lvl is None:
        return
    own, src = spec.levels[lvl], spec.levels[init]
    if own.is_outer:
        if not src.is_outer:
            issues.add(loc, f"init edge from a faster level: {init!r} ({_period_text(src.period)}) cannot "
                       f"initialise the outer level {lvl!r}")
        return
    if init == lvl:
        issues.add(loc, f"level {lvl!r} cannot initialise itself: name a slower level (e.g. "
                   f"{next(n for n, v in spec.levels.items() if v.is_outer)!r}) or 'zeros'")
        return
    if not src.is_outer:
        p, q = periods[lvl], periods[init]
        if q < p:
            issues.add(loc, f"init edge from a faster level: {init!r} (period {q}) is faster than this "
                       f"node's level {lvl!r} (period {p}); the initial state must come from a slower level")
            return
        if q % p:
            issues.add(loc, f"nested init: the period of {init!r} ({q}) must be a multiple of the period "
                       f"of {lvl!r} ({p})")
            return
        if node.op == "selfmod":
            outer = next(n for n, v in spec.levels.items() if v.is_outer)
            issues.add(loc, f"nested init from {init!r} is implemented for memory and mlp nodes; a selfmod "
                       f"node's memories start from the outer level (init: {outer}) or 'zeros'")
            return
        if src.rule.name in NEEDS_INPUTS_RULES:
            issues.add(loc, f"nested init: {init!r} meta-learns this node's initial state with one step of its "
                       f"rule per chunk, but its rule {src.rule.name!r} needs a memory's per-token layer "
                       "inputs, which that step does not have; give it another rule (e.g. sgd, momentum, adam)")
            return
    init_edges.append((init, lvl, node.id))


def _check_objective(issues: _Issues, level: str, objective: str) -> None:
    if objective in ("l2", "dot") or ":" not in objective:
        return
    loc = ("levels", level, "objective")
    module, _, attr = objective.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        issues.add(loc, f"cannot import module {module!r} for the objective ({exc})")
        return
    except Exception as exc:  # noqa: BLE001 - a user module failing at import is the user's error
        issues.add(loc, f"importing {module!r} failed: {type(exc).__name__}: {exc}")
        return
    fn = getattr(mod, attr, None)
    if fn is None:
        names = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n, None))]
        issues.add(loc, f"module {module!r} has no attribute {attr!r}{_suggest(attr, names)}")
    elif not callable(fn):
        issues.add(loc, f"{objective!r} is not callable")


def _check_remat(issues: _Issues, name: str, lv: Any) -> None:
    """``remat`` needs an inner loop and an executor that checkpointing can wrap (not torch.func)."""
    loc = ("levels", name, "remat")
    if lv.is_outer:
        issues.add(loc, "'remat' applies to in-context levels only (the outer level has no inner loop "
                   "to recompute); remove it")
        return
    try:
        from nestlearn.loops.executors import remat_available
        from nestlearn.rules import coerce

        rule = coerce(lv.rule)
    except Exception:  # noqa: BLE001  (a bad rule is reported by its own check)
        return
    if not remat_available(rule):
        issues.add(loc, f"'remat' is not available for rule {lv.rule.name!r}: its executor differentiates "
                   "with torch.func, which checkpointing cannot wrap (sgd, momentum and dgd levels can)")


def _check_rule(issues: _Issues, level: str, rule: Any) -> None:
    if getattr(rule, "name", None) != "torchopt":
        return
    loc = ("levels", level, "rule", "fn")
    try:
        import torchopt
    except Exception as exc:  # noqa: BLE001
        issues.add(loc, f"torchopt is not available ({type(exc).__name__}: {exc})")
        return
    names = [n for n in dir(torchopt) if not n.startswith("_") and n[:1].islower()
             and callable(getattr(torchopt, n, None))]
    fn = getattr(torchopt, rule.fn, None) if not rule.fn.startswith("_") else None
    if fn is None or not callable(fn):
        hint = _suggest(rule.fn, names) or " (e.g. sgd, adam, adamw, rmsprop)"
        issues.add(loc, f"torchopt has no transformation {rule.fn!r}{hint}")
        return
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(**rule.args)
    except TypeError as exc:
        params = [p for p in sig.parameters if p not in ("args", "kwargs")]
        issues.add(("levels", level, "rule", "args"), f"torchopt.{rule.fn} does not accept these arguments "
                   f"({exc}; it takes: {', '.join(params)})")


def _cycle_from(g: nx.DiGraph, start: str) -> list[str]:
    edges = nx.find_cycle(g, source=start)
    path = [str(edges[0][0])] + [str(v) for _, v, *_ in edges]
    # rotate so that the cycle reads from ``start`` (the node written first in the spec)
    if start in path[:-1]:
        k = path.index(start)
        path = path[k:-1] + path[:k] + [start]
    return path


def _upstream_levels(data: nx.DiGraph, node: str, outer: str, include_self: bool = False) -> set[str]:
    """Levels whose values reach ``node`` by plain data flow (``in`` edges): the nearest in-context
    nodes upstream, and ``outer`` where outer-level nodes or the block input ``x`` feed it."""
    found: set[str] = set()
    stack = [node] if include_self else [u for u, _, r in data.in_edges(node, data="role") if r == "in"]
    seen: set[str] = set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        level = data.nodes[v].get("level")
        if level is not None and level != outer:
            found.add(level)
            continue
        if v == INPUT or level == outer:
            found.add(outer)
        stack.extend(u for u, _, r in data.in_edges(v, data="role") if r == "in")
    return found


def _width(node: Any, j: int, dims: dict[str, int], dim: int, issues: _Issues) -> int | None:
    inputs = node.input_ids()
    widths = [dims.get(s) for s in inputs]
    if not widths or any(w is None for w in widths):
        return None  # an unknown input: already reported
    ws: list[int] = [w for w in widths if w is not None]
    op = node.op
    listed = isinstance(node.inputs, list)
    if op in SAME_WIDTH_OPS:
        return ws[0]
    if op == "linear":
        return int(node.dim) if node.dim is not None else ws[0]
    if op in VARIADIC_OPS:
        if len(set(ws)) > 1:
            parts = ", ".join(f"{s} ({w})" for s, w in zip(inputs, ws, strict=True))
            issues.add(("block", j, "in"), f"'{op}' inputs have different widths: {parts}")
        return ws[0]
    if op in MODEL_WIDTH_OPS:
        for k, (s, w) in enumerate(zip(inputs, ws, strict=True)):
            if w != dim:
                loc: tuple[str | int, ...] = ("block", j, "in", k) if listed else ("block", j, "in")
                issues.add(loc, f"'{op}' reads model.dim = {dim} wide inputs, but {s!r} is {w} wide")
        for role in SOURCE_ROLES if op == "memory" else ():
            src = getattr(node, role, "proj")
            if src in dims and dims[src] != dim:
                issues.add(("block", j, role), f"the {role} source {src!r} is {dims[src]} wide, but must be "
                           f"model.dim = {dim}")
        return dim
    return ws[0] if len(ws) == 1 else None


# ----------------------------------------------------------------------------- export

_PALETTE = ["#e8f0fe", "#fde7e9", "#e6f4ea", "#fef7e0", "#f3e8fd", "#e0f7fa", "#fce8d5", "#ececec"]
_EDGE_STYLE = {
    "init": ("bold", "#1a73e8"),
    "generate": ("dashed", "#d93025"),
    "condition": ("solid", "#5f6368"),
    "grad": ("dotted", "#188038"),
}


def _q(text: str) -> str:
    # labels carry dot's own ``\n`` escapes; names cannot contain backslashes or quotes
    return '"' + str(text).replace('"', "'") + '"'


def _colors(g: LevelGraph) -> dict[str | None, str]:
    colors: dict[str | None, str] = {None: "#ffffff"}
    for k, name in enumerate(g.level_order):
        colors[name] = _PALETTE[k % len(_PALETTE)]
    return colors


def _level_label(g: LevelGraph, name: str) -> str:
    a = g.levels.nodes[name]
    parts = [name, f"period {a['period']}", f"rule {a['rule']}"]
    if a["objective"]:
        parts.append(f"objective {a['objective']}")
    return "\\n".join(parts)


def to_dot(g: LevelGraph) -> str:
    """Graphviz ``dot`` text: the block's data flow and the level graph, coloured by level."""
    colors = _colors(g)
    out = [f"digraph {_q(g.spec.name.replace(chr(92), '/'))} {{", "  rankdir=TB;", "  compound=true;",
           '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11];',
           '  edge [fontname="Helvetica", fontsize=9];']
    out.append("  subgraph cluster_block {")
    out.append(f"    label={_q(f'block (x{g.spec.model.depth})')};")
    x_label = _q("x\\n" + str(g.node_dims[INPUT]))
    out.append(f'    {_q(INPUT)} [shape=ellipse, fillcolor="#ffffff", label={x_label}];')
    for nid in g.order:
        a = g.data.nodes[nid]
        lvl = a.get("level")
        label = f"{nid}\\n{a['op']} · {g.node_dims.get(nid, '?')}" + (f"\\n[{lvl}]" if lvl else "")
        extra = ", peripheries=2" if nid == g.output else ""
        out.append(f"    {_q(nid)} [label={_q(label)}, fillcolor={_q(colors.get(lvl, '#ffffff'))}{extra}];")
    for u, v, d in g.data.edges(data=True):
        if d.get("role", "in") == "in":
            out.append(f"    {_q(u)} -> {_q(v)};")
        else:
            out.append(f"    {_q(u)} -> {_q(v)} [style=dashed, color=\"#d93025\", label={_q(d['role'])}];")
    out.append("  }")
    out.append("  subgraph cluster_levels {")
    out.append('    label="levels";')
    for name in g.level_order:
        out.append(f"    {_q('level:' + name)} [shape=box3d, label={_q(_level_label(g, name))}, "
                   f"fillcolor={_q(colors[name])}];")
    for u, v, d in g.levels.edges(data=True):
        style, color = _EDGE_STYLE.get(d["type"], ("solid", "#000000"))
        label = d["type"] + (f" ({d['mode']})" if d.get("mode") else "")
        out.append(f"    {_q('level:' + u)} -> {_q('level:' + v)} [label={_q(label)}, style={style}, "
                   f"color={_q(color)}];")
    out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def _mq(text: str) -> str:
    return '"' + str(text).replace('"', "#quot;") + '"'


def to_mermaid(g: LevelGraph) -> str:
    """Mermaid ``flowchart`` text of the same picture as :func:`to_dot`."""
    colors = _colors(g)
    ids = {INPUT: "x_in"}
    for k, nid in enumerate(g.order):
        ids[nid] = f"n{k}"
    lids = {name: f"L{k}" for k, name in enumerate(g.level_order)}
    out = ["flowchart TB"]
    out.append(f"  subgraph block[{_mq(f'block × {g.spec.model.depth}')}]")
    out.append(f"    {ids[INPUT]}([{_mq(f'x · {g.node_dims[INPUT]}')}])")
    for nid in g.order:
        a = g.data.nodes[nid]
        lvl = a.get("level")
        label = f"{nid}<br/>{a['op']} · {g.node_dims.get(nid, '?')}" + (f"<br/>[{lvl}]" if lvl else "")
        shape = ("[[", "]]") if nid == g.output else ("[", "]")
        out.append(f"    {ids[nid]}{shape[0]}{_mq(label)}{shape[1]}")
    for u, v, d in g.data.edges(data=True):
        role = d.get("role", "in")
        if role == "in":
            out.append(f"    {ids[u]} --> {ids[v]}")
        else:
            out.append(f"    {ids[u]} -. {role} .-> {ids[v]}")
    out.append("  end")
    out.append("  subgraph levels[\"levels\"]")
    for name in g.level_order:
        label = _mq(_level_label(g, name).replace("\\n", "<br/>"))
        out.append(f"    {lids[name]}{{{{{label}}}}}")
    arrows = {"init": "==>", "generate": "-.->", "condition": "-->", "grad": "-.->"}
    for u, v, d in g.levels.edges(data=True):
        label = d["type"] + (f" ({d['mode']})" if d.get("mode") else "")
        out.append(f"    {lids[u]} {arrows.get(d['type'], '-->')}|{_mq(label)}| {lids[v]}")
    out.append("  end")
    for name in g.level_order:
        out.append(f"  classDef lv{lids[name]} fill:{colors[name]},stroke:#555")
        members = [ids[nid] for nid in g.order if g.data.nodes[nid].get("level") == name] + [lids[name]]
        out.append(f"  class {','.join(members)} lv{lids[name]}")
    return "\n".join(out) + "\n"
