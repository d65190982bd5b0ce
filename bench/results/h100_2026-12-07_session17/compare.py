"""Seed 1 of HOPE on the same training batches, 50-step windows side by side: the shipped 1e-3
(this session), 2e-3 without the wavefront (this session), 2e-3 with ``--wavefront 512`` (fifteenth
session, NaN at step 277), and the Transformer's seed 1 at 1e-3 (2026-12-06); then the CMS levels'
chunk / peak gains at the recorded steps of the two 2e-3 runs (docs/training-health.md §7).

    python bench/results/h100_2026-12-07_session17/compare.py
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent
RUNS = {
    "hope 1e-3": HERE / "call8/s1/hope/metrics.jsonl",
    "hope 2e-3": HERE / "call8/lr2e-3_s1_nowave/hope/metrics.jsonl",
    "hope 2e-3 wavefront": RESULTS / "h100_2026-12-07_session15/hope_s1/lr2e-3_s1/hope/metrics.jsonl",
    "transformer 1e-3": RESULTS / "h100_2026-12-06_decay_to_init/transformer_seed1.jsonl",
}
LEVELS = ("cms_fast", "cms_mid", "cms_slow")


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def window(rows: list[dict], a: int, b: int) -> str:
    w = [r["bits_per_byte"] for r in rows if r.get("split") == "train" and a <= r["step"] <= b]
    if len(w) < b - a + 1:
        return "-"
    m = statistics.mean(w)
    return f"{m:.3f}" if math.isfinite(m) else "NaN"


def main(width: int = 50) -> None:
    runs = {name: load(path) for name, path in RUNS.items()}
    print("| train steps | " + " | ".join(runs) + " |")
    print("| --- |" + " ---: |" * len(runs))
    for a in range(1, 651, width):
        b = a + width - 1
        print(f"| {a}-{b} | " + " | ".join(window(rows, a, b) for rows in runs.values()) + " |")
    print("\n| run | max grad norm after step 10 | non-finite train losses | held-out (step) |")
    print("| --- | ---: | ---: | --- |")
    for name, rows in runs.items():
        train = [r for r in rows if r.get("split") == "train"]
        grads = [r["grad_norm"] for r in train if r["step"] > 10 and math.isfinite(r["grad_norm"])]
        bad = sum(not math.isfinite(r["loss"]) for r in train)
        vals = ", ".join(f"{r['bits_per_byte']:.3f} ({r['step']})" for r in rows if r.get("split") == "val")
        print(f"| {name} | {max(grads):.2f} | {bad} | {vals} |")
    print("\n| step | " + " | ".join(f"{lv} 2e-3 / wavefront (chunk gain; peak)" for lv in LEVELS) + " |")
    print("| ---: |" + " --- |" * len(LEVELS))
    stats = {name: {r["step"]: r["levels"] for r in runs[name] if "levels" in r}
             for name in ("hope 2e-3", "hope 2e-3 wavefront")}
    for step in sorted(set(stats["hope 2e-3"]) | set(stats["hope 2e-3 wavefront"])):
        cells = []
        for lv in LEVELS:
            got = [stats[n].get(step, {}).get(lv) for n in stats]
            cells.append(" / ".join(f"{g.get('chunk_gain', math.nan):.2f}; {g.get('peak_gain', math.nan):.1f}" if g else "-"
                                    for g in got))
        print(f"| {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
