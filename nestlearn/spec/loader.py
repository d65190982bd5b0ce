"""Load a spec: read the file, apply its profile and the overrides, validate, explain what is wrong.

Every failure a user can cause (a missing or unreadable file, broken YAML, a duplicate key, a
value of the wrong type, an unknown name, a bad override) is a :class:`SpecError` whose issues
read ``file:line:col: path.to.field: message``. The pieces, in the order a spec goes through
them:

- :mod:`nestlearn.spec.document`  the YAML document, with a position for every value
- :mod:`nestlearn.spec.overrides` profiles and ``path.to.key=value`` overrides
- :mod:`nestlearn.spec.messages`  validation against the schema, errors worded for a user
- :mod:`nestlearn.spec.positions` the positions kept with the returned :class:`Spec`
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nestlearn.spec.document import load_document
from nestlearn.spec.errors import SpecError, SpecIssue
from nestlearn.spec.messages import issue_order, validate_document
from nestlearn.spec.overrides import (
    NO_PROFILE,
    apply_overrides,
    apply_profile,
    check_profiles,
    profile_issues,
    unknown_profile,
)
from nestlearn.spec.schema import Spec

__all__ = ["load_spec", "parse_spec", "profile_names", "spec_json_schema"]


def parse_spec(
    text: str, filename: str = "<spec>", overrides: Sequence[str] = (), profile: str | None = None,
) -> Spec:
    """Parse and validate a spec from YAML ``text`` (``filename`` is used in messages).

    ``profile``: ``None`` keeps the spec's ``profiles`` as written and applies none; a name
    applies that profile's overrides (before ``overrides``, which win) and resolves ``profiles``
    away; ``"none"`` applies none and resolves them away (the form a run directory records).
    Every profile is checked either way."""
    doc, smap = load_document(text, filename)
    issues: list[SpecIssue] = []
    profiles: dict[str, dict[str, Any]] = {}
    if "profiles" in doc:
        raw = doc.pop("profiles")
        if raw is not None:
            profiles, issues = check_profiles(raw, smap)
            issues += profile_issues(doc, smap, profiles)
    if profile is not None and profile != NO_PROFILE:
        if profile not in profiles:
            issues.append(unknown_profile(profile, profiles, smap))
        elif not issues:
            apply_profile(doc, smap, profile, profiles[profile])
    elif profile is None and profiles:
        doc["profiles"] = profiles
    try:
        apply_overrides(doc, overrides, smap)
        spec = validate_document(doc, smap)
    except SpecError as e:
        raise SpecError(sorted(issues + e.issues, key=issue_order)) from None
    if issues:
        raise SpecError(sorted(issues, key=issue_order))
    return spec


def _read_text(path: Path) -> str:
    name = str(path)

    def fail(message: str, line: int | None = None, col: int | None = None) -> SpecError:
        return SpecError([SpecIssue(loc=(), message=message, file=name, line=line, col=col)])

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise fail("no such file") from None
    except IsADirectoryError:
        raise fail("is a directory, not a spec file") from None
    except PermissionError:
        raise fail("cannot read the file: permission denied") from None
    except OSError as exc:
        raise fail(f"cannot read the file: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start
        line = data[:start].count(b"\n") + 1
        col = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise fail(f"not valid UTF-8 text (byte 0x{data[start]:02x})", line, col) from None


def load_spec(path: str | Path, overrides: Sequence[str] = (), profile: str | None = None) -> Spec:
    """Load, override and validate the spec at ``path``, applying its profile ``profile`` if
    given (see :func:`parse_spec`); :class:`SpecError` on any problem."""
    p = Path(path)
    return parse_spec(_read_text(p), str(path), overrides, profile)


def profile_names(path: str | Path) -> list[str]:
    """The names of the profiles the spec at ``path`` defines (it is validated first)."""
    return list(load_spec(path).profiles)


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of a spec (for editors' completion and validation)."""
    schema = Spec.model_json_schema(by_alias=True)
    schema.setdefault("$schema", "https://json-schema.org/draft/2020-12/schema")
    schema.setdefault("title", "nestlearn spec")
    return schema
