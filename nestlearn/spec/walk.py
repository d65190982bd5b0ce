"""The schema's types, walked: what a path of the document means in the pydantic models.

``unwrap`` strips ``Annotated`` / ``Optional``; ``walk_loc`` turns pydantic's error locations
into the document's paths; ``describe`` phrases a type for a message (``an integer > 0``).
Used by the messages (:mod:`nestlearn.spec.messages`) and the overrides
(:mod:`nestlearn.spec.overrides`).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from nestlearn.spec.errors import Loc
from nestlearn.spec.schema import Spec


def unwrap(tp: Any, disc: str | None = None) -> tuple[Any, str | None, list[Any]]:
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
        if is_union(tp):
            alts = [a for a in get_args(tp) if a is not type(None)]
            if len(alts) == 1:
                tp = alts[0]
                continue
        return tp, disc, meta


def is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def is_model(tp: Any) -> bool:
    return inspect.isclass(tp) and issubclass(tp, BaseModel)


def members(tp: Any) -> list[Any]:
    return [a for a in get_args(tp) if a is not type(None)]


def field_names(model: type[BaseModel]) -> dict[str, str]:
    """Every accepted key of ``model`` (aliases and names) -> the key as users write it."""
    out: dict[str, str] = {}
    for name, f in model.model_fields.items():
        shown = f.alias or name
        out[name] = shown
        out[shown] = shown
    return out


def find_field(model: type[BaseModel], key: Any) -> tuple[str, Any, str | None] | None:
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            d = f.discriminator if isinstance(f.discriminator, str) else None
            return f.alias or name, f.annotation, d
    return None


def tag_values(member: Any, disc: str) -> list[str]:
    if not is_model(member):
        return []
    f = member.model_fields.get(disc)
    if f is None:
        return []
    ann, _, _ = unwrap(f.annotation)
    if get_origin(ann) is Literal:
        return [str(a) for a in get_args(ann)]
    return []


def disc_member(union: Any, disc: str, tag: Any) -> Any:
    for m in members(union):
        if str(tag) in tag_values(m, disc):
            return m
    return None


@dataclass
class Walk:
    loc: Loc
    union: tuple[Loc, str, Any] | None = None  # (clean prefix, member tag, union type)
    parent_model: Any = None  # the model a last key was looked up in
    end_type: Any = None  # the (unwrapped) type at the end of the loc
    end_disc: str | None = None
    key_error: bool = False
    message: str | None = None  # replaces the generated message (model-level validators)


def walk_loc(raw_loc: Sequence[Any]) -> Walk:
    """Turn pydantic's loc into the document's path, guided by the schema's types.

    Drops discriminated-union tags (``block.3.memory.level`` -> ``block.3.level``) and smart-union
    member names (``...lr.Gate.max`` -> ``...lr.max``), keeps aliases, notes key errors.
    """
    clean: list[Any] = []
    out = Walk(loc=())
    tp: Any = Spec
    disc: str | None = None
    i = 0
    while i < len(raw_loc):
        el = raw_loc[i]
        base, d, _ = unwrap(tp, disc)
        disc = None
        if is_union(base):
            i += 1
            if d is not None:
                tp = disc_member(base, d, el) or Any
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
        if is_model(base):
            out.parent_model = base
            found = find_field(base, el)
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
    out.end_type, out.end_disc, _ = unwrap(tp, disc)
    return out


def _smart_member(union: Any, tag: Any) -> Any:
    tag = str(tag)
    for m in members(union):
        base, _, _ = unwrap(m)
        if is_model(base) and base.__name__ == tag:
            return m
        if tag.startswith("list[") and get_origin(base) is list:
            return m
        if tag.startswith("dict[") and get_origin(base) is dict:
            return m
    return Any


def describe(tp: Any) -> str:
    """A human phrase for a type: ``an integer > 0``, ``'outer'``, ``{gate: ...}``."""
    base, _, meta = unwrap(tp)
    if is_union(base):
        parts = [describe(m) for m in members(base)]
        return ", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else parts[0]
    if get_origin(base) is Literal:
        vals = [repr(v) for v in get_args(base)]
        return ", ".join(vals[:-1]) + " or " + vals[-1] if len(vals) > 1 else vals[0]
    if is_model(base):
        req = [f.alias or n for n, f in base.model_fields.items() if f.is_required()]
        keys = req or [next(iter(field_names(base).values()), "...")]
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
        inner = describe(args[0]) if args else "values"
        return f"a list of {_plural(inner)}"
    if origin is dict:
        return "a mapping"
    return getattr(base, "__name__", str(base))


def _plural(phrase: str) -> str:
    for art in ("an ", "a "):
        if phrase.startswith(art):
            return phrase[len(art):] + "s"
    return phrase
