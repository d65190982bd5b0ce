"""``python -m bench.profile NAME IMPL BATCH SEQ [--device cuda]``: torch.profiler top ops of one step."""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.run import cases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("impl")
    ap.add_argument("batch", type=int)
    ap.add_argument("seq", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    dev = torch.device(a.device)
    case = next(c for c in cases(dev, a.small, None)
                if (c.name, c.impl, c.batch, c.seq) == (a.name, a.impl, a.batch, a.seq))
    step = case.build()
    for _ in range(2):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    print(f"## {a.name} {a.impl} {a.batch}x{a.seq}")
    print(prof.key_averages().table(sort_by=key, row_limit=a.top, max_name_column_width=40))


if __name__ == "__main__":
    main()
