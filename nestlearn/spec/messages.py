"""pydantic's validation errors -> one positioned, plain-English issue each.

``validate_document`` validates a raw document against the schema; every error becomes a
:class:`SpecIssue` at the position the value was written, worded for a user (``expected an
integer > 0, got -3``, ``unknown field 'widnow' (did you mean 'window'?)``).
"""

from __future__ import annotations

import re
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from nestlearn.spec.errors import Loc, SpecError, SpecIssue, show, suggest
from nestlearn.spec.positions import OVERRIDE_FILE, SourceMap, attach, positioned_issue
from nestlearn.spec.schema import GRAD_MODE, IDENT, Spec
from nestlearn.spec.walk import (
    Walk,
    describe,
    field_names,
    is_model,
    is_union,
    members,
    tag_values,
    unwrap,
    walk_loc,
)


def _quoted(text: str) -> list[str]:
    return re.findall(r"'([^']*)'", text)


def _bound_message(err: dict[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    value = err.get("input")
    sym = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    key = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}
    t = err["type"]
    bound = ctx.get(key[t])
    kind = "an integer" if isinstance(bound, int) and not isinstance(bound, bool) else "a number"
    shown = f"{bound:g}" if isinstance(bound, float) else str(bound)
    return f"expected {kind} {sym[t]} {shown}, got {show(value)}"


def _message(err: dict[str, Any], walk: Walk) -> str:
    if walk.message is not None:
        return walk.message
    t = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if t == "missing":
        return "required field is missing"
    if t == "extra_forbidden":
        key = walk.loc[-1] if walk.loc else "?"
        names = sorted(set(field_names(walk.parent_model).values())) if walk.parent_model else []
        hint = suggest(str(key), names) or (f" (allowed: {', '.join(names)})" if names else "")
        return f"unknown field {key!r}{hint}"
    if t in ("union_tag_invalid", "union_tag_not_found"):
        d = (ctx.get("discriminator") or "").strip("'")
        tags = _quoted(ctx.get("expected_tags", ""))
        if not tags and walk.end_type is not None and is_union(walk.end_type):
            tags = [v for m in members(walk.end_type) for v in tag_values(m, d)]
        last = walk.loc[-1] if walk.loc else None
        what = d if d == "op" or not isinstance(last, str) else last
        if t == "union_tag_not_found":
            return f"required field is missing (one of: {', '.join(tags)})"
        tag = ctx.get("tag", "")
        hint = suggest(str(tag), tags) or f" (expected one of: {', '.join(tags)})"
        return f"unknown {what} {tag!r}{hint}"
    if t in ("model_type", "model_attributes_type", "dict_type", "mapping_type"):
        return f"expected a mapping, got {show(value)}"
    if t in ("list_type", "tuple_type", "iterable_type"):
        return f"expected a list, got {show(value)}"
    if t in ("string_type", "string_unicode"):
        return f"expected a string, got {show(value)}"
    if t in ("int_type", "int_parsing", "int_from_float", "int_parsing_size"):
        return f"expected an integer, got {show(value)}"
    if t in ("float_type", "float_parsing"):
        return f"expected a number, got {show(value)}"
    if t == "finite_number":
        return f"expected a finite number, got {show(value)}"
    if t in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {show(value)}"
    if t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return _bound_message(err)
    if t == "literal_error":
        expected = ctx.get("expected", "")
        hint = suggest(value, _quoted(expected)) if isinstance(value, str) else ""
        if walk.loc == ("nestlearn",):
            return f"unsupported format version {show(value)} (this nestlearn reads {expected})"
        return f"expected {expected}, got {show(value)}{hint}"
    if t == "string_pattern_mismatch":
        pattern = ctx.get("pattern", "")
        if pattern == IDENT:
            what = "name" if walk.key_error else "id"
            return (f"invalid {what} {show(value)}: use letters, digits, '_' and '-', "
                    "starting with a letter or '_'")
        if pattern == GRAD_MODE:
            modes = ["unroll", "first_order", "stop", "truncate:N"]
            hint = suggest(str(value), modes[:3]) if isinstance(value, str) else ""
            return f"unknown gradient mode {show(value)}: use unroll, first_order, stop or truncate:N{hint}"
        return f"{show(value)} does not match the pattern {pattern}"
    if t in ("too_short", "too_long"):
        n = ctx.get("min_length" if t == "too_short" else "max_length")
        more = "at least" if t == "too_short" else "at most"
        return f"expected {more} {n} item{'s' if n != 1 else ''}, got {ctx.get('actual_length')}"
    if t in ("value_error", "assertion_error"):
        return str(ctx.get("error", err.get("msg", ""))).removeprefix("Value error, ")
    if t == "invalid_key":
        return f"keys must be strings, got {show(value)}"
    msg = str(err.get("msg", "invalid value"))
    return f"{msg[:1].lower()}{msg[1:]}, got {show(value)}"


def _get(data: Any, loc: Loc) -> Any:
    cur = data
    for el in loc:
        try:
            cur = cur[el]
        except (KeyError, IndexError, TypeError):
            return None
    return cur


def _type_matches(value: Any, member: Any) -> bool:
    base, _, _ = unwrap(member)
    if get_origin(base) is Literal:
        return any(type(v) is type(value) for v in get_args(base))
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base in (str, bool):
        return type(value) is base
    return False


def _union_issues(
    prefix: Loc, union: Any, errs: list[tuple[dict[str, Any], Walk]], data: Any, smap: SourceMap
) -> list[SpecIssue]:
    """One smart-union failure (pydantic reports one error list per member) -> the issues of the
    member the user evidently meant, or one summary ``expected A, B or C, got X``."""
    value = _get(data, prefix)
    by_tag: dict[str, list[tuple[dict[str, Any], Walk]]] = {}
    for e, w in errs:
        if w.union is not None:
            by_tag.setdefault(w.union[1], []).append((e, w))
    chosen: str | None = None
    if isinstance(value, dict):
        # the mapping member sharing the most keys with what was written
        best = 0
        for m in members(union):
            base, _, _ = unwrap(m)
            if not is_model(base) or base.__name__ not in by_tag:
                continue
            score = len(set(map(str, value)) & set(field_names(base)))
            if score > best:
                best, chosen = score, base.__name__
    elif isinstance(value, list):
        chosen = next((t for t in by_tag if t.startswith("list[")), None)
    else:
        # a scalar of the right Python type for exactly one (non-literal) member: its message is
        # the precise one ("expected an integer > 0, got -3")
        matching = [m for m in members(union) if _type_matches(value, m)]
        if len(matching) == 1 and get_origin(unwrap(matching[0])[0]) is not Literal:
            chosen = next((t for t in by_tag if _member_tag_ok(matching[0], t)), None)
    if chosen is not None:
        return [
            positioned_issue(w.loc, _message(e, w), smap.position(w.loc, key=_keyish(e, w))) for e, w in by_tag[chosen]
        ]
    hint = ""
    if isinstance(value, str):
        words = [
            str(v)
            for m in members(union)
            if get_origin(unwrap(m)[0]) is Literal
            for v in get_args(unwrap(m)[0])
        ]
        hint = suggest(value, words)
    return [positioned_issue(prefix, f"expected {describe(union)}, got {show(value)}{hint}", smap.position(prefix))]


def _member_tag_ok(member: Any, tag: str) -> bool:
    base, _, _ = unwrap(member)
    if is_model(base):
        return base.__name__ == tag
    if get_origin(base) is Literal:
        return tag.startswith("literal[")
    if get_origin(base) is list:
        return tag.startswith("list[")
    name = getattr(base, "__name__", "")
    return bool(name) and (tag == name or tag.endswith("-" + name))


def _keyish(err: dict[str, Any], walk: Walk) -> bool:
    return err["type"] in ("extra_forbidden", "invalid_key") or walk.key_error


def _remap(err: dict[str, Any], walk: Walk, data: Any) -> Walk:
    """Point model-level validator errors at the field they are about."""
    msg = str((err.get("ctx") or {}).get("error", ""))
    if err["type"] != "value_error":
        return walk
    if walk.loc == () and "period: outer" in msg:
        levels = data.get("levels") if isinstance(data, dict) else None
        if isinstance(levels, dict):
            outer = [k for k, v in levels.items() if isinstance(v, dict) and v.get("period") == "outer"]
            if len(outer) > 1:
                return Walk(
                    loc=("levels", outer[1], "period"),
                    message=f"a second outer level (level {outer[0]!r} already has 'period: outer'; "
                    "exactly one level is the outer training loop)",
                )
        return Walk(
            loc=("levels",),
            message="no level has 'period: outer' (exactly one level must be the outer training loop)",
        )
    if walk.loc == ("model",) and "heads" in msg:
        return Walk(loc=("model", "heads"))
    return walk


def validation_issues(exc: ValidationError, data: Any, smap: SourceMap) -> list[SpecIssue]:
    plain: list[SpecIssue] = []
    unions: dict[Loc, tuple[Any, list[tuple[dict[str, Any], Walk]]]] = {}
    for err in exc.errors(include_url=False):
        e: dict[str, Any] = dict(err)
        walk = _remap(e, walk_loc(e["loc"]), data)
        if walk.union is not None:
            prefix, _, union = walk.union
            unions.setdefault(prefix, (union, []))[1].append((e, walk))
            continue
        loc = walk.loc
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            d = str((e.get("ctx") or {}).get("discriminator", "")).strip("'")
            loc = (*loc, d) if d else loc
        plain.append(positioned_issue(loc, _message(e, walk), smap.position(loc, key=_keyish(e, walk))))
    for prefix, (union, errs) in unions.items():
        plain.extend(_union_issues(prefix, union, errs, data, smap))
    seen: set[tuple[Loc, str]] = set()
    out = []
    for issue in plain:
        k = (issue.loc, issue.message)
        if k not in seen:
            seen.add(k)
            out.append(issue)
    return sorted(out, key=issue_order)


def issue_order(issue: SpecIssue) -> tuple[int, int, int, str]:
    return (issue.file == OVERRIDE_FILE, issue.line or 0, issue.col or 0, issue.message)


def validate_document(data: dict[str, Any], smap: SourceMap) -> Spec:
    """Validate a raw document against the schema; every problem becomes a positioned issue."""
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(validation_issues(exc, data, smap)) from None
    attach(spec, smap)
    return spec
