"""The level graph: the block's data flow and the levels' knowledge-transfer edges.

:func:`build_graph` (``build.py``, in named steps; the checks in ``checks.py``) checks
everything that needs the whole spec (ids, cycles, levels, init edges, sources, arities, widths,
objectives, torchopt rules) before any tensor exists, and reports *all* problems at once as one
:class:`SpecError`, positioned in the spec's text.

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

``LevelGraph`` (``types.py``) also carries what compiling needs, computed once here: the build
order, every node's width and the nested inits (``compile.compile_spec`` builds from it).
Export to Graphviz / Mermaid: ``export.py``.
"""

from nestlearn.graph.build import build_graph
from nestlearn.graph.export import to_dot, to_mermaid
from nestlearn.graph.types import EDGE_TYPES, INPUT, LevelGraph, ScheduleStep

__all__ = ["EDGE_TYPES", "INPUT", "LevelGraph", "ScheduleStep", "build_graph", "to_dot", "to_mermaid"]
