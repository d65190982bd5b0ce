"""``python -m bench.plot OUT.png RUN.json [RUN.json ...]``: tokens/s against sequence length
(log-log) for HOPE, Titans, DeltaNet and attention, from the JSON that ``python -m bench`` writes."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

SERIES = {
    ("hope", "nestlearn"): "HOPE (models/hope.yaml), eager",
    ("hope", "nestlearn+graph"): "HOPE, CUDA graph",
    ("hope-c64", "nestlearn"): "HOPE, chunks 64/64, eager",
    ("titans-memory", "nestlearn"): "Titans memory, eager",
    ("titans-memory", "nestlearn+graph"): "Titans memory, CUDA graph",
    ("titans-memory", "titans-pytorch"): "titans-pytorch",
    ("deltanet", "nestlearn"): "DeltaNet spec, PyTorch",
    ("deltanet", "nestlearn+fla"): "DeltaNet spec, fla backend",
    ("deltanet-kernel", "fla"): "fla chunk_delta_rule",
    ("gpt", "nestlearn"): "GPT 4x512 (SDPA)",
    ("sdpa", "torch"): "SDPA attention alone",
}


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, files = argv[0], argv[1:]
    points: dict[str, dict[int, float]] = defaultdict(dict)
    for f in files:
        for r in json.load(open(f))["rows"]:
            label = SERIES.get((r["name"], r["impl"]))
            if label and r.get("status") == "ok":
                points[label][r["seq"]] = max(points[label].get(r["seq"], 0.0), r["tokens_per_s"])
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors[: len(SERIES)])
    for label in SERIES.values():
        if label in points:
            xs = sorted(points[label])
            ax.plot(xs, [points[label][x] for x in xs], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="tokens/s (fwd+bwd)",
           title="nestlearn on one H200 (bf16; Titans fp32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
