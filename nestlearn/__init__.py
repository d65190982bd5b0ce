"""nestlearn: declarative nested optimization for PyTorch.

    spec = nestlearn.load_spec("models/hope.yaml", overrides=["model.dim=64"])
    model = nestlearn.compile(spec)
    logits, state = model(tokens)              # state carries every level's fast weights
    model.levels["memory"].rule = nestlearn.rules.adam(lr=1e-3)   # swap an inner optimizer

Importing ``nestlearn`` (or ``nestlearn.spec``) does not import torch: ``rules`` is loaded on
first use (PEP 562), the compiler when ``compile`` is called, so that checking a spec
(``nestlearn validate``) does not pay for torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nestlearn.spec.errors import SpecError
from nestlearn.spec.schema import Spec

if TYPE_CHECKING:
    from nestlearn import rules
    from nestlearn.compile.model import CompiledModel

__all__ = ["Spec", "SpecError", "load_spec", "compile", "rules"]
__version__ = "0.1.0"


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = (), profile: str | None = None) -> Spec:
    """Load and validate a YAML spec (``overrides`` like ``"model.dim=64"``); raises SpecError.

    ``profile="cpu"`` applies the spec's profile of that name (its ``profiles:`` section: named
    overrides, e.g. smaller sizes for a CPU) before ``overrides``; ``"none"`` applies none."""
    from nestlearn.spec.loader import load_spec as _load

    return _load(path, overrides, profile)


def compile(spec: Spec | str | Path, overrides: list[str] | tuple[str, ...] = (), **kw: Any) -> CompiledModel:  # noqa: A001
    """Validate the level graph and build the module (a path is loaded first)."""
    if not isinstance(spec, Spec):
        spec = load_spec(spec, overrides)
    from nestlearn.compile import compile_spec

    return compile_spec(spec, **kw)  # the level graph's checks run before any tensor is allocated


def __getattr__(name: str) -> Any:
    if name == "rules":
        return importlib.import_module("nestlearn.rules")
    raise AttributeError(f"module 'nestlearn' has no attribute {name!r}")


class _Package(types.ModuleType):
    """``nestlearn.compile`` stays the function above: importing the subpackage of that name
    (which the import system records as an attribute of its parent) does not replace it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "compile" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
