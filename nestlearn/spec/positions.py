"""Where each value of a spec was written: source positions kept beside a loaded :class:`Spec`.

A :class:`SourceMap` holds the position of every key and value of a document by its path
(``loc``); the loaders attach it to the spec they return, so that checks that run later (the
level graph, the compiler) can point at the same place (:func:`locate`, :func:`issue_at`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nestlearn.spec.errors import Loc, SpecIssue

if TYPE_CHECKING:
    from nestlearn.spec.schema import Spec

OVERRIDE_FILE = "<override>"
"""The file name of issues in ``path=value`` overrides (line = the override's number)."""


@dataclass(frozen=True)
class Position:
    """Where a value was written: a file (or ``<override>``), 1-based line and column."""

    file: str
    line: int | None = None
    col: int | None = None
    note: str = ""
    """Appended to messages about this value (the override text, for overridden values)."""


@dataclass
class Entry:
    value: Position
    key: Position | None = None
    collection: bool = False

    def best(self) -> Position:
        # A problem with a whole mapping or list reads best at its key (``levels.memory``'s
        # line); a problem with a scalar reads best at the value itself.
        if self.collection and self.key is not None:
            return self.key
        return self.value


@dataclass
class SourceMap:
    """Positions of every key and value of a loaded document, by their path (``loc``)."""

    file: str
    entries: dict[Loc, Entry] = field(default_factory=dict)

    def position(self, loc: Sequence[str | int], *, key: bool = False) -> Position:
        """The position of ``loc``, or of its deepest prefix that exists (for missing fields).

        ``key=True`` prefers the key's position (for unknown fields and bad mapping keys).
        """
        loc = tuple(loc)
        for n in range(len(loc), -1, -1):
            entry = self.entries.get(loc[:n])
            if entry is None:
                continue
            if key and n == len(loc) and entry.key is not None:
                return entry.key
            return entry.best()
        return Position(self.file)

    def drop(self, loc: Loc) -> None:
        """Forget the positions at and under ``loc`` (the value was replaced)."""
        n = len(loc)
        for k in [k for k in self.entries if k[:n] == loc]:
            del self.entries[k]


_SOURCES: dict[int, SourceMap] = {}


def attach(spec: Spec, smap: SourceMap) -> None:
    _SOURCES[id(spec)] = smap
    weakref.finalize(spec, _SOURCES.pop, id(spec), None)


def attach_source(copy: Spec, original: Spec) -> None:
    """Give ``copy`` (e.g. a ``model_copy`` of ``original``) the positions ``original`` was
    loaded from, so that issues found in it point into the same file."""
    smap = source_map(original)
    if smap is not None:
        attach(copy, smap)


def source_map(spec: Spec) -> SourceMap | None:
    """The positions a spec was loaded from (``None`` for a spec built in Python)."""
    return _SOURCES.get(id(spec))


def locate(spec: Spec, loc: Sequence[str | int]) -> tuple[str, int | None, int | None]:
    """``(file, line, col)`` of ``loc`` in the text ``spec`` was loaded from.

    A loc that does not exist in the document (a defaulted field) resolves to its deepest
    existing parent; a spec built in Python resolves to ``("<spec>", None, None)``.
    """
    smap = source_map(spec)
    if smap is None:
        return ("<spec>", None, None)
    pos = smap.position(loc)
    return (pos.file, pos.line, pos.col)


def issue_at(spec: Spec, loc: Sequence[str | int], message: str) -> SpecIssue:
    """A :class:`SpecIssue` for ``loc`` of ``spec``, positioned where it was written."""
    smap = source_map(spec)
    pos = smap.position(loc) if smap is not None else Position("<spec>")
    return positioned_issue(tuple(loc), message, pos)


def printable_loc(loc: Sequence[str | int]) -> Loc:
    """Path elements as they print on one line (a key may hold a newline or a control char)."""
    return tuple(
        el if not isinstance(el, str) or el.isprintable() else el.encode("unicode_escape").decode("ascii")
        for el in loc
    )


def positioned_issue(loc: Loc, message: str, pos: Position) -> SpecIssue:
    if pos.note:
        message = f"{message} {pos.note}"
    return SpecIssue(loc=printable_loc(loc), message=message, file=pos.file, line=pos.line, col=pos.col)
