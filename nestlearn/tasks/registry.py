"""Task names -> constructors, with option checking (and string coercion for CLI values)."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Sequence
from typing import Any

from nestlearn.spec.errors import suggest

from .base import Task, TaskError
from .continual import ContinualTask
from .formal import LANGUAGES, FormalTask
from .synthetic import MQARTask, NIAHTask
from .text import LMTask

_REGISTRY: dict[str, tuple[type[Task], dict[str, Any]]] = {
    "lm": (LMTask, {}),
    "mqar": (MQARTask, {}),
    "niah": (NIAHTask, {}),
    **{lang: (FormalTask, {"language": lang}) for lang in LANGUAGES},
    "continual": (ContinualTask, {}),
}


def register_task(name: str, cls: type[Task], **fixed: Any) -> None:
    """Make ``get_task(name, **options)`` build ``cls(**fixed, **options)``."""
    _REGISTRY[name] = (cls, dict(fixed))


def task_names() -> list[str]:
    return list(_REGISTRY)


def _params(name: str) -> dict[str, inspect.Parameter]:
    cls, fixed = _REGISTRY[name]
    sig = inspect.signature(cls.__init__)
    return {k: p for k, p in sig.parameters.items() if k != "self" and k not in fixed
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def task_options(name: str) -> dict[str, Any]:
    """The options ``name`` accepts, with their defaults."""
    _check_name(name)
    return {k: p.default for k, p in _params(name).items()}


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        hint = suggest(name, _REGISTRY, n=2, cutoff=0.6)
        raise TaskError(f"unknown task '{name}'{hint}; choices: {', '.join(_REGISTRY)}")


def _coerce(task: str, key: str, value: Any, hint: Any) -> Any:
    if not isinstance(value, str):
        return value
    args = typing.get_args(hint) or (hint,)
    low = value.strip().lower()
    if type(None) in args and low in ("none", "null", ""):
        return None
    if bool in args:
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
    for t in (int, float):
        if t in args:
            try:
                return t(value)
            except ValueError:
                pass
    if str in args:
        return value
    for a in args:
        origin = typing.get_origin(a)
        if origin is not None and issubclass(origin, Sequence):
            (elem,) = typing.get_args(a) or (str,)
            return [_coerce(task, key, v, elem) for v in value.split(",")]
    names = " | ".join(getattr(a, "__name__", str(a)) for a in args)
    raise TaskError(f"task '{task}': option '{key}' expects {names}, got {value!r}")


def get_task(name: str, **options: Any) -> Task:
    """Build the task ``name`` with ``options``; every mistake is a ``TaskError`` with a clear message."""
    _check_name(name)
    cls, fixed = _REGISTRY[name]
    params = _params(name)
    hints = typing.get_type_hints(cls.__init__)
    for key in options:
        if key not in params:
            hint = suggest(key, params, cutoff=0.6)
            valid = ", ".join(params) or "none"
            raise TaskError(f"task '{name}' has no option '{key}'{hint}; options: {valid}")
    kwargs = {k: _coerce(name, k, v, hints.get(k, Any)) for k, v in options.items()}
    try:
        task = cls(**fixed, **kwargs)
    except TaskError:
        raise
    except (TypeError, ValueError) as e:
        raise TaskError(f"task '{name}': bad options {options}: {e}") from None
    task.options = dict(getattr(task, "options", kwargs))
    return task
