"""The one error type a user's spec can cause, formatted ``file:line:col: path: message``,
and the phrases every user-facing message is built from (:func:`suggest`, :func:`show`)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Loc = tuple[str | int, ...]


@dataclass
class SpecIssue:
    """One problem in a spec: where it is (``loc`` in the document), and what is wrong."""

    loc: Loc
    message: str
    file: str = "<spec>"
    line: int | None = None
    col: int | None = None

    def format(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.col or 1}"
        path = ".".join(str(p) for p in self.loc)
        return f"{where}: {path}: {self.message}" if path else f"{where}: {self.message}"


@dataclass
class SpecError(Exception):
    """Raised for anything wrong with a spec or an override; never a bare traceback."""

    issues: list[SpecIssue] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(i.format() for i in self.issues)


def suggest(word: str, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.5) -> str:
    """The did-you-mean of every message: ``" (did you mean 'adam'?)"`` for the ``n`` choices
    closest to ``word`` (``" (did you mean 'a' or 'b'?)"``), ``""`` when none is close enough."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def show(value: Any) -> str:
    """A value as a message quotes it: YAML's words (``null``, ``true``), short strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!s} ({type(value).__name__})"


def type_phrase(value: Any) -> str:
    """What was written instead of the expected shape: ``a list``, ``the scalar 3``."""
    if isinstance(value, (dict, list)):
        return show(value)
    return f"the scalar {show(value)}"
