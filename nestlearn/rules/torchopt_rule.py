"""Any torchopt ``GradientTransformation`` as an inner rule.

torchopt's pure-Python path composes with autograd; its state is created from the batched
``[B, H, ...]`` parameters directly (no vmap), as torchopt's docs advise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from nestlearn.rules.base import Params, Rule, State


@dataclass
class TorchoptRule(Rule):
    tx: Any = None
    label: str = "torchopt"
    name = "torchopt"
    extra: dict[str, Any] = field(default_factory=dict)

    def init(self, params: Params) -> State:
        return {"tx": self.tx.init(params)}

    def step(
        self,
        params: Params,
        state: State,
        grads: Params,
        hp: Mapping[str, Tensor | float],
        inputs: Mapping[str, Tensor] | None = None,
    ) -> tuple[Params, State]:
        updates, new_state = self.tx.update(grads, state["tx"], params=params, inplace=False)
        return {k: p + updates[k] for k, p in params.items()}, {"tx": new_state}

    def describe(self) -> str:
        return self.label


def from_torchopt(tx: Any, label: str | None = None) -> TorchoptRule:
    """Wrap ``torchopt.adam(1e-3)``-style transformations (anything with init/update)."""
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError("expected a torchopt GradientTransformation (with .init and .update)")
    return TorchoptRule({}, tx=tx, label=label or "torchopt")
