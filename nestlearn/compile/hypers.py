"""Hyper-parameters of an in-context rule as the outer level sees them: constants,
meta-learned scalars (``learned``) and data-dependent gates ``max * sigmoid(Linear(x))``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nestlearn.rules.base import HyperValue
from nestlearn.spec.schema import Gate, Learned


class Hypers(nn.Module):
    def __init__(self, hypers: dict[str, HyperValue], dim: int, heads: int):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.gates = nn.ModuleDict()
        self.learned = nn.ParameterDict()
        for name, h in hypers.items():
            if isinstance(h, Gate):
                self.gates[name] = self._gate(h)
            elif isinstance(h, Learned):
                self.learned[name] = nn.Parameter(torch.tensor(float(h.learned)))

    def _gate(self, h: Gate) -> nn.Linear:
        lin = nn.Linear(self.dim, self.heads)
        nn.init.zeros_(lin.weight)
        nn.init.constant_(lin.bias, h.bias)
        return lin

    def rebuild(self, hypers: dict[str, HyperValue], like: Tensor) -> tuple[list[str], list[str]]:
        """Match a new rule's ``hypers`` (a rule swap): a gate or learned value of the same name
        and kind is kept (trained as it is), the others are removed, the new ones start fresh
        (on ``like``'s device and dtype). Returns ``(removed, added)`` as ``gates.NAME`` /
        ``learned.NAME``."""
        removed = [f"gates.{n}" for n in self.gates if not isinstance(hypers.get(n), Gate)]
        removed += [f"learned.{n}" for n in self.learned if not isinstance(hypers.get(n), Learned)]
        for key in removed:
            kind, name = key.split(".", 1)
            del getattr(self, kind)[name]
        added = []
        for name, h in hypers.items():
            if isinstance(h, Gate) and name not in self.gates:
                self.gates[name] = self._gate(h).to(device=like.device, dtype=like.dtype)
                added.append(f"gates.{name}")
            elif isinstance(h, Learned) and name not in self.learned:
                self.learned[name] = nn.Parameter(torch.tensor(float(h.learned), device=like.device, dtype=like.dtype))
                added.append(f"learned.{name}")
        return removed, added

    def forward(
        self, hypers: dict[str, HyperValue], x: Tensor, offset: int, period: int,
        carried: dict[str, Tensor] | None,
    ) -> tuple[dict[str, Tensor | float], dict[str, Tensor]]:
        """Per-token values ``[B, H, T]`` (or floats) and the chunk gates to carry."""
        out: dict[str, Tensor | float] = {}
        new_carry: dict[str, Tensor] = {}
        t = x.shape[1]
        for name, h in hypers.items():
            if isinstance(h, Gate):
                if name not in self.gates:
                    raise ValueError(f"rule hyper-parameter {name!r} is a gate, but this level was "
                                     "compiled without one; swap in constants or learned values")
                g = h.max * torch.sigmoid(self.gates[name](x)).transpose(1, 2)  # [B, H, T]
                if h.gate == "chunk":
                    g, new_carry[name] = _chunk_values(g, offset, period, (carried or {}).get(name))
                out[name] = g
            elif isinstance(h, Learned):
                if name not in self.learned:
                    raise ValueError(f"rule hyper-parameter {name!r} is learned, but this level was "
                                     "compiled without it")
                out[name] = self.learned[name].to(x.dtype)
            else:
                out[name] = float(h)
        del t
        return out, new_carry


def _chunk_values(g: Tensor, offset: int, period: int, carried: Tensor | None) -> tuple[Tensor, Tensor]:
    """Each token takes its chunk's first-token value (causal; the same however a stream is
    split into calls, since a chunk begun in an earlier call carries its value)."""
    t = g.shape[-1]
    idx = torch.arange(t, device=g.device)
    start = idx - (offset + idx) % period
    picked = g.gather(-1, start.clamp_min(0).expand(*g.shape[:-1], t))
    if carried is not None:
        picked = torch.where(start < 0, carried.unsqueeze(-1), picked)
    last_start = int(t - 1 - (offset + t - 1) % period)
    new = picked[..., -1] if last_start < 0 else g[..., last_start]
    return picked, new
