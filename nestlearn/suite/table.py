"""Tables for people and for pipes: markdown, JSON, a rich table on a terminal, and plain text
that fits a given width (80 columns by default) when output is not a terminal.

Independent of the suite (``nestlearn compare --format`` can reuse it): a ``Table`` is a title,
column names, rows of already formatted cells and notes.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

FORMATS = ("md", "json", "table")
MIN_LABEL = 8  # the first column is never cut shorter than this


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    align: list[str] = field(default_factory=list)
    """'l' or 'r' per column (default: the first left, the rest right)."""
    notes: list[str] = field(default_factory=list)

    def aligns(self) -> list[str]:
        return self.align or ["l"] + ["r"] * (len(self.columns) - 1)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "~"


def _md_cell(text: str) -> str:
    """A cell (or heading) of a markdown table: a literal ``|`` would start another column."""
    return text.replace("|", "\\|")


def render_md(tables: Sequence[Table]) -> str:
    out = []
    for t in tables:
        out.append(f"### {t.title}\n")
        out.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
        out.append("|" + "|".join(":--" if a == "l" else "--:" for a in t.aligns()) + "|")
        out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows)
        out.extend(f"\n{n}" for n in t.notes)
        out.append("")
    return "\n".join(out)


def _plain_block(cols: list[int], t: Table, widths: list[int], label_w: int) -> list[str]:
    aligns = t.aligns()

    def line(cells: list[str]) -> str:
        parts = []
        for i in cols:
            w = label_w if i == 0 else widths[i]
            c = _cut(cells[i], w)
            parts.append(c.ljust(w) if aligns[i] == "l" else c.rjust(w))
        return "  ".join(parts).rstrip()

    head = line(t.columns)
    rule = "  ".join("-" * (label_w if i == 0 else widths[i]) for i in cols)
    return [head, rule] + [line(r) for r in t.rows]


def render_plain(tables: Sequence[Table], width: int = 80) -> str:
    """Fixed-width text no wider than ``width``: the first column is shortened first (down to
    ``MIN_LABEL``); if the rest still does not fit, the other columns are split over several
    blocks, each repeating the first (a column wider than a whole line is cut)."""
    out = []
    for t in tables:
        n = len(t.columns)
        widths = [max([len(t.columns[i])] + [len(r[i]) for r in t.rows]) for i in range(n)]
        rest = sum(widths[1:]) + 2 * (n - 1)
        if widths[0] + rest <= width:
            label_w = widths[0]
        elif MIN_LABEL + rest <= width:
            label_w = width - rest
        else:
            label_w = min(widths[0], max(MIN_LABEL, width // 3))
            widths = [widths[0]] + [min(w, width - label_w - 2) for w in widths[1:]]
        groups: list[list[int]] = []
        cur: list[int] = []
        used = label_w
        for i in range(1, n):
            if cur and used + 2 + widths[i] > width:
                groups.append(cur)
                cur, used = [], label_w
            cur.append(i)
            used += 2 + widths[i]
        groups.append(cur)
        out.append(_cut(t.title, width))
        for g in groups:
            out.extend(_plain_block([0, *g], t, widths, label_w))
            out.append("")
        out.extend(textwrap.fill(x, width, break_on_hyphens=False) for x in t.notes)
        if t.notes:
            out.append("")
    return "\n".join(out)


def render_rich(tables: Sequence[Table], file: TextIO | None = None, width: int | None = None) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console(file=file, width=width)
    for t in tables:
        # no box: two spaces between columns, as in the plain text, so the numbers fit 80 columns
        rt = RichTable(title=t.title, box=None, title_justify="left", header_style="bold underline",
                       pad_edge=False, padding=(0, 1))
        last = len(t.columns) - 1
        for i, (name, a) in enumerate(zip(t.columns, t.aligns(), strict=True)):
            # numbers never wrap; the last column (flags, notes) takes what room is left
            rt.add_column(name, justify="left" if a == "l" else "right", no_wrap=i < last,
                          overflow="ellipsis" if i < last else "fold")
        for r in t.rows:
            rt.add_row(*r)
        console.print(rt)
        for note in t.notes:
            console.print(note, highlight=False, markup=False)


def render(tables: Sequence[Table], fmt: str | None = None, file: TextIO | None = None,
           data: Any = None, width: int = 80) -> None:
    """Write ``tables`` to ``file`` (stdout) as ``fmt``: ``md``, ``json`` (``data`` when given, else
    the tables), ``table`` (rich on a terminal, plain text of ``width`` columns otherwise);
    ``None``: ``table`` on a terminal, ``md`` otherwise."""
    file = file or sys.stdout
    tty = file.isatty()
    fmt = fmt or ("table" if tty else "md")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}' (choices: {', '.join(FORMATS)})")
    if fmt == "json":
        payload = data if data is not None else [asdict(t) for t in tables]
        file.write(json.dumps(payload, indent=2, default=str) + "\n")
    elif fmt == "md":
        file.write(render_md(tables) + "\n")
    elif tty:
        render_rich(tables, file)
    else:
        file.write(render_plain(tables, width) + "\n")
