"""Digit accuracy of the NIAH runs trained at 1,024 bytes, per evaluation length (mean ± std over
the seeds), and the best whole-passkey accuracy of any run: the table of docs/results.md.

    python bench/results/cpu_2026-12-08_niah1k/digits.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RUNS = json.loads((Path(__file__).resolve().parent / "results.json").read_text())["runs"]


def main() -> None:
    print("| spec | seeds | digits at 1K | 2K | 4K | 8K | whole passkeys (any length) | minutes a run |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for spec in ("hope-delta", "deltanet", "transformer"):
        rs = [r for r in RUNS.values() if r["spec"] == spec and r.get("status") == "done"]
        cells = []
        for length in ("1", "2", "4", "8"):
            v = [r["lengths"][length]["accuracy"] for r in rs]
            cells.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        whole = max(r["lengths"][n]["sequence_accuracy"] for r in rs for n in r["lengths"])
        minutes = statistics.mean(r["wall_s"] for r in rs) / 60
        print(f"| {spec} | {len(rs)} | " + " | ".join(cells) + f" | {whole:.3f} | {minutes:.1f} |")


if __name__ == "__main__":
    main()
