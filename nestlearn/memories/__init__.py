"""Memories: parametric (linear, MLP, TTT) as pure functions; attention lives in compile/.

``MEMORIES`` is the table of the spec's memory types (``memory: {type: ...}``, the keys of
``spec/schema.py``'s ``MemorySpec.type``): a new memory is its module, its name there and a row here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from nestlearn.memories.base import MemoryArch, plain_lin
from nestlearn.memories.linear import LinearMemory
from nestlearn.memories.mlp import MLPMemory
from nestlearn.memories.ttt import TTTMemory

__all__ = ["MEMORIES", "MemoryArch", "LinearMemory", "MLPMemory", "TTTMemory", "build_arch", "plain_lin"]

# (memory spec, d_in, d_out, heads, key_rms) -> the memory; key_rms: the keys' RMS (1/sqrt(d_in)
# when they are L2-normalised, which sets a TTT memory's initial draw)
MemoryBuilder = Callable[[Any, int, int, int, float], MemoryArch]


def _ttt(mem: Any, d_in: int, d_out: int, heads: int, key_rms: float) -> MemoryArch:
    # an nn.Module too: its layer norm's scale/shift are outer parameters
    return TTTMemory(d_in, d_out, heads, core=mem.type[4:], expand=mem.expand, act=mem.act, bias=mem.bias,
                     init_std=mem.init_std, key_rms=key_rms)


MEMORIES: dict[str, MemoryBuilder] = {
    "linear": lambda mem, d_in, d_out, heads, key_rms: LinearMemory(d_in, d_out, heads, bias=mem.bias),
    "mlp": lambda mem, d_in, d_out, heads, key_rms: MLPMemory(
        d_in, d_out, heads, expand=mem.expand, depth=mem.depth, act=mem.act,
        residual=mem.residual and d_in == d_out, bias=mem.bias),
    "ttt-linear": _ttt,
    "ttt-mlp": _ttt,
}


def build_arch(mem: Any, d_in: int, d_out: int, heads: int, unit_keys: bool = False) -> MemoryArch:
    """The memory of a validated ``MemorySpec``; ``unit_keys``: its keys are L2-normalised."""
    return MEMORIES[mem.type](mem, d_in, d_out, heads, 1 / math.sqrt(d_in) if unit_keys else 1.0)
