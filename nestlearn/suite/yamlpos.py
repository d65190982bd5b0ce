"""YAML with positions: the experiment file's values and where each was written, so that every
problem reads ``file:line:col: path.to.field: message`` like the spec loader's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

Loc = tuple[str | int, ...]


class PositionedYaml:
    """A parsed document and the (line, col) of every key and value, by path."""

    def __init__(self, text: str, file: str) -> None:
        self.file = file
        self.where: dict[Loc, tuple[int, int]] = {}
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data: Any = yaml.safe_load(text) if node is not None else None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line, col = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
            what = getattr(e, "problem", None) or str(e)
            raise PositionError(self.at_line(line, col, (), f"not valid YAML: {what}")) from None
        if node is not None:
            self._record(node, ())

    def _record(self, node: yaml.Node, loc: Loc) -> None:
        self.where.setdefault(loc, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
                # a problem with a whole mapping or list reads best at its key's line
                self.where[(*loc, key)] = (k.start_mark.line + 1, k.start_mark.column + 1)
                self._record(v, (*loc, key))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._record(v, (*loc, i))

    def position(self, loc: Sequence[str | int]) -> tuple[int | None, int | None]:
        """The position of ``loc`` or of its nearest written ancestor."""
        loc = tuple(loc)
        while loc and loc not in self.where:
            loc = loc[:-1]
        line, col = self.where.get(loc, (None, None))
        return line, col

    def at_line(self, line: int | None, col: int | None, loc: Sequence[str | int], message: str) -> str:
        where = self.file if line is None else f"{self.file}:{line}:{col or 1}"
        path = ".".join(str(p) for p in loc)
        return f"{where}: {path}: {message}" if path else f"{where}: {message}"

    def message(self, loc: Sequence[str | int], message: str) -> str:
        line, col = self.position(loc)
        return self.at_line(line, col, loc, message)


class PositionError(Exception):
    """Raised while parsing: ``str(err)`` is already positioned."""
