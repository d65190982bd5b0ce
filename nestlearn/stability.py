"""The chunk-step stability bound of an in-context level, checked before anything is built.

Within a chunk of ``C`` tokens every inner gradient is taken at the chunk-start state, so a
chunk whose tokens push the same way (a run of one byte: indentation, a line of ``=``) moves the
memory by ``lr * S(C, beta)`` times one token's gradient with no feedback in between, where

    S(C, beta) = sum_{t=1..C} sum_{j=1..t} beta^(t-j)          (= C for plain SGD)

is the chunk's accumulated step under momentum ``beta``. For the ``l2`` objective on a linear
memory read by a key of norm ``r`` the curvature along that step is ``2 r^2``, so the chunk's
error is multiplied by ``1 - 2 r^2 lr S``: beyond ``lr S r^2 = 1`` it grows from chunk to chunk,
and the outer gradient through the unrolled updates grows geometrically with the sequence's
length (what made Titans' outer gradients reach 1e9 at 2,048 tokens). Deeper memories only add
curvature, so the bound is necessary, not sufficient.

``r = 1`` for L2-normalised keys (``qk_norm``, the selfmod op); elsewhere the keys' RMS is taken
as 1 (``r^2 = d_head``). A level with ``clip`` or ``max_gain`` has a bounded step per token and
is not flagged (``max_gain`` holds this very gain, measured per token at run time).
Learned rates are judged at their initial value, gates at their maximum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChunkStep:
    level: str
    period: int
    lr: float
    beta: float
    key_sq: float
    """The squared key norm assumed (1 for L2-normalised keys)."""

    @property
    def accumulated(self) -> float:
        return accumulated_step(self.period, self.beta)

    @property
    def gain(self) -> float:
        """``lr * S(C, beta) * r^2``: above 1 the chunk step overshoots."""
        return self.lr * self.accumulated * self.key_sq

    @property
    def safe_lr(self) -> float:
        return 1.0 / (self.accumulated * self.key_sq)

    def message(self) -> str:
        keys = "unit-norm keys" if self.key_sq == 1 else f"keys of RMS 1 (|k|^2 = {self.key_sq:g})"
        return (f"chunk step {self.gain:.3g} > 1: a chunk of {self.period} tokens pushing the same way moves "
                f"the memory by lr {self.lr:g} x {self.accumulated:.4g} (momentum {self.beta:g}) gradient steps, "
                f"which overshoots the l2 objective for {keys}; at long sequences the inner loop and the outer "
                f"gradients through it can explode. Keep lr at most {self.safe_lr:.2g} or set the level's "
                f"'max_gain' (e.g. 0.5) or 'clip' (docs/training-health.md)")


def accumulated_step(period: int, beta: float) -> float:
    """``S(C, beta)``: the total movement of a chunk of ``C`` equal gradients, in units of one."""
    if beta <= 0:
        return float(period)
    if beta >= 1:
        return period * (period + 1) / 2
    return sum((1 - beta**t) / (1 - beta) for t in range(1, period + 1))


def steps_of(period: int, beta: Any) -> float:
    """``S(C, beta)`` for a period and a momentum given as in a spec or rule (a constant, a learned
    value's start, a gate's maximum; absent: none): what a level's ``max_gain`` divides by."""
    return accumulated_step(period, _upper(beta) or 0.0)


def _upper(value: Any) -> float | None:
    """A hyper-parameter's largest value: a constant, a learned value's start, a gate's max."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    for attr in ("max", "learned"):
        v = getattr(value, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def rule_fact(rule_spec: Any, fact: str) -> bool:
    """One of the rule table's class facts (``rules/base.py``: ``sums_gradients``, ...) for a rule spec."""
    from nestlearn.rules import coerce

    try:
        return bool(getattr(coerce(rule_spec), fact))
    except Exception:  # noqa: BLE001  (a rule that does not build is reported by the graph's own check)
        return False


def chunk_steps(spec: Any) -> list[ChunkStep]:
    """The chunk step of every in-context ``l2`` level with a gradient-sum rule, over the nodes
    that use it (the largest key norm among them)."""
    out: list[ChunkStep] = []
    heads = spec.model.heads
    for name, lv in spec.levels.items():
        if lv.is_outer or lv.objective != "l2" or not rule_fact(lv.rule, "sums_gradients"):
            continue
        lr = _upper(getattr(lv.rule, "lr", None))
        if lr is None or lr <= 0:
            continue
        beta = _upper(getattr(lv.rule, "beta", 0.0)) or 0.0
        key_sq = 0.0
        for node in spec.block:
            if getattr(node, "level", None) != name:
                continue
            if node.op == "selfmod" or getattr(node, "qk_norm", False):
                key_sq = max(key_sq, 1.0)
            else:
                width = spec.model.dim // (getattr(node, "heads", None) or (heads if node.op != "mlp" else 1))
                key_sq = max(key_sq, float(width))
        if key_sq:
            out.append(ChunkStep(name, int(lv.period), lr, beta, key_sq))
    return out


UNNORMALISED_CMS = (
    "this CMS level's keys W_k x and values W_v x are learned and not normalised: outer training can "
    "grow them, and with them the level's effective inner rate, past the chunk-step bound (full-size "
    "HOPE diverged at step 488 this way); set 'kv_norm: true' on the node or a 'max_gain' or 'clip' on level {level!r} "
    "(docs/training-health.md section 5)"
)


def unnormalised_cms(spec: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """Every ``mlp`` node of an in-context level whose keys and values are neither normalised
    (``kv_norm``) nor bounded per token (the level's ``clip``): the runaway of training-health §5."""
    found: list[tuple[tuple[str | int, ...], str]] = []
    for j, node in enumerate(spec.block):
        lv = spec.levels.get(getattr(node, "level", None) or "")
        if (node.op == "mlp" and lv is not None and not lv.is_outer and not node.kv_norm and lv.clip is None
                and lv.max_gain is None):
            found.append((("block", j, "level"), UNNORMALISED_CMS.format(level=node.level)))
    return found


UNROLLED_FIXED_STEP = (
    "the {rule} rule's step has the same size however small the gradient (Newton-Schulz), so near "
    "the memory's optimum its inner steps oscillate, and the outer gradient unrolled through them "
    "grows with the sequence's length (at 2,048 bytes: 2.5e3 for muon-memory, 2.3e6 for m3-memory, "
    "against the Transformer's 10); set 'grad: truncate:N' on level {level!r} (the shipped specs: "
    "truncate:16; docs/training-health.md section 6)"
)


def unrolled_fixed_steps(spec: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """Every in-context level whose rule takes fixed-size steps (muon, m3) with the outer gradient
    unrolled through all of them (``grad: unroll``): the explosion of training-health §6."""
    return [(("levels", name, "grad"), UNROLLED_FIXED_STEP.format(rule=lv.rule.name, level=name))
            for name, lv in spec.levels.items()
            if not lv.is_outer and lv.grad == "unroll" and rule_fact(lv.rule, "fixed_size_step")]


def warnings_for(spec: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """``(spec path, message)`` for every level whose chunk step exceeds the bound without a clip,
    every CMS node open to the outer level growing its rate, and every fixed-size-step rule
    unrolled over the whole sequence."""
    found: list[tuple[tuple[str | int, ...], str]] = []
    for cs in chunk_steps(spec):
        if cs.gain > 1 and spec.levels[cs.level].clip is None and spec.levels[cs.level].max_gain is None:
            found.append((("levels", cs.level, "rule", "lr"), cs.message()))
    return found + unnormalised_cms(spec) + unrolled_fixed_steps(spec)


def spec_warnings(spec: Any) -> list[Any]:
    """``warnings_for`` as positioned ``SpecIssue`` s (``file:line:col: path: message``)."""
    from nestlearn.spec.positions import issue_at

    return [issue_at(spec, loc, msg) for loc, msg in warnings_for(spec)]
