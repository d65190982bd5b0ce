"""Inner rules (optimisers of fast weights), one file per rule; ``step`` is the reference."""

from __future__ import annotations

from typing import Any

from nestlearn.rules.adam import Adam, adam, adamw
from nestlearn.rules.base import Rule
from nestlearn.rules.dgd import DGD, dgd
from nestlearn.rules.dmgd import DMGD, dmgd
from nestlearn.rules.m3 import M3, m3
from nestlearn.rules.momentum import Momentum, momentum, sgd
from nestlearn.rules.muon import Muon, muon
from nestlearn.rules.torchopt_rule import TorchoptRule, from_torchopt
from nestlearn.spec import schema

__all__ = [
    "Rule", "Momentum", "Adam", "DGD", "DMGD", "Muon", "M3", "TorchoptRule",
    "sgd", "momentum", "adam", "adamw", "dgd", "dmgd", "muon", "m3", "from_torchopt", "from_spec", "coerce",
]


def from_spec(spec: Any) -> Rule:
    """Build a rule from a validated ``RuleSpec``."""
    if isinstance(spec, schema.SgdRule):
        return sgd(spec.lr, spec.decay)
    if isinstance(spec, schema.MomentumRule):
        return momentum(spec.lr, spec.beta, spec.decay)
    if isinstance(spec, schema.AdamRule):
        return adam(spec.lr, spec.b1, spec.b2, spec.eps, spec.weight_decay, spec.eps_root)
    if isinstance(spec, schema.AdamWRule):
        return adamw(spec.lr, spec.b1, spec.b2, spec.eps, spec.weight_decay, spec.eps_root)
    if isinstance(spec, schema.DgdRule):
        return dgd(spec.lr, spec.decay, spec.beta)
    if isinstance(spec, schema.DmgdRule):
        return dmgd(spec.lr, spec.beta, spec.decay, momentum=spec.momentum,
                    momentum_objective=spec.momentum_objective, expand=spec.expand, act=spec.act,
                    init_std=spec.init_std, seed=spec.seed)
    if isinstance(spec, schema.MuonRule):
        return muon(spec.lr, spec.beta, spec.ns_steps)
    if isinstance(spec, schema.M3Rule):
        return m3(spec.lr, spec.beta, spec.alpha, spec.every, slow_beta=spec.slow_beta, b1=spec.b1,
                  b3=spec.b3, b2=spec.b2, eps=spec.eps, ns_steps=spec.ns_steps)
    if isinstance(spec, schema.TorchoptRule):
        import torchopt

        return from_torchopt(getattr(torchopt, spec.fn)(**spec.args), label=f"torchopt.{spec.fn}")
    raise TypeError(f"no rule for {type(spec).__name__}")


def coerce(rule: Any) -> Rule:
    """Accept our rules, torchopt transformations, or a validated rule spec."""
    if isinstance(rule, Rule):
        return rule
    if hasattr(rule, "init") and hasattr(rule, "update"):
        return from_torchopt(rule)
    return from_spec(rule)
