"""The checks ``build_graph`` runs: each adds positioned issues to an ``Issues`` list."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

import networkx as nx

from nestlearn.graph.types import INPUT, SOURCE_ROLES
from nestlearn.spec.errors import SpecError, SpecIssue, suggest
from nestlearn.spec.positions import issue_at
from nestlearn.spec.schema import Spec


class Issues:
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


def period_text(p: Any) -> str:
    return "outer" if p == "outer" else f"period {p}"


def check_init(
    spec: Spec, issues: Issues, j: int, node: Any, lvl: str | None, periods: dict[str, int],
    init_edges: list[tuple[str, str, str]],
) -> None:
    init = getattr(node, "init", None)
    loc = ("block", j, "init")
    if init == "zeros" and node.op == "selfmod":
        # its k / v / lr / decay generators would start at zero: zero keys, so they never learn
        issues.add(loc, "a selfmod node cannot start from 'zeros': its k/v/lr/decay generators would "
                   "generate zero keys and never learn; name the outer level "
                   f"({next(n for n, v in spec.levels.items() if v.is_outer)!r})")
        return
    if init is None or init == "zeros":
        return
    if init not in spec.levels:
        issues.add(loc, f"unknown level {init!r}{suggest(init, [*spec.levels, 'zeros'])} (init names the "
                   "slower level whose parameter is the initial state, or 'zeros')")
        return
    if lvl is None:
        return
    own, src = spec.levels[lvl], spec.levels[init]
    if own.is_outer:
        if not src.is_outer:
            issues.add(loc, f"init edge from a faster level: {init!r} ({period_text(src.period)}) cannot "
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
        if not node.nests:
            outer = next(n for n, v in spec.levels.items() if v.is_outer)
            issues.add(loc, f"nested init from {init!r} is implemented for memory and mlp nodes; a {node.op} "
                       f"node's memories start from the outer level (init: {outer}) or 'zeros'")
            return
        if _needs_inputs(src.rule.name):
            issues.add(loc, f"nested init: {init!r} meta-learns this node's initial state with one step of its "
                       f"rule per chunk, but its rule {src.rule.name!r} needs a memory's per-token layer "
                       "inputs, which that step does not have; give it another rule (e.g. sgd, momentum, adam)")
            return
    init_edges.append((init, lvl, node.id))


def _needs_inputs(rule_name: str) -> bool:
    """The rule's step reads the memory's per-token layer inputs (``Rule.needs_inputs``): it
    cannot be a nested init's meta-step, which has none."""
    from nestlearn.rules import RULES

    return RULES[rule_name].cls.needs_inputs


def check_objective(issues: Issues, level: str, objective: str) -> None:
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
        issues.add(loc, f"module {module!r} has no attribute {attr!r}{suggest(attr, names)}")
    elif not callable(fn):
        issues.add(loc, f"{objective!r} is not callable")


def check_remat(issues: Issues, name: str, lv: Any) -> None:
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


def check_max_gain(issues: Issues, name: str, lv: Any) -> None:
    """``max_gain`` bounds the ``l2`` objective's chunk step of a rule that sums gradients."""
    loc = ("levels", name, "max_gain")
    if lv.is_outer:
        issues.add(loc, "'max_gain' applies to in-context levels only (the outer level's steps are "
                   "torch.optim's); remove it")
    elif lv.objective != "l2":
        issues.add(loc, f"'max_gain' bounds the l2 objective's chunk step; this level's objective is "
                   f"{lv.objective!r} (use 'clip' to bound its steps)")
    else:
        from nestlearn.stability import rule_fact

        if not rule_fact(lv.rule, "sums_gradients"):
            issues.add(loc, f"'max_gain' bounds a step that sums gradients (sgd, momentum, dgd); rule "
                       f"{lv.rule.name!r} does not (use 'clip' to bound its steps)")


def check_rule(issues: Issues, level: str, rule: Any) -> None:
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
        hint = suggest(rule.fn, names) or " (e.g. sgd, adam, adamw, rmsprop)"
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


def cycle_from(g: nx.DiGraph, start: str) -> list[str]:
    edges = nx.find_cycle(g, source=start)
    path = [str(edges[0][0])] + [str(v) for _, v, *_ in edges]
    # rotate so that the cycle reads from ``start`` (the node written first in the spec)
    if start in path[:-1]:
        k = path.index(start)
        path = path[k:-1] + path[:k] + [start]
    return path


def upstream_levels(data: nx.DiGraph, node: str, outer: str, include_self: bool = False) -> set[str]:
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


def width(node: Any, j: int, dims: dict[str, int], dim: int, issues: Issues) -> int | None:
    inputs = node.input_ids()
    widths = [dims.get(s) for s in inputs]
    if not widths or any(w is None for w in widths):
        return None  # an unknown input: already reported
    ws: list[int] = [w for w in widths if w is not None]
    op = node.op
    listed = isinstance(node.inputs, list)
    if node.variadic:
        if len(set(ws)) > 1:
            parts = ", ".join(f"{s} ({w})" for s, w in zip(inputs, ws, strict=True))
            issues.add(("block", j, "in"), f"'{op}' inputs have different widths: {parts}")
        return ws[0]
    if node.out_width == "same":
        return ws[0]
    if node.out_width == "dim":
        return int(node.dim) if node.dim is not None else ws[0]
    for k, (s, w) in enumerate(zip(inputs, ws, strict=True)):  # "model": model.dim in and out
        if w != dim:
            loc: tuple[str | int, ...] = ("block", j, "in", k) if listed else ("block", j, "in")
            issues.add(loc, f"'{op}' reads model.dim = {dim} wide inputs, but {s!r} is {w} wide")
    for role in SOURCE_ROLES if op == "memory" else ():
        src = getattr(node, role, "proj")
        if src in dims and dims[src] != dim:
            issues.add(("block", j, role), f"the {role} source {src!r} is {dims[src]} wide, but must be "
                       f"model.dim = {dim}")
    return dim
