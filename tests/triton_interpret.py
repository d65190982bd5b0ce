"""Importing a Triton kernel module for tests: compiled on CUDA, else decorated for Triton's
interpreter (``TRITON_INTERPRET=1`` is read when ``@triton.jit`` runs, so it is set around the
import only). Shared by every kernel test file: whichever imports triton first must leave it
interpreted for the others."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

import torch


def interpreted_triton() -> bool:
    """triton's own library was decorated for the interpreter (an earlier file imported it so)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(sys.modules["triton.language.standard"].cdiv, InterpretedFunction)


def import_kernels(*modules: str) -> tuple[ModuleType | None, str]:
    """``(the first of modules, '')`` with every one of them imported, or ``(None, why not)``."""
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed"
    if torch.cuda.is_available():
        return [importlib.import_module(m) for m in modules][0], ""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1" and not interpreted_triton():
        return None, "triton was imported before this file without TRITON_INTERPRET=1: run this file on its own"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return [importlib.import_module(m) for m in modules][0], ""
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def kernel_for_test(kernel: ModuleType | None, why: str, monkeypatch: Any) -> ModuleType:
    """What a kernel test's fixture returns: the module (skipping with ``why`` where it could not
    be imported), with ``TRITON_INTERPRET=1`` set for the test on a CPU (triton imports parts of
    itself at the first launch, and they must be interpreted too)."""
    import pytest

    if kernel is None:
        pytest.skip(why)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return kernel


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` relative to ``b``'s largest entry (the kernel tests' error measure)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
