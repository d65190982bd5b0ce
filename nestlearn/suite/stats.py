"""The numbers the tables report: mean +- std over seeds, and forgetting as a percentage.

Forgetting (the Nested Learning paper's continual-learning table reports it per domain, in %):

    perf(d, p)   performance on domain d measured right after phase p
                 (accuracy for a synthetic domain; for a text domain the bits per byte saved over
                 a uniform byte model, 8 - bits/byte, so that 0 means knowing nothing about it)
    best(d)      max of perf(d, p) over the phases up to and including the last one that trained d
    forgetting_d = 100 * (best(d) - perf(d, final phase)) / best(d)

for every domain not trained in the final phase: 0% = nothing lost, 100% = all that was learned is
gone (negative: the domain improved while later ones were learned). Undefined (None) when
best(d) <= 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

UNIFORM_BITS = 8.0  # bits per byte of a uniform guess over 256 bytes


def mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (n - 1; 0 for a single value); None for no values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def domain_perf(metrics: dict[str, float]) -> float:
    """A domain's performance, higher is better: accuracy, or bits saved over uniform for text."""
    if "accuracy" in metrics:
        return float(metrics["accuracy"])
    return UNIFORM_BITS - float(metrics["bits_per_byte"])


def forgetting_percent(perf: Sequence[Sequence[float]], phases: Sequence[str]) -> dict[str, float | None]:
    """``perf[p][j]``: performance on domain j (domains in order of first appearance in ``phases``)
    right after phase p. Returns ``{domain: forgetting in %}`` for every domain not trained in
    the final phase (see the module docstring)."""
    domains = list(dict.fromkeys(phases))
    if len(perf) != len(phases) or any(len(r) != len(domains) for r in perf):
        raise ValueError(f"expected a {len(phases)} x {len(domains)} matrix (phases x domains {domains})")
    final = len(phases) - 1
    out: dict[str, float | None] = {}
    for j, d in enumerate(domains):
        if phases[final] == d:
            continue
        last = max(i for i, p in enumerate(phases) if p == d)
        best = max(float(perf[i][j]) for i in range(last + 1))
        out[d] = 100.0 * (best - float(perf[final][j])) / best if best > 0 else None
    return out
