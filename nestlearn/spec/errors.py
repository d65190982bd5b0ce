"""The one error type a user's spec can cause, formatted ``file:line:col: path: message``."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    @classmethod
    def single(cls, loc: Loc, message: str) -> SpecError:
        return cls([SpecIssue(loc=loc, message=message)])
