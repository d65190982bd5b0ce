"""The level graph as Graphviz ``dot`` and Mermaid text."""

from __future__ import annotations

from nestlearn.graph.types import INPUT, LevelGraph

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
