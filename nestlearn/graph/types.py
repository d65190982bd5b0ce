"""What the level graph says about a spec: ``LevelGraph`` and its ``ScheduleStep``s."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from nestlearn.spec.schema import Spec

INPUT = "x"
EDGE_TYPES = ("init", "generate", "condition", "grad")
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
    nested_inits: dict[str, str] = field(default_factory=dict)
    """Block node id -> the slower in-context level that meta-learns its initial state (the
    nested CMS, Nested Learning Eq. 72); nodes initialised from the outer level or zeros are absent."""

    @property
    def build_order(self) -> list[str]:
        """The order the compiled block builds and runs its ops: topological generations of the
        data flow (any topological order computes the same values; this one also fixes the order
        in which parameters are drawn at initialisation, so a seed gives the weights it always gave)."""
        return [v for gen in nx.topological_generations(self.data) for v in gen if v != INPUT]

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
        from nestlearn.graph.export import to_dot

        return to_dot(self)

    def to_mermaid(self) -> str:
        from nestlearn.graph.export import to_mermaid

        return to_mermaid(self)
