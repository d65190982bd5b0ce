"""Per-token chunk gains (what ``max_gain`` bounds) of every level at HOPE's initialisation, full
size, on the CPU (2026-12-07, sixteenth session; docs/training-health.md section 7). Every level
gets ``max_gain`` 1e9 (binding nowhere) and the gains are read where ``common.gain_factor``
computes them.

    python bench/results/cpu_2026-12-07_session16/token_gains.py 2049

printed (one 2,048-byte window of inspect.py, torch seed 0; two other initialisations gave the
same picture, largest gains 0.21-0.23 / 0.77-0.79 / 0.80-0.84 / 0.95-1.00):

selfmod   tokens 131072  mean 0.186  median 0.054  p90 0.529  p99 0.795  max 0.977  >1: 0.000%
cms_fast  tokens   8192  mean 0.158  median 0.155  p90 0.180  p99 0.202  max 0.206  >1: 0.000%
cms_mid   tokens   8192  mean 0.557  median 0.550  p90 0.649  p99 0.755  max 0.805  >1: 0.000%
cms_slow  tokens   8192  mean 0.696  median 0.695  p90 0.755  p99 0.791  max 0.809  >1: 0.000%
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import Tensor

import nestlearn
from nestlearn.loops import chunks, common, dgd_dual, dual

torch.set_num_threads(1)
torch.manual_seed(0)
gains: dict[str, list[Tensor]] = {}
level = [""]
real_factor, real_signals = common.gain_factor, chunks.chunk_signals


def spy_factor(sq: Tensor, sig: Tensor, rate: Tensor, steps: float, cap: float) -> Tensor:
    gains.setdefault(level[0], []).append(common.token_gain(sq, sig, rate, steps).detach().flatten())
    return real_factor(sq, sig, rate, steps, cap)


def spy_signals(pb: Any, *args: Any, **kw: Any) -> Any:
    level[0] = pb.level
    return real_signals(pb, *args, **kw)


common.gain_factor = spy_factor  # type: ignore[assignment]
dual.chunk_signals = dgd_dual.chunk_signals = spy_signals  # type: ignore[assignment]
over = [f"levels.{n}.max_gain=1e9" for n in ("cms_fast", "cms_mid", "cms_slow", "selfmod")]
model = nestlearn.compile(nestlearn.load_spec("models/hope.yaml", overrides=over))
n = int(sys.argv[1]) if len(sys.argv) > 1 else 2049
data = open(inspect.__file__, "rb").read()[:n]
with torch.no_grad():
    model(torch.tensor(list(data), dtype=torch.long)[None, :-1])
for name, parts in gains.items():
    g = torch.cat(parts)
    q = torch.quantile(g, torch.tensor([0.5, 0.9, 0.99], dtype=g.dtype))
    print(f"{name:9s} tokens {g.numel():6d}  mean {g.mean():.3f}  median {q[0]:.3f}  p90 {q[1]:.3f}  "
          f"p99 {q[2]:.3f}  max {g.max():.3f}  >1: {(g > 1).double().mean():.3%}")
