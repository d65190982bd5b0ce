"""Runtime handles of the spec's levels: period, objective, gradient mode, and a swappable rule."""

from __future__ import annotations

from typing import Any

from nestlearn import objectives
from nestlearn.loops import Executor, GradMode
from nestlearn.rules import Rule, coerce
from nestlearn.spec.schema import LevelSpec


class Level:
    """One level of a compiled model. Assigning ``rule`` (one of ours, a torchopt
    transformation, or a rule spec) takes effect on the next forward."""

    def __init__(self, name: str, spec: LevelSpec):
        self.name = name
        self.spec = spec
        self.period: int | str = spec.period
        self.objective = objectives.resolve(spec.objective)
        self.objective_name = spec.objective
        self.grad = GradMode.parse(spec.grad)
        self.read_start = spec.read == "chunk_start"
        self.executor: Executor = "auto"
        self._rule: Rule = coerce(spec.rule) if not spec.is_outer else _OuterRule(spec.rule)

    @property
    def is_outer(self) -> bool:
        return self.period == "outer"

    @property
    def rule(self) -> Rule:
        return self._rule

    @rule.setter
    def rule(self, value: Any) -> None:
        if self.is_outer:
            raise ValueError("the outer level's rule is the training optimizer; set it in the spec")
        self._rule = coerce(value)

    def __repr__(self) -> str:
        return f"Level({self.name!r}, period={self.period}, rule={self._rule.describe()}, grad={self.grad.kind})"


class _OuterRule(Rule):
    """The outer level's rule is a torch.optim optimizer built by the trainer."""

    def __init__(self, spec: Any):
        super().__init__({})
        self.spec = spec
        self.name = spec.name

    def describe(self) -> str:
        extras = {k: v for k, v in self.spec.model_dump().items() if k != "name"}
        return f"{self.spec.name}(" + ", ".join(f"{k}={v}" for k, v in extras.items()) + ")"
