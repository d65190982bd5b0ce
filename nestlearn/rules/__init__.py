"""Inner rules (optimisers of fast weights), one file per rule; ``step`` is the reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nestlearn.rules.adam import Adam, adam, adamw
from nestlearn.rules.base import Rule
from nestlearn.rules.dgd import DGD, dgd
from nestlearn.rules.dmgd import DMGD, dmgd
from nestlearn.rules.m3 import M3, m3
from nestlearn.rules.momentum import Momentum, momentum, sgd
from nestlearn.rules.muon import Muon, muon
from nestlearn.rules.torchopt_rule import TorchoptRule, from_torchopt

__all__ = [
    "Rule", "Momentum", "Adam", "DGD", "DMGD", "Muon", "M3", "TorchoptRule", "RULES", "RuleEntry",
    "sgd", "momentum", "adam", "adamw", "dgd", "dmgd", "muon", "m3", "from_torchopt", "from_spec", "coerce",
]


@dataclass(frozen=True)
class RuleEntry:
    """One rule of the spec: its class (whose class attributes are the rule's facts:
    ``linear``, ``needs_inputs``, ``sums_gradients``, ``fixed_size_step``, ``usable_as_outer``) and how a validated
    rule spec (``spec/schema.py``, the class whose ``name`` is this entry's key) builds it."""

    cls: type[Rule]
    build: Callable[[Any], Rule]


def _torchopt(spec: Any) -> Rule:
    import torchopt

    return from_torchopt(getattr(torchopt, spec.fn)(**spec.args), label=f"torchopt.{spec.fn}")


RULES: dict[str, RuleEntry] = {
    "sgd": RuleEntry(Momentum, lambda s: sgd(s.lr, s.decay, decay_to=s.decay_to)),
    "momentum": RuleEntry(Momentum, lambda s: momentum(s.lr, s.beta, s.decay, decay_to=s.decay_to)),
    "adam": RuleEntry(Adam, lambda s: adam(s.lr, s.b1, s.b2, s.eps, s.weight_decay, s.eps_root)),
    "adamw": RuleEntry(Adam, lambda s: adamw(s.lr, s.b1, s.b2, s.eps, s.weight_decay, s.eps_root)),
    "dgd": RuleEntry(DGD, lambda s: dgd(s.lr, s.decay, s.beta, proj=s.proj)),
    "dmgd": RuleEntry(DMGD, lambda s: dmgd(s.lr, s.beta, s.decay, momentum=s.momentum,
                                           momentum_objective=s.momentum_objective, expand=s.expand,
                                           act=s.act, init_std=s.init_std, seed=s.seed)),
    "muon": RuleEntry(Muon, lambda s: muon(s.lr, s.beta, s.ns_steps)),
    "m3": RuleEntry(M3, lambda s: m3(s.lr, s.beta, s.alpha, s.every, slow_beta=s.slow_beta, b1=s.b1, b3=s.b3,
                                     b2=s.b2, eps=s.eps, ns_steps=s.ns_steps)),
    "torchopt": RuleEntry(TorchoptRule, _torchopt),
}
"""Every rule a spec can name (the keys are the schema's rule names; ``tests/test_tables.py``)."""


def from_spec(spec: Any) -> Rule:
    """Build a rule from a validated ``RuleSpec``."""
    entry = RULES.get(getattr(spec, "name", None))  # type: ignore[arg-type]
    if entry is None:
        raise TypeError(f"no rule for {type(spec).__name__}")
    return entry.build(spec)


def coerce(rule: Any) -> Rule:
    """Accept our rules, torchopt transformations, or a validated rule spec."""
    if isinstance(rule, Rule):
        return rule
    if hasattr(rule, "init") and hasattr(rule, "update"):
        return from_torchopt(rule)
    return from_spec(rule)
