"""Spec + graph -> ``nn.Module``."""

from nestlearn.compile.model import CompiledModel, compile_spec

__all__ = ["CompiledModel", "compile_spec"]
