"""The numbers the tables report: mean +- std over seeds, and forgetting as a percentage.

Forgetting (the Nested Learning paper's continual-learning table reports it per domain, in %):

    perf(d, p)   performance on domain d measured right after phase p
                 (accuracy for a synthetic domain; for a text domain the bits per byte saved over
                 a uniform byte model, 8 - bits/byte, so that 0 means knowing nothing about it)
    best(d)      max of perf(d, p) over the phases up to and including the last one that trained d
    forgetting_d = 100 * (best(d) - perf(d, final phase)) / best(d)

for every domain not trained in the final phase: 0% = nothing lost, 100% = all that was learned is
gone (negative: the domain improved while later ones were learned). Undefined (None) when
best(d) <= 0. The definition lives with the task (``nestlearn/tasks/continual.py``), so a run's
summary and the suite's tables report the same number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from nestlearn.tasks.continual import UNIFORM_BITS, domain_perf, forgetting_percent

__all__ = ["UNIFORM_BITS", "domain_perf", "forgetting_percent", "mean_std"]


def mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (n - 1; 0 for a single value); None for no values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
