"""The design brief's targets, computed from the bench's rows (batch 1 only; batch 8 rows are not
compared): HOPE (ours) against the GPT of the same width and depth and against kmccleary3301's
HOPEModel, and the length where HOPE's tokens/s overtakes the GPT's."""

from __future__ import annotations

from typing import Any

OURS = ("hope", "hope-c16", "hope-c64", "hope-remat")  # models/hope.yaml and its chunk / remat variants
TARGET_SEQ = 65536
TARGET_VS_PEER = 10.0  # HOPE >= 10x kmccleary's HOPEModel at 65,536 tokens
TARGET_VS_GPT = 3.0  # HOPE >= 3x the GPT (SDPA) at 65,536 tokens


def best(rows: list[dict[str, Any]], names: tuple[str, ...], impl_prefix: str) -> dict[int, tuple[float, str]]:
    """seq -> (best tokens/s, "name impl") over the ok batch-1 rows of these families whose impl
    starts with ``impl_prefix``."""
    out: dict[int, tuple[float, str]] = {}
    for r in rows:
        if (r.get("status") == "ok" and r.get("batch") == 1 and r["name"] in names
                and str(r["impl"]).startswith(impl_prefix)):
            tps = float(r["tokens_per_s"])
            if r["seq"] not in out or tps > out[r["seq"]][0]:
                out[r["seq"]] = (tps, f"{r['name']} {r['impl']}")
    return out


def crossover(hope: dict[int, float], gpt: dict[int, float]) -> tuple[int | None, float | None]:
    """``(first measured length where HOPE >= GPT, None)``; else ``(None, extrapolated length)``:
    GPT's seconds per token fitted as a + b*T through its two longest measured lengths (tokens/s
    falling as 1/T once b*T dominates), HOPE flat at its value at its longest measured length.
    ``(None, None)`` when nothing is comparable or GPT is not slowing down."""
    common = sorted(set(hope) & set(gpt))
    for t in common:
        if hope[t] >= gpt[t]:
            return t, None
    if not hope or len(gpt) < 2:
        return None, None
    t1, t2 = sorted(gpt)[-2:]
    s1, s2 = 1 / gpt[t1], 1 / gpt[t2]
    slope = (s2 - s1) / (t2 - t1)
    if slope <= 0:
        return None, None
    return None, (1 / hope[max(hope)] - (s2 - slope * t2)) / slope


def _k(x: float) -> str:
    return f"{x / 1e3:,.1f}K" if x >= 1e3 else f"{x:.3g}"


def report(rows: list[dict[str, Any]]) -> str:
    hope = best(rows, OURS, "nestlearn")
    gpt = best(rows, ("gpt",), "nestlearn")
    peer = best(rows, ("hope",), "kmccleary-hope")
    lines = ["targets (batch 1; HOPE = best of hope/hope-c16/hope-c64/hope-remat incl. +graph; GPT = best gpt impl; "
             "kmccleary = best kmccleary-hope* row)"]
    if not hope:
        return "\n".join(lines + ["  no HOPE (ours) rows"])
    lines.append(f"  {'seq':>6}  {'HOPE':>9} {'(which)':<22} {'GPT':>9} {'HOPE/GPT':>8}  "
                 f"{'kmccleary':>9} {'HOPE/kmcc':>9}".rstrip())
    for t in sorted(hope):
        h, which = hope[t]
        g = f"{_k(gpt[t][0]):>9} {h / gpt[t][0]:>7.2f}x" if t in gpt else f"{'-':>9} {'-':>8}"
        p = f"{_k(peer[t][0]):>9} {h / peer[t][0]:>8.2f}x" if t in peer else f"{'-':>9} {'-':>9}"
        lines.append(f"  {t:>6}  {_k(h):>9} {which:<22} {g}  {p}")
    if TARGET_SEQ in hope:
        h = hope[TARGET_SEQ][0]
        for label, ref, goal in (("kmccleary", peer, TARGET_VS_PEER), ("GPT", gpt, TARGET_VS_GPT)):
            if TARGET_SEQ in ref:
                r = h / ref[TARGET_SEQ][0]
                lines.append(f"  at {TARGET_SEQ}: HOPE/{label} {r:.2f}x (target >= {goal:g}x: "
                             f"{'met' if r >= goal else 'not met'})")
            else:
                lines.append(f"  at {TARGET_SEQ}: no {label} row")
    else:
        lines.append(f"  at {TARGET_SEQ}: no HOPE row (targets not measured)")
    hv = {t: v for t, (v, _) in hope.items()}
    gv = {t: v for t, (v, _) in gpt.items()}
    measured, extrapolated = crossover(hv, gv)
    common = sorted(set(hv) & set(gv))
    if measured is not None:
        lines.append(f"  crossover (HOPE >= GPT): {measured} tokens (first measured length; "
                     f"measured: {', '.join(map(str, common))})")
    else:
        line = f"  crossover (HOPE >= GPT): none up to {common[-1] if common else max(hv)}"
        if extrapolated is not None:
            t1, t2 = sorted(gv)[-2:]
            line += (f"; extrapolation: ~{extrapolated:,.0f} tokens (assumes GPT's s/token linear in T "
                     f"through {t1} and {t2}, i.e. tokens/s ~ 1/T, and HOPE flat at {_k(hv[max(hv)])}, "
                     f"its value at {max(hv)})")
        else:
            line += "; no extrapolation (GPT measured at fewer than 2 lengths, or not slowing down)"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report RUN.json...``: the targets over the rows of several runs (e.g. the
    GPT and HOPE rows timed by separate ``python -m bench --only ...`` calls on one machine)."""
    import json
    import sys

    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m bench.report RUN.json [RUN.json ...]", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    for p in paths:
        try:
            with open(p) as f:
                rows += json.load(f)["rows"]
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {p}: {e}", file=sys.stderr)
            return 2
    print(report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
