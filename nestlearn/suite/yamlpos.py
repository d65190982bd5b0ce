"""An experiment file's values and where each was written, read by the spec loader's own YAML
reader (``spec.document.compose``), so every problem reads ``file:line:col: path: message``
exactly as a spec's does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nestlearn.spec.document import compose
from nestlearn.spec.positions import SourceMap, positioned_issue


@dataclass
class PositionedYaml:
    """A parsed document and the positions of its keys and values, by path."""

    data: Any
    smap: SourceMap

    def message(self, loc: Sequence[str | int], message: str, *, key: bool = False) -> str:
        """``message`` at ``loc`` (or at its nearest written ancestor), positioned; ``key``: at
        the key rather than its value (an unknown field)."""
        return positioned_issue(tuple(loc), message, self.smap.position(loc, key=key)).format()


class PositionError(Exception):
    """Raised while parsing: ``str(err)`` is already positioned."""


def read_positioned(text: str, file: str) -> PositionedYaml:
    data, _, smap, issues = compose(text, file)
    if issues:
        raise PositionError("\n".join(issue.format() for issue in issues))
    return PositionedYaml(data, smap)
