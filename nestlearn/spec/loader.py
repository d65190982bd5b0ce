"""Load a spec from YAML with source positions, apply overrides, and explain what is wrong.

Every failure a user can cause here (a missing or unreadable file, broken YAML, a duplicate
key, a value of the wrong type, an unknown name, a bad override) is a :class:`SpecError` whose
issues read ``file:line:col: path.to.field: message``. Positions come from the YAML node
marks (:func:`yaml.compose`) and are kept with the returned :class:`Spec`, so that the graph
checks that run later can point at the same place (:func:`locate`).
"""

from __future__ import annotations

import copy
import inspect
import re
import types
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from nestlearn.spec.errors import Loc, SpecError, SpecIssue
from nestlearn.spec.schema import GRAD_MODE, IDENT, Spec, _suggest

__all__ = [
    "SourceMap",
    "load_spec",
    "parse_spec",
    "load_document",
    "apply_overrides",
    "validate_document",
    "locate",
    "issue_at",
    "source_map",
    "spec_json_schema",
    "profile_names",
    "profile_overrides",
    "NO_PROFILE",
]

OVERRIDE_FILE = "<override>"

# ----------------------------------------------------------------------------- source positions


@dataclass(frozen=True)
class Position:
    """Where a value was written: a file (or ``<override>``), 1-based line and column."""

    file: str
    line: int | None = None
    col: int | None = None
    note: str = ""
    """Appended to messages about this value (the override text, for overridden values)."""


@dataclass
class _Entry:
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
    entries: dict[Loc, _Entry] = field(default_factory=dict)

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


def _attach(spec: Spec, smap: SourceMap) -> None:
    _SOURCES[id(spec)] = smap
    weakref.finalize(spec, _SOURCES.pop, id(spec), None)


def attach_source(copy: Spec, original: Spec) -> None:
    """Give ``copy`` (e.g. a ``model_copy`` of ``original``) the positions ``original`` was
    loaded from, so that issues found in it point into the same file."""
    smap = source_map(original)
    if smap is not None:
        _attach(copy, smap)


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
    return _issue(tuple(loc), message, pos)


def _printable_loc(loc: Sequence[str | int]) -> Loc:
    """Path elements as they print on one line (a key may hold a newline or a control char)."""
    return tuple(
        el if not isinstance(el, str) or el.isprintable() else el.encode("unicode_escape").decode("ascii")
        for el in loc
    )


def _issue(loc: Loc, message: str, pos: Position) -> SpecIssue:
    if pos.note:
        message = f"{message} {pos.note}"
    return SpecIssue(loc=_printable_loc(loc), message=message, file=pos.file, line=pos.line, col=pos.col)


# ----------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """A safe loader; one instance per document."""


def _mark_pos(file: str, mark: Any, line_offset: int = 0, col_offset: int = 0) -> Position:
    if mark is None:
        return Position(file)
    line = mark.line + 1
    col = mark.column + 1
    if line_offset:  # overrides: one line per override, columns counted in its text
        return Position(file, line_offset, col + col_offset)
    return Position(file, line, col)


def _line_col(text: str, index: int) -> tuple[int, int]:
    before = text[:index]
    line = before.count("\n") + 1
    return line, index - (before.rfind("\n") + 1) + 1


def _yaml_error(exc: yaml.YAMLError, text: str, file: str, line_offset: int, col_offset: int) -> SpecIssue:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        parts = [p for p in (exc.context, exc.problem) if p]
        what = ", ".join(parts) if parts else "cannot be read"
        pos = _mark_pos(file, mark, line_offset, col_offset)
        return SpecIssue(loc=(), message=f"invalid YAML: {what}", file=pos.file, line=pos.line, col=pos.col)
    if isinstance(exc, yaml.reader.ReaderError):
        line, col = _line_col(text, exc.position)
        if line_offset:
            line, col = line_offset, col + col_offset
        char = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "?")
        msg = f"invalid YAML: unacceptable character #x{char:04x}"
        return SpecIssue(loc=(), message=msg, file=file, line=line, col=col)
    return SpecIssue(loc=(), message=f"invalid YAML: {exc}", file=file, line=line_offset or 1, col=1)


def _scalar_key(node: yaml.Node) -> Any:
    """A hashable identity for a mapping key node (for the duplicate check)."""
    if isinstance(node, yaml.ScalarNode):
        return (node.tag, node.value)
    return None


MAX_NODES = 200_000
"""A document whose aliases expand to more values than this is refused (the "billion laughs")."""


def _expanded_size(node: yaml.Node, path: frozenset[int], count: list[int]) -> None:
    count[0] += 1
    if count[0] > MAX_NODES or id(node) in path:
        return
    path = path | {id(node)}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            _expanded_size(key_node, path, count)
            _expanded_size(value_node, path, count)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _expanded_size(item, path, count)


def _check_duplicates(
    node: yaml.Node, loc: Loc, file: str, issues: list[SpecIssue], lo: int, co: int, seen: set[int]
) -> None:
    if id(node) in seen:  # an alias of a node on the current path (a recursive structure)
        return
    seen = seen | {id(node)}
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, yaml.Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            ident = _scalar_key(key_node)
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            if ident is not None and ident in first:
                prev = first[ident].start_mark.line + 1
                pos = _mark_pos(file, key_node.start_mark, lo, co)
                where = f"line {prev}" if not lo else "earlier in the same override"
                issues.append(
                    SpecIssue(
                        loc=_printable_loc((*loc, name)),
                        message=f"duplicate key {name!r} (first given at {where})",
                        file=pos.file,
                        line=pos.line,
                        col=pos.col,
                    )
                )
            elif ident is not None:
                first[ident] = key_node
            _check_duplicates(value_node, (*loc, name), file, issues, lo, co, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, (*loc, i), file, issues, lo, co, seen)


def _record(
    loader: _Loader,
    node: yaml.Node,
    data: Any,
    loc: Loc,
    key_pos: Position | None,
    smap: SourceMap,
    lo: int,
    co: int,
    note: str,
    path: frozenset[int] = frozenset(),
) -> None:
    """Record positions of ``node`` (already constructed into ``data``) under ``loc``."""
    file = smap.file
    value_pos = _mark_pos(file, node.start_mark, lo, co)
    if note:
        value_pos = Position(value_pos.file, value_pos.line, value_pos.col, note)
    collection = isinstance(node, (yaml.MappingNode, yaml.SequenceNode))
    smap.entries[loc] = _Entry(value=value_pos, key=key_pos, collection=collection)
    if id(node) in path:  # a recursive alias: its positions are recorded once
        return
    path = path | {id(node)}
    if isinstance(node, yaml.MappingNode) and isinstance(data, dict):
        for key_node, value_node in node.value:  # merges already flattened; later keys win
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            try:
                key = loader.construct_object(key_node, deep=True)
                child = data.get(key)
            except (yaml.YAMLError, TypeError):
                continue
            kpos = _mark_pos(file, key_node.start_mark, lo, co)
            if note:
                kpos = Position(kpos.file, kpos.line, kpos.col, note)
            _record(loader, value_node, child, (*loc, key), kpos, smap, lo, co, note, path)
    elif isinstance(node, yaml.SequenceNode) and isinstance(data, list):
        for i, (item_node, item) in enumerate(zip(node.value, data, strict=False)):
            _record(loader, item_node, item, (*loc, i), None, smap, lo, co, note, path)


def _compose(
    text: str, file: str, *, line_offset: int = 0, col_offset: int = 0, note: str = ""
) -> tuple[Any, yaml.Node | None, SourceMap, list[SpecIssue]]:
    """Parse ``text``: ``(data, root node, positions, issues)``; never raises YAML errors."""
    smap = SourceMap(file)
    try:
        loader = _Loader(text)
    except yaml.YAMLError as exc:
        return None, None, smap, [_yaml_error(exc, text, file, line_offset, col_offset)]
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None, smap, []
        count = [0]
        _expanded_size(node, frozenset(), count)
        if count[0] > MAX_NODES:
            msg = f"the document is too large: its aliases expand to more than {MAX_NODES} values"
            pos = _mark_pos(file, node.start_mark, line_offset, col_offset)
            return None, node, smap, [SpecIssue(loc=(), message=msg, file=pos.file, line=pos.line, col=pos.col)]
        issues: list[SpecIssue] = []
        _check_duplicates(node, (), file, issues, line_offset, col_offset, set())
        if issues:
            return None, node, smap, issues
        data = loader.construct_document(node)
        _record(loader, node, data, (), None, smap, line_offset, col_offset, note)
    except yaml.YAMLError as exc:
        return None, None, smap, [_yaml_error(exc, text, file, line_offset, col_offset)]
    except RecursionError:
        issue = SpecIssue(loc=(), message="invalid YAML: nested too deeply", file=file, line=1, col=1)
        return None, None, smap, [issue]
    finally:
        loader.dispose()
    return data, node, smap, []


def _type_phrase(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return _show(value)
    return f"the scalar {_show(value)}"


def load_document(text: str, filename: str = "<spec>") -> tuple[dict[str, Any], SourceMap]:
    """Parse YAML ``text`` into a mapping and its :class:`SourceMap`; :class:`SpecError` if it
    is not valid YAML, has a duplicate key, is empty, or is not a mapping at the top."""
    data, node, smap, issues = _compose(text, filename)
    if issues:
        raise SpecError(issues)
    if node is None:
        raise SpecError(
            [SpecIssue(loc=(), message="the spec is empty (expected a mapping with 'levels' "
                       "and 'block')", file=filename, line=1, col=1)]
        )
    if not isinstance(data, dict):
        pos = _mark_pos(filename, node.start_mark)
        raise SpecError(
            [SpecIssue(loc=(), message=f"the spec must be a mapping (key: value) at the top level, "
                       f"got {_type_phrase(data)}", file=pos.file, line=pos.line, col=pos.col)]
        )
    return data, smap


# ----------------------------------------------------------------------------- schema walking


def _unwrap(tp: Any, disc: str | None = None) -> tuple[Any, str | None, list[Any]]:
    """Strip ``Annotated`` and ``Optional``: ``(type, discriminator, metadata)``."""
    meta: list[Any] = []
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            args = get_args(tp)
            for m in args[1:]:
                d = getattr(m, "discriminator", None)
                if isinstance(d, str):
                    disc = d
                meta.append(m)
                meta.extend(getattr(m, "metadata", []) or [])
            tp = args[0]
            continue
        if _is_union(tp):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp, disc, meta


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _is_model(tp: Any) -> bool:
    return inspect.isclass(tp) and issubclass(tp, BaseModel)


def _members(tp: Any) -> list[Any]:
    return [a for a in get_args(tp) if a is not type(None)]


def _field_names(model: type[BaseModel]) -> dict[str, str]:
    """Every accepted key of ``model`` (aliases and names) -> the key as users write it."""
    out: dict[str, str] = {}
    for name, f in model.model_fields.items():
        shown = f.alias or name
        out[name] = shown
        out[shown] = shown
    return out


def _field(model: type[BaseModel], key: Any) -> tuple[str, Any, str | None] | None:
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            d = f.discriminator if isinstance(f.discriminator, str) else None
            return f.alias or name, f.annotation, d
    return None


def _tag_values(member: Any, disc: str) -> list[str]:
    if not _is_model(member):
        return []
    f = member.model_fields.get(disc)
    if f is None:
        return []
    ann, _, _ = _unwrap(f.annotation)
    if get_origin(ann) is Literal:
        return [str(a) for a in get_args(ann)]
    return []


def _disc_member(union: Any, disc: str, tag: Any) -> Any:
    for m in _members(union):
        if str(tag) in _tag_values(m, disc):
            return m
    return None


@dataclass
class _Walk:
    loc: Loc
    union: tuple[Loc, str, Any] | None = None  # (clean prefix, member tag, union type)
    parent_model: Any = None  # the model a last key was looked up in
    end_type: Any = None  # the (unwrapped) type at the end of the loc
    end_disc: str | None = None
    key_error: bool = False
    message: str | None = None  # replaces the generated message (model-level validators)


def _walk(raw_loc: Sequence[Any]) -> _Walk:
    """Turn pydantic's loc into the document's path, guided by the schema's types.

    Drops discriminated-union tags (``block.3.memory.level`` -> ``block.3.level``) and smart-union
    member names (``...lr.Gate.max`` -> ``...lr.max``), keeps aliases, notes key errors.
    """
    clean: list[Any] = []
    out = _Walk(loc=())
    tp: Any = Spec
    disc: str | None = None
    i = 0
    while i < len(raw_loc):
        el = raw_loc[i]
        base, d, _ = _unwrap(tp, disc)
        disc = None
        if _is_union(base):
            i += 1
            if d is not None:
                tp = _disc_member(base, d, el) or Any
                continue
            if out.union is None:
                out.union = (tuple(clean), str(el), base)
            tp = _smart_member(base, el)
            continue
        if el == "[key]":
            out.key_error = True
            i += 1
            tp = Any
            continue
        if _is_model(base):
            out.parent_model = base
            found = _field(base, el)
            if found is None:
                clean.append(el)
                tp = Any
            else:
                clean.append(found[0])
                tp, disc = found[1], found[2]
            i += 1
            continue
        origin = get_origin(base)
        if origin is dict:
            clean.append(el)
            args = get_args(base)
            tp = args[1] if len(args) == 2 else Any
            i += 1
            continue
        if origin in (list, tuple, set):
            clean.append(el)
            args = get_args(base)
            tp = args[0] if args else Any
            i += 1
            continue
        clean.append(el)
        tp = Any
        i += 1
    out.loc = tuple(clean)
    out.end_type, out.end_disc, _ = _unwrap(tp, disc)
    return out


def _smart_member(union: Any, tag: Any) -> Any:
    tag = str(tag)
    for m in _members(union):
        base, _, _ = _unwrap(m)
        if _is_model(base) and base.__name__ == tag:
            return m
        if tag.startswith("list[") and get_origin(base) is list:
            return m
        if tag.startswith("dict[") and get_origin(base) is dict:
            return m
    return Any


def _describe(tp: Any) -> str:
    """A human phrase for a type: ``an integer > 0``, ``'outer'``, ``{gate: ...}``."""
    base, _, meta = _unwrap(tp)
    if _is_union(base):
        parts = [_describe(m) for m in _members(base)]
        return ", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else parts[0]
    if get_origin(base) is Literal:
        vals = [repr(v) for v in get_args(base)]
        return ", ".join(vals[:-1]) + " or " + vals[-1] if len(vals) > 1 else vals[0]
    if _is_model(base):
        req = [f.alias or n for n, f in base.model_fields.items() if f.is_required()]
        keys = req or [next(iter(_field_names(base).values()), "...")]
        return "{" + ", ".join(f"{k}: ..." for k in keys) + "}"
    bounds = []
    for m in meta:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            v = getattr(m, attr, None)
            if v is not None:
                bounds.append(f"{sym} {v}")
    suffix = (" " + " and ".join(bounds)) if bounds else ""
    if base is bool:
        return "true or false"
    if base is int:
        return "an integer" + suffix
    if base is float:
        return "a number" + suffix
    if base is str:
        return "a string"
    origin = get_origin(base)
    if origin is list:
        args = get_args(base)
        inner = _describe(args[0]) if args else "values"
        return f"a list of {_plural(inner)}"
    if origin is dict:
        return "a mapping"
    return getattr(base, "__name__", str(base))


def _plural(phrase: str) -> str:
    for art in ("an ", "a "):
        if phrase.startswith(art):
            return phrase[len(art):] + "s"
    return phrase


# ----------------------------------------------------------------------------- messages


def _show(value: Any) -> str:
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
    return f"expected {kind} {sym[t]} {shown}, got {_show(value)}"


def _message(err: dict[str, Any], walk: _Walk) -> str:
    if walk.message is not None:
        return walk.message
    t = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if t == "missing":
        return "required field is missing"
    if t == "extra_forbidden":
        key = walk.loc[-1] if walk.loc else "?"
        names = sorted(set(_field_names(walk.parent_model).values())) if walk.parent_model else []
        hint = _suggest(str(key), names) or (f" (allowed: {', '.join(names)})" if names else "")
        return f"unknown field {key!r}{hint}"
    if t in ("union_tag_invalid", "union_tag_not_found"):
        d = (ctx.get("discriminator") or "").strip("'")
        tags = _quoted(ctx.get("expected_tags", ""))
        if not tags and walk.end_type is not None and _is_union(walk.end_type):
            tags = [v for m in _members(walk.end_type) for v in _tag_values(m, d)]
        last = walk.loc[-1] if walk.loc else None
        what = d if d == "op" or not isinstance(last, str) else last
        if t == "union_tag_not_found":
            return f"required field is missing (one of: {', '.join(tags)})"
        tag = ctx.get("tag", "")
        hint = _suggest(str(tag), tags) or f" (expected one of: {', '.join(tags)})"
        return f"unknown {what} {tag!r}{hint}"
    if t in ("model_type", "model_attributes_type", "dict_type", "mapping_type"):
        return f"expected a mapping, got {_show(value)}"
    if t in ("list_type", "tuple_type", "iterable_type"):
        return f"expected a list, got {_show(value)}"
    if t in ("string_type", "string_unicode"):
        return f"expected a string, got {_show(value)}"
    if t in ("int_type", "int_parsing", "int_from_float", "int_parsing_size"):
        return f"expected an integer, got {_show(value)}"
    if t in ("float_type", "float_parsing"):
        return f"expected a number, got {_show(value)}"
    if t == "finite_number":
        return f"expected a finite number, got {_show(value)}"
    if t in ("bool_type", "bool_parsing"):
        return f"expected true or false, got {_show(value)}"
    if t in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return _bound_message(err)
    if t == "literal_error":
        expected = ctx.get("expected", "")
        hint = _suggest(value, _quoted(expected)) if isinstance(value, str) else ""
        if walk.loc == ("nestlearn",):
            return f"unsupported format version {_show(value)} (this nestlearn reads {expected})"
        return f"expected {expected}, got {_show(value)}{hint}"
    if t == "string_pattern_mismatch":
        pattern = ctx.get("pattern", "")
        if pattern == IDENT:
            what = "name" if walk.key_error else "id"
            return (f"invalid {what} {_show(value)}: use letters, digits, '_' and '-', "
                    "starting with a letter or '_'")
        if pattern == GRAD_MODE:
            modes = ["unroll", "first_order", "stop", "truncate:N"]
            hint = _suggest(str(value), modes[:3]) if isinstance(value, str) else ""
            return f"unknown gradient mode {_show(value)}: use unroll, first_order, stop or truncate:N{hint}"
        return f"{_show(value)} does not match the pattern {pattern}"
    if t in ("too_short", "too_long"):
        n = ctx.get("min_length" if t == "too_short" else "max_length")
        more = "at least" if t == "too_short" else "at most"
        return f"expected {more} {n} item{'s' if n != 1 else ''}, got {ctx.get('actual_length')}"
    if t in ("value_error", "assertion_error"):
        return str(ctx.get("error", err.get("msg", ""))).removeprefix("Value error, ")
    if t == "invalid_key":
        return f"keys must be strings, got {_show(value)}"
    msg = str(err.get("msg", "invalid value"))
    return f"{msg[:1].lower()}{msg[1:]}, got {_show(value)}"


def _get(data: Any, loc: Loc) -> Any:
    cur = data
    for el in loc:
        try:
            cur = cur[el]
        except (KeyError, IndexError, TypeError):
            return None
    return cur


def _type_matches(value: Any, member: Any) -> bool:
    base, _, _ = _unwrap(member)
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
    prefix: Loc, union: Any, errs: list[tuple[dict[str, Any], _Walk]], data: Any, smap: SourceMap
) -> list[SpecIssue]:
    """One smart-union failure (pydantic reports one error list per member) -> the issues of the
    member the user evidently meant, or one summary ``expected A, B or C, got X``."""
    value = _get(data, prefix)
    by_tag: dict[str, list[tuple[dict[str, Any], _Walk]]] = {}
    for e, w in errs:
        if w.union is not None:
            by_tag.setdefault(w.union[1], []).append((e, w))
    chosen: str | None = None
    if isinstance(value, dict):
        # the mapping member sharing the most keys with what was written
        best = 0
        for m in _members(union):
            base, _, _ = _unwrap(m)
            if not _is_model(base) or base.__name__ not in by_tag:
                continue
            score = len(set(map(str, value)) & set(_field_names(base)))
            if score > best:
                best, chosen = score, base.__name__
    elif isinstance(value, list):
        chosen = next((t for t in by_tag if t.startswith("list[")), None)
    else:
        # a scalar of the right Python type for exactly one (non-literal) member: its message is
        # the precise one ("expected an integer > 0, got -3")
        matching = [m for m in _members(union) if _type_matches(value, m)]
        if len(matching) == 1 and get_origin(_unwrap(matching[0])[0]) is not Literal:
            chosen = next((t for t in by_tag if _member_tag_ok(matching[0], t)), None)
    if chosen is not None:
        return [
            _issue(w.loc, _message(e, w), smap.position(w.loc, key=_keyish(e, w))) for e, w in by_tag[chosen]
        ]
    hint = ""
    if isinstance(value, str):
        words = [
            str(v)
            for m in _members(union)
            if get_origin(_unwrap(m)[0]) is Literal
            for v in get_args(_unwrap(m)[0])
        ]
        hint = _suggest(value, words)
    return [_issue(prefix, f"expected {_describe(union)}, got {_show(value)}{hint}", smap.position(prefix))]


def _member_tag_ok(member: Any, tag: str) -> bool:
    base, _, _ = _unwrap(member)
    if _is_model(base):
        return base.__name__ == tag
    if get_origin(base) is Literal:
        return tag.startswith("literal[")
    if get_origin(base) is list:
        return tag.startswith("list[")
    name = getattr(base, "__name__", "")
    return bool(name) and (tag == name or tag.endswith("-" + name))


def _keyish(err: dict[str, Any], walk: _Walk) -> bool:
    return err["type"] in ("extra_forbidden", "invalid_key") or walk.key_error


def _remap(err: dict[str, Any], walk: _Walk, data: Any) -> _Walk:
    """Point model-level validator errors at the field they are about."""
    msg = str((err.get("ctx") or {}).get("error", ""))
    if err["type"] != "value_error":
        return walk
    if walk.loc == () and "period: outer" in msg:
        levels = data.get("levels") if isinstance(data, dict) else None
        if isinstance(levels, dict):
            outer = [k for k, v in levels.items() if isinstance(v, dict) and v.get("period") == "outer"]
            if len(outer) > 1:
                return _Walk(
                    loc=("levels", outer[1], "period"),
                    message=f"a second outer level (level {outer[0]!r} already has 'period: outer'; "
                    "exactly one level is the outer training loop)",
                )
        return _Walk(
            loc=("levels",),
            message="no level has 'period: outer' (exactly one level must be the outer training loop)",
        )
    if walk.loc == ("model",) and "heads" in msg:
        return _Walk(loc=("model", "heads"))
    return walk


def _issues_from_validation(exc: ValidationError, data: Any, smap: SourceMap) -> list[SpecIssue]:
    plain: list[SpecIssue] = []
    unions: dict[Loc, tuple[Any, list[tuple[dict[str, Any], _Walk]]]] = {}
    for err in exc.errors(include_url=False):
        e: dict[str, Any] = dict(err)
        walk = _remap(e, _walk(e["loc"]), data)
        if walk.union is not None:
            prefix, _, union = walk.union
            unions.setdefault(prefix, (union, []))[1].append((e, walk))
            continue
        loc = walk.loc
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            d = str((e.get("ctx") or {}).get("discriminator", "")).strip("'")
            loc = (*loc, d) if d else loc
        plain.append(_issue(loc, _message(e, walk), smap.position(loc, key=_keyish(e, walk))))
    for prefix, (union, errs) in unions.items():
        plain.extend(_union_issues(prefix, union, errs, data, smap))
    seen: set[tuple[Loc, str]] = set()
    out = []
    for issue in plain:
        k = (issue.loc, issue.message)
        if k not in seen:
            seen.add(k)
            out.append(issue)
    return sorted(out, key=_order)


def _order(issue: SpecIssue) -> tuple[int, int, int, str]:
    return (issue.file == OVERRIDE_FILE, issue.line or 0, issue.col or 0, issue.message)


def validate_document(data: dict[str, Any], smap: SourceMap) -> Spec:
    """Validate a raw document against the schema; every problem becomes a positioned issue."""
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_issues_from_validation(exc, data, smap)) from None
    _attach(spec, smap)
    return spec


# ----------------------------------------------------------------------------- overrides


class _OverrideError(Exception):
    def __init__(self, loc: Loc, message: str, col: int) -> None:
        super().__init__(message)
        self.loc, self.message, self.col = loc, message, col


def _split_path(path: str, base_col: int) -> list[tuple[str, int]]:
    segs = []
    col = base_col
    for seg in path.split("."):
        segs.append((seg, col))
        col += len(seg) + 1
    return segs


def _child_type(tp: Any, disc: str | None, cur: Any) -> tuple[Any, str | None, Any]:
    """Resolve unions against the data ``cur``: ``(base type, discriminator, metadata)``."""
    base, d, meta = _unwrap(tp, disc)
    for _ in range(4):
        if not _is_union(base):
            break
        if d is not None:
            member = _disc_member(base, d, cur.get(d)) if isinstance(cur, dict) else None
            if member is None:
                return Any, None, []
            base, d, meta = _unwrap(member)
            continue
        models = [m for m in _members(base) if _is_model(_unwrap(m)[0])]
        if isinstance(cur, dict) and models:
            scored = sorted(models, key=lambda m: -len(set(map(str, cur)) & set(_field_names(_unwrap(m)[0]))))
            base, d, meta = _unwrap(scored[0])
            continue
        return base, None, meta
    return base, d, meta


def _apply_one(doc: dict[str, Any], text: str, index: int, smap: SourceMap) -> None:
    if "=" not in text:
        raise _OverrideError((), f"malformed override {text!r}: expected path.to.key=value", 1)
    path, raw = text.split("=", 1)
    lead = len(path) - len(path.lstrip())
    path = path.strip()
    segs = _split_path(path, lead + 1)
    if not path or any(not s for s, _ in segs):
        raise _OverrideError((), f"malformed override {text!r}: expected path.to.key=value", lead + 1)
    note = f"(from override {text!r})"
    value_col = len(text) - len(raw)  # 0-based column where the value text starts
    if raw.strip():
        value, _, vmap, issues = _compose(raw, OVERRIDE_FILE, line_offset=index, col_offset=value_col,
                                            note=note)
        if issues:
            for issue in issues:
                issue.message = f"{issue.message} {note}"
            raise SpecError(issues)
    else:
        value, vmap = None, SourceMap(OVERRIDE_FILE)

    def at(col: int) -> Position:
        return Position(OVERRIDE_FILE, index, col, note)

    _assign(doc, segs, value, vmap.entries, smap, at, at(value_col + 1))


def _assign(
    doc: dict[str, Any], segs: list[tuple[str, int]], value: Any, value_entries: dict[Loc, _Entry],
    smap: SourceMap, at: Any, value_pos: Position,
) -> Loc:
    """Set the dotted path ``segs`` (each segment with its column, for messages) of ``doc`` to
    ``value``, checking every segment against the schema; ``value_entries`` are the positions of
    the value's parts (rooted at the value), ``at(col)`` the position of a segment, ``value_pos``
    the value's own. Returns the path as the document spells it (list items by index)."""
    cur: Any = doc
    tp: Any = Spec
    disc: str | None = None
    loc: list[str | int] = []
    shown: list[str] = []
    for n, (seg, col) in enumerate(segs):
        last = n == len(segs) - 1
        shown.append(seg)
        base, _, _ = _child_type(tp, disc, cur)
        where = ".".join(shown[:-1]) or "the spec"
        key: Any
        if isinstance(cur, list):
            key, child_tp, child_disc = _list_key(cur, seg, tuple(shown), col, base)
        elif isinstance(cur, dict):
            if _is_model(base):
                found = _field(base, seg)
                if found is None:
                    names = sorted(set(_field_names(base).values()))
                    hint = _suggest(seg, names) or f" (allowed: {', '.join(names)})"
                    raise _OverrideError(tuple(shown), f"unknown field {seg!r}{hint}", col)
                key, child_tp, child_disc = found
                if found[0] != seg and seg in cur:  # written under the field's name, not its alias
                    cur[key] = cur.pop(seg)
            else:
                key, child_tp, child_disc = seg, Any, None
                if get_origin(base) is dict:
                    args = get_args(base)
                    child_tp = args[1] if len(args) == 2 else Any
                if not last and seg not in cur:
                    hint = _suggest(seg, [str(k) for k in cur])
                    if tuple(loc) == ("levels",):
                        raise _OverrideError(tuple(shown), f"unknown level {seg!r}{hint}", col)
                    raise _OverrideError(tuple(shown), f"no key {seg!r} in {where}{hint}", col)
        else:
            raise _OverrideError(
                tuple(shown), f"cannot set {seg!r}: {where} is {_show(cur)}, not a mapping or a list", col
            )
        loc.append(key)
        if last:
            cur[key] = value
            smap.drop(tuple(loc))
            for sub, entry in value_entries.items():
                smap.entries[(*loc, *sub)] = entry
            if not value_entries:
                smap.entries[tuple(loc)] = _Entry(value_pos)
            return tuple(loc)
        nxt = cur[key] if (isinstance(cur, list) or key in cur) else None
        if nxt is None:
            child_base, _, _ = _child_type(child_tp, child_disc, {})
            if not (_is_model(child_base) or _is_union(child_base)):
                raise _OverrideError(tuple(shown), f"{'.'.join(shown)} is not set in the spec", col)
            nxt = {}
            cur[key] = nxt
            smap.entries[tuple(loc)] = _Entry(at(col), collection=True)
        cur, tp, disc = nxt, child_tp, child_disc
    return tuple(loc)


def _list_key(cur: list[Any], seg: str, shown: Loc, col: int, base: Any) -> tuple[int, Any, str | None]:
    args = get_args(base) if get_origin(base) is list else ()
    item_tp = args[0] if args else Any
    if re.fullmatch(r"-?[0-9]+", seg):
        i = int(seg)
        if not 0 <= i < len(cur):
            raise _OverrideError(shown, f"index {i} is out of range (the list has {len(cur)} items)", col)
        return i, item_tp, None
    ids = [item.get("id") for item in cur if isinstance(item, dict)]
    for i, item in enumerate(cur):
        if isinstance(item, dict) and item.get("id") == seg:
            return i, item_tp, None
    hint = _suggest(seg, [str(x) for x in ids if x is not None])
    raise _OverrideError(shown, f"no node with id {seg!r}{hint}", col)


def apply_overrides(doc: dict[str, Any], overrides: Sequence[str], smap: SourceMap | None = None) -> None:
    """Apply ``path.to.key=value`` overrides to a raw document, in order, in place.

    Values are YAML (``64``, ``adam``, ``{name: adam, lr: 0.001}``, ``[x, att]``). A list
    item of ``block`` is addressed by its ``id`` or its index. The parent of the key must
    exist and the key must be a field of the schema there; the whole value is replaced.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    smap = smap if smap is not None else SourceMap("<spec>")
    issues: list[SpecIssue] = []
    for index, text in enumerate(overrides, 1):
        try:
            _apply_one(doc, text, index, smap)
        except _OverrideError as e:
            msg = e.message if "malformed" in e.message else f"{e.message} in override {text!r}"
            issues.append(
                SpecIssue(loc=_printable_loc(e.loc), message=msg, file=OVERRIDE_FILE, line=index, col=e.col)
            )
        except SpecError as e:
            issues.extend(e.issues)
    if issues:
        raise SpecError(issues)


# ----------------------------------------------------------------------------- profiles

NO_PROFILE = "none"
"""``profile="none"``: apply no profile, and resolve them away (what a run directory records)."""


def _profile_entries(smap: SourceMap, loc: Loc, note: str) -> dict[Loc, _Entry]:
    """The positions under ``loc`` re-rooted at ``()``, each with ``note`` added."""
    n = len(loc)
    out = {}
    for k, e in smap.entries.items():
        if k[:n] == loc and len(k) > n:
            def tag(p: Position | None) -> Position | None:
                return Position(p.file, p.line, p.col, note) if p is not None else None
            out[k[n:]] = _Entry(tag(e.value) or e.value, tag(e.key), e.collection)
    return out


def _check_profiles(raw: Any, smap: SourceMap) -> tuple[dict[str, dict[str, Any]], list[SpecIssue]]:
    """The shape of ``profiles`` (a mapping of names to mappings of dotted paths to values)."""
    issues: list[SpecIssue] = []
    base: Loc = ("profiles",)
    if not isinstance(raw, dict):
        msg = f"expected a mapping of profile names to overrides {{path.to.key: value}}, got {_type_phrase(raw)}"
        return {}, [_issue(base, msg, smap.position(base))]
    good: dict[str, dict[str, Any]] = {}
    for name, body in raw.items():
        loc: Loc = (*base, name)
        if not isinstance(name, str) or not re.fullmatch(IDENT, name):
            issues.append(_issue(loc, f"a profile name must be a word of letters, digits, '_' or '-' "
                                      f"starting with a letter or '_', got {name!r}", smap.position(loc, key=True)))
            continue
        if name == NO_PROFILE:
            issues.append(_issue(loc, f"the name '{NO_PROFILE}' is reserved (it means: apply no profile)",
                                 smap.position(loc, key=True)))
            continue
        if not isinstance(body, dict):
            issues.append(_issue(loc, f"expected a mapping of overrides {{path.to.key: value}}, got "
                                      f"{_type_phrase(body)}", smap.position(loc)))
            continue
        bad = [k for k in body if not isinstance(k, str)]
        for k in bad:
            issues.append(_issue((*loc, str(k)), "expected a dotted path such as model.dim as the key",
                                 smap.position((*loc, k), key=True)))
        good[name] = {k: v for k, v in body.items() if isinstance(k, str)}
    return good, issues


def _apply_profile(doc: dict[str, Any], smap: SourceMap, name: str, body: dict[str, Any]) -> tuple[
        list[tuple[Loc, Loc]], list[SpecIssue]]:
    """Apply profile ``name`` to ``doc`` in place: ``([(target path, profile key loc)], issues)``."""
    note = f"(from profile {name!r})"
    targets: list[tuple[Loc, Loc]] = []
    issues: list[SpecIssue] = []
    for key, value in body.items():
        kloc: Loc = ("profiles", name, key)
        entry = smap.entries.get(kloc)
        kpos = entry.key if entry is not None and entry.key is not None else smap.position(kloc, key=True)
        vpos = entry.value if entry is not None else kpos
        vpos = Position(vpos.file, vpos.line, vpos.col, note)
        lead = len(key) - len(key.lstrip())
        path = key.strip()
        segs = _split_path(path, (kpos.col or 1) + lead)
        if not path or any(not seg for seg, _ in segs):
            issues.append(_issue(kloc, "expected a dotted path such as model.dim", kpos))
            continue

        def at(col: int, kpos: Position = kpos) -> Position:
            return Position(kpos.file, kpos.line, col, note)

        try:
            target = _assign(doc, segs, copy.deepcopy(value), _profile_entries(smap, kloc, note), smap, at, vpos)
        except _OverrideError as e:
            where = ".".join(str(x) for x in e.loc)
            msg = e.message if where == path else f"{e.message} (at {where})"
            issues.append(_issue(kloc, f"not a valid override path: {msg}",
                                 Position(kpos.file, kpos.line, e.col if kpos.line else None)))
            continue
        targets.append((target, kloc))
    return targets, issues


def _profile_issues(doc: dict[str, Any], smap: SourceMap, profiles: dict[str, dict[str, Any]]) -> list[SpecIssue]:
    """Check every profile: each key a valid override path, the spec valid with it applied.
    A problem caused by a profile value is reported at ``profiles.<name>.<key>``."""
    if not profiles:
        return []
    try:
        Spec.model_validate(doc)
        base_bad: set[tuple[Loc, str]] = set()
    except ValidationError as exc:
        base_bad = {(i.loc, i.message) for i in _issues_from_validation(exc, doc, smap)}
    issues: list[SpecIssue] = []
    for name, body in profiles.items():
        trial, tmap = copy.deepcopy(doc), SourceMap(smap.file, dict(smap.entries))
        targets, bad = _apply_profile(trial, tmap, name, body)
        issues.extend(bad)
        try:
            Spec.model_validate(trial)
            continue
        except ValidationError as exc:
            found = _issues_from_validation(exc, trial, tmap)
        for issue in found:
            hit = next(((t, k) for t, k in targets if issue.loc[:len(t)] == _printable_loc(t)), None)
            if hit is not None:
                t, kloc = hit
                issue.loc = _printable_loc((*kloc, *issue.loc[len(t):]))
                issue.message = issue.message.removesuffix(f" (from profile {name!r})")
            elif (issue.loc, issue.message) in base_bad:
                continue  # the spec's own problem: reported by the spec's validation
            else:
                issue.message = f"{issue.message} (with profile {name!r} applied)"
            issues.append(issue)
    return issues


def _unknown_profile(name: str, profiles: dict[str, Any], smap: SourceMap) -> SpecIssue:
    if profiles:
        hint = _suggest(name, list(profiles))
        msg = f"no profile named {name!r}{hint}; the spec defines: {', '.join(profiles)}"
    else:
        msg = f"no profile named {name!r}: the spec defines no profiles"
    return _issue(("profiles",), msg, smap.position(("profiles",), key=True) if profiles else Position(smap.file))


def profile_overrides(spec_or_body: Spec | dict[str, Any], name: str) -> list[str]:
    """The overrides of profile ``name`` as ``path=value`` texts (for messages)."""
    body = spec_or_body.profiles[name] if isinstance(spec_or_body, Spec) else spec_or_body
    out = []
    for k, v in body.items():
        text = yaml.safe_dump(v, default_flow_style=True, width=10_000, sort_keys=False).strip()
        out.append(f"{k}={text.removesuffix(chr(10) + '...').strip()}")
    return out


# ----------------------------------------------------------------------------- entry points


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
            profiles, issues = _check_profiles(raw, smap)
            issues += _profile_issues(doc, smap, profiles)
    if profile is not None and profile != NO_PROFILE:
        if profile not in profiles:
            issues.append(_unknown_profile(profile, profiles, smap))
        elif not issues:
            _apply_profile(doc, smap, profile, profiles[profile])
    elif profile is None and profiles:
        doc["profiles"] = profiles
    try:
        apply_overrides(doc, overrides, smap)
        spec = validate_document(doc, smap)
    except SpecError as e:
        raise SpecError(sorted(issues + e.issues, key=_order)) from None
    if issues:
        raise SpecError(sorted(issues, key=_order))
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
