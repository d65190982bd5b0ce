"""50-step windows of a run's metrics.jsonl: mean training bits/byte, the largest outer gradient
norm, and per CMS level the largest chunk gain / peak gain recorded (docs/training-health.md §7).

    python bench/results/cpu_2026-12-07_session16/windows.py bench/results/cpu_2026-12-07_session16/emu8_free
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

LEVELS = ("cms_fast", "cms_mid", "cms_slow")


def main(run: Path, width: int = 50) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    vals = {r["step"]: r["bits_per_byte"] for r in rows if r.get("split") == "val"}
    print("| steps | train bits/byte | val (step) | max grad | " + " | ".join(f"{lv} chunk / peak" for lv in LEVELS) + " |")
    print("| --- | ---: | ---: | ---: |" + " ---: |" * len(LEVELS))
    last = max(r["step"] for r in train)
    for a in range(1, last + 1, width):
        w = [r for r in train if a <= r["step"] < a + width]
        if not w:
            continue
        cells = []
        for lv in LEVELS:
            got = [r["levels"][lv] for r in w if lv in r.get("levels", {})]
            chunk = max(g.get("chunk_gain", 0.0) for g in got) if got else 0.0
            peak = max(g.get("peak_gain", 0.0) for g in got) if got else 0.0
            cells.append(f"{chunk:.2f} / {peak:.2f}" if peak else f"{chunk:.2f} / -")
        end = max(r["step"] for r in w)
        val = next((f"{vals[s]:.3f} ({s})" for s in sorted(vals, reverse=True) if a <= s <= end), "")
        print(f"| {a}-{end} | {statistics.mean(r['bits_per_byte'] for r in w):.3f} | {val} | "
              f"{max(r['grad_norm'] for r in w):.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
