"""Runtime handles of the spec's levels: period, objective, gradient mode, and a swappable rule."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel
from torch import Tensor

from nestlearn import objectives
from nestlearn.loops import Executor, GradMode, MemoryProblem
from nestlearn.memories.base import MemoryArch
from nestlearn.rules import Rule, coerce
from nestlearn.spec.errors import SpecError
from nestlearn.spec.schema import LevelSpec, Spec
from nestlearn.stability import steps_of

if TYPE_CHECKING:
    from nestlearn.compile.model import CompiledModel

PYTHON_FILE = "<python>"
"""Where a rule given from Python is said to be, in its error messages."""


class Level:
    """One level of a compiled model. Assigning ``rule`` takes effect on the next forward; it
    takes one of our rules (``nestlearn.rules.adam(lr=1e-3)``), a torchopt transformation, a
    rule name (``"adam"``) or a rule spec as in YAML (``{"name": "momentum", "lr": {"gate":
    "token", "max": 0.1}}``). Names and specs are checked like the YAML (``SpecError``, the same
    messages). The swap rebuilds the level's hyper-parameter modules (gates, learned values):
    those the new rule has no use for leave the model (a warning names them), new ones start
    fresh; build the outer optimizer after swapping."""

    def __init__(self, name: str, spec: LevelSpec):
        self.name = name
        self.spec = spec
        self.period: int | str = spec.period
        self._objective: objectives.Objective | None = None
        self.objective_name = spec.objective
        self.grad = GradMode.parse(spec.grad)
        self.read_start = spec.read == "chunk_start"
        self.executor: Executor = "auto"
        self.compile_chunk_steps = False
        """Run the closed-form chunk steps of this level's memories through torch.compile
        (``MemoryProblem.compiled``; ``CompiledModel.compile_chunk_steps`` sets it)."""
        self._rule: Rule = coerce(spec.rule) if not spec.is_outer else _OuterRule(spec.rule)
        self.model: CompiledModel | None = None
        """The compiled model this level belongs to (set by it): where a swap rebuilds the gates."""

    def problem(self, arch: MemoryArch, q: Tensor, k: Tensor, v: Tensor, hp: Mapping[str, Tensor | float],
                period: int, **fields: Any) -> MemoryProblem:
        """One memory's inner problem at this level: its rule, objective, gradient mode, read,
        chunk, remat, clip, gain cap and chunk-step compilation; ``fields`` replace some of them (e.g. a
        generator memory's ``read_start``)."""
        pb = MemoryProblem(arch, self.rule, self.objective, q, k, v, hp, period, self.grad, self.name,
                           self.read_start, self.spec.chunk, self.spec.remat, self.spec.clip,
                           max_gain=self.spec.max_gain, gain_steps=steps_of(period, self.rule.hypers.get("beta")),
                           compiled=self.compile_chunk_steps)
        return replace(pb, **fields) if fields else pb

    @property
    def objective(self) -> objectives.Objective:
        """The inner objective, resolved on first use: a ``package.module:function`` is imported
        when the model first runs, not when it is built (``nestlearn compile`` builds it)."""
        if self._objective is None:
            self._objective = objectives.resolve(self.spec.objective)
        return self._objective

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
        rule, spec = self._checked(value)
        if self.model is not None:
            changed = self.model.rebuild_hypers(self, rule)
            if changed:
                warnings.warn(f"level {self.name!r}: swapping {self._rule.describe()} for {rule.describe()} "
                              f"{changed}; build the outer optimizer after the swap", UserWarning, stacklevel=2)
        self._rule = rule
        if spec is not None:
            self.spec = spec

    def _checked(self, value: Any) -> tuple[Rule, LevelSpec | None]:
        """``(rule, the level's spec with it)`` for a name or rule spec, checked like the YAML
        (the spec as a whole, level graph included); ``(rule, None)`` for a rule object."""
        if isinstance(value, Rule) or (hasattr(value, "init") and hasattr(value, "update")):
            rule = coerce(value)  # a rule object: no spec for the level graph to check, so its facts here
            if self.spec.max_gain is not None and not rule.sums_gradients:
                raise ValueError(f"level {self.name!r} has max_gain, which bounds a step that sums gradients "
                                 f"(sgd, momentum, dgd); rule {rule.name!r} does not: use such a rule, or "
                                 "build the model without max_gain")
            if rule.needs_inputs and self.model is not None and self.name in self.model.graph.nested_inits.values():
                raise ValueError(f"level {self.name!r} meta-learns an initial state (nested init), but rule "
                                 f"{rule.name!r} needs a memory's layer inputs; use a rule without them")
            return rule, None
        raw = {"name": value} if isinstance(value, str) else value
        if isinstance(raw, BaseModel):  # a rule spec object (schema.SgdRule, ...): checked again
            raw = raw.model_dump(mode="python", exclude_unset=True)
        if self.model is None:
            from pydantic import TypeAdapter, ValidationError

            from nestlearn.spec.schema import RuleSpec

            try:
                rule_spec = TypeAdapter(RuleSpec).validate_python(raw)
            except ValidationError as exc:
                raise ValueError(f"level {self.name!r}: not a rule: {exc}") from None
            return coerce(rule_spec), self.spec.model_copy(update={"rule": rule_spec})
        new = _with_rule(self.model.spec, self.name, raw)
        return coerce(new.levels[self.name].rule), new.levels[self.name]

    # ------------------------------------------------------------------ inspection
    def nodes(self) -> list[str]:
        """The nodes that run this level, as ``"BLOCK.NODE"`` (e.g. ``"0.mem"``), the keys of
        :meth:`params` and :attr:`init` (which add a selfmod node's ``".generators"`` and the
        faster nodes whose initial state this level meta-learns)."""
        return [key for key, _ in self._ops()]

    def params(self, state: dict[str, Any]) -> dict[str, dict[str, Tensor]]:
        """The fast weights this level has learned in context, read from a state the model
        returned (``logits, state = model(tokens)``): ``{"BLOCK.NODE": {name: [B, H, ...]}}``.

        A selfmod node gives its main memory under ``"BLOCK.NODE"`` and its k / v / lr / decay
        generators (one weight, their rows stacked) under ``"BLOCK.NODE.generators"``; a slower
        level that meta-learns a faster node's initial state (``init: LEVEL``) gives that state.
        The tensors are the state's own (``.detach()`` them to keep them)."""
        out: dict[str, dict[str, Tensor]] = {}
        for key, op in self._ops(nested=True):
            block, node = key.split(".", 1)
            st = state.get(block, {}).get(node) if isinstance(state, dict) else None
            if st is None:
                raise ValueError(f"level {self.name!r}: the state has no entry for node {node!r} of block {block}; "
                                 "pass the state the model returned")
            out.update(_op_params(key, op, st, self))
        return out

    @property
    def init(self) -> dict[str, dict[str, Tensor]]:
        """The initial memory every sequence starts from (outer parameters, ``[H, ...]`` per
        weight), by ``"BLOCK.NODE"`` like :meth:`params`. For a node whose ``init`` names a
        slower in-context level, that level's starting state."""
        out: dict[str, dict[str, Tensor]] = {}
        for key, op in self._ops(nested=True):
            out.update(_op_init(key, op, self))
        return out

    def _ops(self, nested: bool = False) -> list[tuple[str, Any]]:
        """``("BLOCK.NODE", op)`` of every top-level op running this level (with ``nested``: also
        the ops whose initial state this level meta-learns)."""
        if self.model is None:
            raise ValueError(f"level {self.name!r} is not part of a compiled model")
        found = []
        for i, block in enumerate(self.model.blocks):
            for node, op in block.ops.items():  # type: ignore[union-attr,operator]
                nest = getattr(op, "nest", None)
                if getattr(op, "level", None) is self or (nested and nest is not None and nest.level is self):
                    found.append((f"{i}.{node}", op))
        return found

    def __repr__(self) -> str:
        return f"Level({self.name!r}, period={self.period}, rule={self._rule.describe()}, grad={self.grad.kind})"


def _op_params(key: str, op: Any, st: dict[str, Any], level: Level) -> dict[str, dict[str, Tensor]]:
    if "mems" in st:  # selfmod: the main memory and its generators
        return {key: st["mems"]["main"]["params"], f"{key}.generators": st["mems"]["gen"]["params"]}
    if getattr(op, "level", None) is not level:  # the slower level of a nested init: its state Φ
        return {key: st["nest"]["params"]}
    return {key: st["mem"]["params"]}


def _op_init(key: str, op: Any, level: Level) -> dict[str, dict[str, Tensor]]:
    mem = getattr(op, "memory", op)  # a mac node's neural memory
    init = dict(mem.init.items())
    if getattr(op, "gen_arch", None) is not None:  # selfmod: see _op_params
        gens = torch.cat([init[f"{n}__W"] for n in ("k", "v", "lr", "decay")], dim=1)
        return {key: {k[6:]: p for k, p in init.items() if k.startswith("main__")}, f"{key}.generators": {"W": gens}}
    return {key: init}


def _with_rule(spec: Spec, level: str, raw: Any) -> Spec:
    """``spec`` with level ``level``'s rule replaced by ``raw``, validated as a whole like a YAML
    document (schema, then the level graph); a ``SpecError`` says what is wrong, at
    ``levels.LEVEL.rule...`` as in a file."""
    from nestlearn.graph import build_graph
    from nestlearn.spec.messages import validate_document
    from nestlearn.spec.positions import SourceMap

    doc = spec.model_dump(mode="python", exclude_unset=True)
    doc["levels"][level]["rule"] = raw
    try:
        new = validate_document(doc, SourceMap(file=PYTHON_FILE))
        build_graph(new)
    except SpecError as err:
        for issue in err.issues:
            issue.file, issue.line, issue.col = PYTHON_FILE, None, None
        raise
    return new


class _OuterRule(Rule):
    """The outer level's rule is a torch.optim optimizer built by the trainer."""

    def __init__(self, spec: Any):
        super().__init__({})
        self.spec = spec
        self.name = spec.name

    def describe(self) -> str:
        extras = {k: v for k, v in self.spec.model_dump().items() if k != "name"}
        return f"{self.spec.name}(" + ", ".join(f"{k}={v}" for k, v in extras.items()) + ")"
