"""``python -m bench.plot OUT.png RUN.json [RUN.json ...]``: tokens/s against sequence length
(log-log) for HOPE, Titans, DeltaNet and attention, from the JSON that ``python -m bench`` writes."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

SERIES = {
    ("hope", "nestlearn"): "HOPE (models/hope.yaml), eager",
    ("hope", "nestlearn+graph"): "HOPE, CUDA graph",
    ("hope", "nestlearn-compiled-step"): "HOPE, compiled chunk steps",
    ("hope", "nestlearn-compiled-step+graph"): "HOPE, compiled chunk steps + CUDA graph",
    ("hope-c64", "nestlearn+graph"): "HOPE, chunks 64/64, CUDA graph",
    ("hope-c64", "nestlearn-compiled-step+graph"): "HOPE, chunks 64/64, compiled + CUDA graph",
    ("hope", "kmccleary-hope-3cms"): "kmccleary HOPEModel (no online updates)",
    ("titans-memory", "nestlearn"): "Titans memory, eager",
    ("titans-memory", "nestlearn+graph"): "Titans memory, CUDA graph",
    ("titans-memory", "nestlearn-compiled-step+graph"): "Titans memory, compiled + CUDA graph",
    ("titans-memory", "titans-pytorch"): "titans-pytorch",
    ("deltanet", "nestlearn"): "DeltaNet spec, PyTorch",
    ("deltanet", "nestlearn+graph"): "DeltaNet spec, PyTorch, CUDA graph",
    ("deltanet", "nestlearn+fla"): "DeltaNet spec, fla backend",
    ("deltanet-kernel", "fla"): "fla chunk_delta_rule",
    ("gpt", "nestlearn"): "GPT 4x512 (SDPA)",
    ("gpt", "nestlearn+graph"): "GPT 4x512, CUDA graph",
    ("sdpa", "torch"): "SDPA attention alone",
}


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, files = argv[0], argv[1:]
    # per series and length: the smallest batch measured (batch 1 where there is one), then the
    # fastest of the runs given
    picked: dict[str, dict[int, tuple[int, float]]] = defaultdict(dict)
    for f in files:
        for r in json.load(open(f))["rows"]:
            label = SERIES.get((r["name"], r["impl"]))
            if label and r.get("status") == "ok":
                key = (r["batch"], -r["tokens_per_s"])
                old = picked[label].get(r["seq"])
                if old is None or key < (old[0], -old[1]):
                    picked[label][r["seq"]] = (r["batch"], r["tokens_per_s"])
    points = {label: {t: v for t, (_, v) in by_len.items()} for label, by_len in picked.items()}
    fig, ax = plt.subplots(figsize=(11, 5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20")(range(len(SERIES))))  # tab20's first colours, in order
    for label in SERIES.values():
        if label in points:
            xs = sorted(points[label])
            ax.plot(xs, [points[label][x] for x in xs], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="tokens/s (fwd+bwd)",
           title="nestlearn on one H200 (bf16; Titans fp32); batch 1 where measured")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
