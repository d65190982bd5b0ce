"""The YAML document: parsed safely, with a position for every key and value.

Broken YAML, a duplicate key, an alias bomb or a document that is not a mapping become
positioned issues (:class:`SpecIssue`), never a YAML traceback.
"""

from __future__ import annotations

from typing import Any

import yaml

from nestlearn.spec.errors import Loc, SpecError, SpecIssue, type_phrase
from nestlearn.spec.positions import Entry, Position, SourceMap, printable_loc


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
                        loc=printable_loc((*loc, name)),
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
    smap.entries[loc] = Entry(value=value_pos, key=key_pos, collection=collection)
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


def compose(
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


def load_document(text: str, filename: str = "<spec>") -> tuple[dict[str, Any], SourceMap]:
    """Parse YAML ``text`` into a mapping and its :class:`SourceMap`; :class:`SpecError` if it
    is not valid YAML, has a duplicate key, is empty, or is not a mapping at the top."""
    data, node, smap, issues = compose(text, filename)
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
                       f"got {type_phrase(data)}", file=pos.file, line=pos.line, col=pos.col)]
        )
    return data, smap
