"""Parameter counts per spec: load and build every spec of the grid before anything trains
(a spec that cannot be built at the experiment's sizes fails here, with its own message), flag
counts off the row's reference, and optionally search ``model.dim`` to match a target count."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch

import nestlearn
from nestlearn.suite.errors import SuiteError
from nestlearn.suite.experiment import Experiment, ParamsPolicy, SpecRow


@dataclass
class ResolvedSpec:
    row: SpecRow
    spec: Any  # nestlearn.Spec, with every override applied
    params: int
    overrides: tuple[str, ...]  # the row's overrides plus a matched model.dim


def build(row: SpecRow, extra: tuple[str, ...] = ()) -> tuple[Any, int]:
    """The spec with its overrides and the trainable parameter count of its compiled model, after
    one tiny forward pass: some sizes compile but fail when run (rotary embeddings need an even
    head dimension), and that must show here, not an hour into the grid."""
    spec = nestlearn.load_spec(row.path, [*row.overrides, *extra], profile=row.profile)
    model = nestlearn.compile(spec)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))
    return spec, int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def _spec_problem(exp: Experiment, row: SpecRow, e: Exception) -> str:
    head = exp.doc.message(("specs", row.index), f"spec '{row.label}' does not build with the experiment's "
                           "overrides:") if exp.doc else f"spec '{row.label}':"
    body = "\n".join("  " + line for line in str(e).splitlines())
    return f"{head}\n{body}"


def resolve_specs(exp: Experiment) -> dict[str, ResolvedSpec]:
    """Every spec loaded and built once; ``SuiteError`` listing each one that fails."""
    out: dict[str, ResolvedSpec] = {}
    problems = []
    for row in exp.specs:
        try:
            spec, n = build(row)
        except (nestlearn.SpecError, ValueError, TypeError, RuntimeError, KeyError) as e:
            problems.append(_spec_problem(exp, row, e))
            continue
        out[row.label] = ResolvedSpec(row, spec, n, row.overrides)
    if problems:
        raise SuiteError("\n".join(problems))
    if exp.params.match == "dim":
        first = exp.specs[0].label
        target = exp.params.target or out[first].params
        for label, rs in list(out.items()):
            if exp.params.target or label != first:  # the spec that sets the target keeps its width
                out[label] = match_dim(rs, target)
    return out


def match_dim(rs: ResolvedSpec, target: int) -> ResolvedSpec:
    """The ``model.dim`` (a multiple of twice the spec's heads: even head dimensions) whose count
    is closest to ``target``: counts grow with the width, so bisect over the multiples, then take
    the nearer neighbour."""
    heads = 2 * int(getattr(rs.spec.model, "heads", 1) or 1)
    cache: dict[int, tuple[Any, int] | None] = {}

    def at(k: int) -> tuple[Any, int] | None:
        if k not in cache:
            try:
                cache[k] = build(rs.row, (f"model.dim={k * heads}",))
            except (nestlearn.SpecError, ValueError, TypeError, RuntimeError, KeyError):
                cache[k] = None  # e.g. a head dimension some op cannot take
        return cache[k]

    lo, hi = 1, max(2, 4 * int(rs.spec.model.dim) // heads)
    while lo < hi:  # the smallest k whose count reaches the target (unbuildable k: treated as too small)
        mid = (lo + hi) // 2
        got = at(mid)
        if got is not None and got[1] >= target:
            hi = mid
        else:
            lo = mid + 1
    best = min((k for k in (lo - 1, lo) if k >= 1 and at(k) is not None),
               key=lambda k: abs(at(k)[1] - target), default=None)  # type: ignore[index]
    if best is None:
        return rs
    spec, n = at(best)  # type: ignore[misc]
    return ResolvedSpec(rs.row, spec, n, (*rs.row.overrides, f"model.dim={best * heads}"))


def reference_count(counts: list[int], policy: ParamsPolicy) -> float:
    if not counts:
        return 0.0
    return float(counts[0]) if policy.reference == "first" else float(statistics.median(counts))


def param_flags(counts: dict[str, int], policy: ParamsPolicy) -> dict[str, str]:
    """``{label: "+14% params"}`` for every spec whose count is off the reference by more than the
    tolerance (the reference: the median of the row, or the first spec)."""
    ref = reference_count(list(counts.values()), policy)
    flags = {}
    for label, n in counts.items():
        if ref > 0 and abs(n - ref) / ref > policy.tolerance:
            flags[label] = f"{(n - ref) / ref:+.0%} params"
    return flags
