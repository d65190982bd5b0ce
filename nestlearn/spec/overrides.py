"""Overrides (``path.to.key=value``) and profiles (named overrides in the spec's ``profiles:``).

Every segment of a path is checked against the schema, so that a typo is reported at its own
column of the override (or of the profile's key) with a suggestion.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any, get_args, get_origin

import yaml
from pydantic import ValidationError

from nestlearn.spec.document import compose
from nestlearn.spec.errors import Loc, SpecError, SpecIssue, show, suggest, type_phrase
from nestlearn.spec.messages import validation_issues
from nestlearn.spec.positions import OVERRIDE_FILE, Entry, Position, SourceMap, positioned_issue, printable_loc
from nestlearn.spec.schema import IDENT, Spec
from nestlearn.spec.walk import disc_member, field_names, find_field, is_model, is_union, members, unwrap


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
    base, d, meta = unwrap(tp, disc)
    for _ in range(4):
        if not is_union(base):
            break
        if d is not None:
            member = disc_member(base, d, cur.get(d)) if isinstance(cur, dict) else None
            if member is None:
                return Any, None, []
            base, d, meta = unwrap(member)
            continue
        models = [m for m in members(base) if is_model(unwrap(m)[0])]
        if isinstance(cur, dict) and models:
            scored = sorted(models, key=lambda m: -len(set(map(str, cur)) & set(field_names(unwrap(m)[0]))))
            base, d, meta = unwrap(scored[0])
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
        value, _, vmap, issues = compose(raw, OVERRIDE_FILE, line_offset=index, col_offset=value_col,
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
    doc: dict[str, Any], segs: list[tuple[str, int]], value: Any, value_entries: dict[Loc, Entry],
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
            if is_model(base):
                found = find_field(base, seg)
                if found is None:
                    names = sorted(set(field_names(base).values()))
                    hint = suggest(seg, names) or f" (allowed: {', '.join(names)})"
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
                    hint = suggest(seg, [str(k) for k in cur])
                    if tuple(loc) == ("levels",):
                        raise _OverrideError(tuple(shown), f"unknown level {seg!r}{hint}", col)
                    raise _OverrideError(tuple(shown), f"no key {seg!r} in {where}{hint}", col)
        else:
            raise _OverrideError(
                tuple(shown), f"cannot set {seg!r}: {where} is {show(cur)}, not a mapping or a list", col
            )
        loc.append(key)
        if last:
            cur[key] = value
            smap.drop(tuple(loc))
            for sub, entry in value_entries.items():
                smap.entries[(*loc, *sub)] = entry
            if not value_entries:
                smap.entries[tuple(loc)] = Entry(value_pos)
            return tuple(loc)
        nxt = cur[key] if (isinstance(cur, list) or key in cur) else None
        if nxt is None:
            child_base, _, _ = _child_type(child_tp, child_disc, {})
            if not (is_model(child_base) or is_union(child_base)):
                raise _OverrideError(tuple(shown), f"{'.'.join(shown)} is not set in the spec", col)
            nxt = {}
            cur[key] = nxt
            smap.entries[tuple(loc)] = Entry(at(col), collection=True)
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
    hint = suggest(seg, [str(x) for x in ids if x is not None])
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
                SpecIssue(loc=printable_loc(e.loc), message=msg, file=OVERRIDE_FILE, line=index, col=e.col)
            )
        except SpecError as e:
            issues.extend(e.issues)
    if issues:
        raise SpecError(issues)


# ----------------------------------------------------------------------------- profiles

NO_PROFILE = "none"
"""``profile="none"``: apply no profile, and resolve them away (what a run directory records)."""


def _profile_entries(smap: SourceMap, loc: Loc, note: str) -> dict[Loc, Entry]:
    """The positions under ``loc`` re-rooted at ``()``, each with ``note`` added."""
    n = len(loc)
    out = {}
    for k, e in smap.entries.items():
        if k[:n] == loc and len(k) > n:
            def tag(p: Position | None) -> Position | None:
                return Position(p.file, p.line, p.col, note) if p is not None else None
            out[k[n:]] = Entry(tag(e.value) or e.value, tag(e.key), e.collection)
    return out


def check_profiles(raw: Any, smap: SourceMap) -> tuple[dict[str, dict[str, Any]], list[SpecIssue]]:
    """The shape of ``profiles`` (a mapping of names to mappings of dotted paths to values)."""
    issues: list[SpecIssue] = []
    base: Loc = ("profiles",)
    if not isinstance(raw, dict):
        msg = f"expected a mapping of profile names to overrides {{path.to.key: value}}, got {type_phrase(raw)}"
        return {}, [positioned_issue(base, msg, smap.position(base))]
    good: dict[str, dict[str, Any]] = {}
    for name, body in raw.items():
        loc: Loc = (*base, name)
        if not isinstance(name, str) or not re.fullmatch(IDENT, name):
            issues.append(positioned_issue(loc, f"a profile name must be a word of letters, digits, '_' or '-' "
                                      f"starting with a letter or '_', got {name!r}", smap.position(loc, key=True)))
            continue
        if name == NO_PROFILE:
            issues.append(positioned_issue(loc, f"the name '{NO_PROFILE}' is reserved (it means: apply no profile)",
                                 smap.position(loc, key=True)))
            continue
        if not isinstance(body, dict):
            issues.append(positioned_issue(loc, f"expected a mapping of overrides {{path.to.key: value}}, got "
                                      f"{type_phrase(body)}", smap.position(loc)))
            continue
        bad = [k for k in body if not isinstance(k, str)]
        for k in bad:
            issues.append(positioned_issue((*loc, str(k)), "expected a dotted path such as model.dim as the key",
                                 smap.position((*loc, k), key=True)))
        good[name] = {k: v for k, v in body.items() if isinstance(k, str)}
    return good, issues


def apply_profile(doc: dict[str, Any], smap: SourceMap, name: str, body: dict[str, Any]) -> tuple[
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
            issues.append(positioned_issue(kloc, "expected a dotted path such as model.dim", kpos))
            continue

        def at(col: int, kpos: Position = kpos) -> Position:
            return Position(kpos.file, kpos.line, col, note)

        try:
            target = _assign(doc, segs, copy.deepcopy(value), _profile_entries(smap, kloc, note), smap, at, vpos)
        except _OverrideError as e:
            where = ".".join(str(x) for x in e.loc)
            msg = e.message if where == path else f"{e.message} (at {where})"
            issues.append(positioned_issue(kloc, f"not a valid override path: {msg}",
                                 Position(kpos.file, kpos.line, e.col if kpos.line else None)))
            continue
        targets.append((target, kloc))
    return targets, issues


def profile_issues(doc: dict[str, Any], smap: SourceMap, profiles: dict[str, dict[str, Any]]) -> list[SpecIssue]:
    """Check every profile: each key a valid override path, the spec valid with it applied.
    A problem caused by a profile value is reported at ``profiles.<name>.<key>``."""
    if not profiles:
        return []
    try:
        Spec.model_validate(doc)
        base_bad: set[tuple[Loc, str]] = set()
    except ValidationError as exc:
        base_bad = {(i.loc, i.message) for i in validation_issues(exc, doc, smap)}
    issues: list[SpecIssue] = []
    for name, body in profiles.items():
        trial, tmap = copy.deepcopy(doc), SourceMap(smap.file, dict(smap.entries))
        targets, bad = apply_profile(trial, tmap, name, body)
        issues.extend(bad)
        try:
            Spec.model_validate(trial)
            continue
        except ValidationError as exc:
            found = validation_issues(exc, trial, tmap)
        for issue in found:
            hit = next(((t, k) for t, k in targets if issue.loc[:len(t)] == printable_loc(t)), None)
            if hit is not None:
                t, kloc = hit
                issue.loc = printable_loc((*kloc, *issue.loc[len(t):]))
                issue.message = issue.message.removesuffix(f" (from profile {name!r})")
            elif (issue.loc, issue.message) in base_bad:
                continue  # the spec's own problem: reported by the spec's validation
            else:
                issue.message = f"{issue.message} (with profile {name!r} applied)"
            issues.append(issue)
    return issues


def unknown_profile(name: str, profiles: dict[str, Any], smap: SourceMap) -> SpecIssue:
    if profiles:
        hint = suggest(name, list(profiles))
        msg = f"no profile named {name!r}{hint}; the spec defines: {', '.join(profiles)}"
    else:
        msg = f"no profile named {name!r}: the spec defines no profiles"
    return positioned_issue(("profiles",), msg, smap.position(("profiles",), key=True) if profiles else Position(smap.file))


def profile_overrides(spec_or_body: Spec | dict[str, Any], name: str) -> list[str]:
    """The overrides of profile ``name`` as ``path=value`` texts (for messages)."""
    body = spec_or_body.profiles[name] if isinstance(spec_or_body, Spec) else spec_or_body
    out = []
    for k, v in body.items():
        text = yaml.safe_dump(v, default_flow_style=True, width=10_000, sort_keys=False).strip()
        out.append(f"{k}={text.removesuffix(chr(10) + '...').strip()}")
    return out
