"""Memories: parametric (linear, MLP) as pure functions; attention lives in compile/ops."""

from nestlearn.memories.base import MemoryArch, plain_lin
from nestlearn.memories.linear import LinearMemory
from nestlearn.memories.mlp import MLPMemory

__all__ = ["MemoryArch", "LinearMemory", "MLPMemory", "plain_lin"]
