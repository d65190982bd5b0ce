"""Plots of the aggregated rows (matplotlib, headless): per task a bar chart with error bars, and
for length generalisation the metric against the evaluation length."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_plots(agg: list[dict[str, Any]], folder: Path) -> list[str]:
    """PNG files under ``folder``; returns their paths relative to ``folder.parent`` (for results.md).
    Without matplotlib: no plots (said by the caller), never an error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for t in agg:
        rows = [r for r in t["rows"] if r.get("value") is not None or r.get("forgetting")]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if t["kind"] == "continual":
            domains = list(dict.fromkeys(d for r in rows for d in r.get("forgetting", {})))
            w = 0.8 / max(len(domains), 1)
            for j, d in enumerate(domains):
                vals = [r["forgetting"].get(d) or {"mean": 0.0, "std": 0.0} for r in rows]
                ax.bar([i + j * w for i in range(len(rows))], [v["mean"] for v in vals], w,
                       yerr=[v["std"] for v in vals], capsize=3, label=d)
            ax.set_xticks([i + w * (len(domains) - 1) / 2 for i in range(len(rows))], [r["spec"] for r in rows])
            ax.set_ylabel("forgetting (%)")
            ax.legend(fontsize=8)
        else:
            vals = [r["value"] or {"mean": 0.0, "std": 0.0} for r in rows]
            ax.bar(range(len(rows)), [v["mean"] for v in vals], yerr=[v["std"] for v in vals], capsize=4)
            ax.set_xticks(range(len(rows)), [r["spec"] for r in rows])
            ax.set_ylabel(t["metric"])
        ax.set_title(f"{t['task']} (mean ± std over seeds)")
        fig.tight_layout()
        path = folder / f"{t['task']}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path.relative_to(folder.parent)))
        if t["eval_lengths"]:
            written += _length_plot(plt, t, rows, folder)
    return written


def _length_plot(plt: Any, t: dict[str, Any], rows: list[dict[str, Any]], folder: Path) -> list[str]:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    factors = sorted({1, *t["eval_lengths"]})
    for r in rows:
        pts = []
        for f in factors:
            v = r["value"] if f == 1 and str(f) not in r["lengths"] else r["lengths"].get(str(f))
            if v is not None:
                pts.append((f * t["seq_len"], v["mean"], v["std"]))
        if pts:
            xs, ms, ss = zip(*pts, strict=True)
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=r["spec"])
    ax.set_xscale("log", base=2)
    ticks = [f * t["seq_len"] for f in factors]
    ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel(f"evaluation length (trained at {t['seq_len']})")
    ax.set_ylabel(t["metric"])
    ax.set_title(f"{t['task']}: length generalisation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / f"{t['task']}-lengths.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [str(path.relative_to(folder.parent))]
