"""``python -m bench [--device cuda|cpu] [--small] [--only NAME,...] [--out FILE]``.

Times forward+backward of the compiled specs and, in the same process, the peers that are
importable (titans-pytorch, fla, torch SDPA, kmccleary3301 nested-learning's HOPEModel); prints one
table and the targets/crossover report (bench/report.py) and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Any

import torch

from bench.report import report
from bench.run import cases, positive_int, time_case


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small sizes (CPU smoke run, < 1 min)")
    ap.add_argument("--only", default="", help="comma-separated case names, impls or name:impl pairs")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of timed work per case at most")
    ap.add_argument("--skip-after", type=float, default=20.0,
                    help="skip a family's longer sequences once one iteration takes this many seconds")
    ap.add_argument("--chunks", type=_ints, default=(),
                    help="comma-separated chunk sizes: extra rows of the bare delta rule")
    ap.add_argument("--seqs", type=_ints, default=(),
                    help="comma-separated batch-1 lengths of the gpt/sdpa/stack/HOPE rows")
    ap.add_argument("--graph-warmup", type=positive_int, default=3,
                    help="eager calls before a CUDA graph is captured (1 saves minutes on long HOPE rows)")
    ap.add_argument("--out", default="", help="JSON written after every row (atomically)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out and time only the missing ones")
    a = ap.parse_args(argv)
    if a.resume and not a.out:
        ap.error("--resume needs --out (the file whose rows to keep)")
    if a.small:
        a.warmup, a.reps, a.budget = 1, min(a.reps, 3), min(a.budget, 3.0)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    if dev.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    only = {s.strip() for s in a.only.split(",") if s.strip()} or None
    rows: list[dict] = []
    if a.resume and os.path.exists(a.out):
        try:
            with open(a.out) as f:
                rows = list(json.load(f)["rows"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: --resume: cannot read the rows of {a.out} ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
    done = {_key(r) for r in rows}
    slow: dict[tuple[str, str], tuple[int, str]] = {}
    for r in rows:
        _note_slow(r, slow, a.skip_after)
    t_all = time.time()
    selected = cases(dev, a.small, only, a.chunks, a.seqs, a.graph_warmup)
    if only and not selected:  # a typo would otherwise time nothing and exit 0
        print(f"error: --only {a.only}: no row of this run (device {dev.type}{', --small' if a.small else ''}) "
              "is called that; give case names (sdpa, hope, ...), impls (nestlearn, nestlearn+graph, ...) "
              "or name:impl pairs", file=sys.stderr)
        return 2
    todo = [c for c in selected if (c.name, c.impl, c.batch, c.seq) not in done]
    if rows:
        print(f"resuming: {len(rows)} rows kept from {a.out}, {len(todo)} to time", flush=True)
    try:
        for i, c in enumerate(todo, 1):
            reason = _skip_reason(c, slow)
            if reason is not None:
                rows.append({"name": c.name, "impl": c.impl, "batch": c.batch, "seq": c.seq, "dtype": c.dtype,
                             "status": "skipped", "note": f"{reason}; this row has as many tokens or more"})
            else:
                rows.append(time_case(c, dev, a.warmup, a.reps, a.budget))
                _note_slow(rows[-1], slow, a.skip_after)
            _print_row(rows[-1], f"[{i}/{len(todo)}]")
            if a.out:  # after every row, so a run cut short keeps what it measured
                _write(a.out, {"meta": {"partial": True}, "rows": rows})
    except KeyboardInterrupt:
        kept = f"; {len(rows)} rows kept in {a.out}: `--resume` times the rest" if a.out else ""
        print(f"\ninterrupted{kept}", file=sys.stderr)
        return 130
    meta = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv, "seconds": round(time.time() - t_all, 1), "small": a.small,
    }
    print(f"\n# {meta['device']} · torch {meta['torch']} · {meta['date']}")
    print(table(rows))
    targets = report(rows)
    print("\n" + targets)
    if a.out:
        _write(a.out, {"meta": meta, "rows": rows, "report": targets})
    return 0


def _ints(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(n) for n in text.split(",") if n.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if any(n <= 0 for n in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return out


def _key(r: dict) -> tuple[str, str, int, int]:
    return (r["name"], r["impl"], r["batch"], r["seq"])


def _note_slow(r: dict, slow: dict[tuple[str, str], tuple[int, str]], limit: float) -> None:
    """Once a row of a family is this slow (or OOM), its rows of at least as many tokens are
    skipped (``_skip_reason``); smaller ones (batch 1 after a batched OOM) still run."""
    if r.get("status") == "ok" and r["s_per_iter"] > limit or r.get("status") == "OOM":
        tokens = r["batch"] * r["seq"]
        key = (r["name"], r["impl"])
        if key not in slow or tokens < slow[key][0]:
            what = "OOM" if r.get("status") == "OOM" else f"{r['s_per_iter']:.1f} s/iter"
            slow[key] = (tokens, f"{what} at {r['batch']} x {r['seq']}")


def _skip_reason(c: Any, slow: dict[tuple[str, str], tuple[int, str]]) -> str | None:
    """Why ``c`` is skipped, or None where it runs."""
    hit = slow.get((c.name, c.impl))
    return hit[1] if hit is not None and c.batch * c.seq >= hit[0] else None


def _write(path: str, doc: dict) -> None:
    """Atomically: an interrupt never leaves a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def _print_row(r: dict, progress: str = "") -> None:
    tps = f"{r['tokens_per_s']:.4g}" if r.get("status") == "ok" else r.get("status")
    print(f"{progress:>8} {r['name']:<16} {r['impl']:<19} {r['batch']}x{r['seq']:<6} {r['dtype']:<8} {tps} "
          f"{r.get('error', '')}", flush=True)


def table(rows: list[dict]) -> str:
    lines = ["| case | impl | batch x seq | dtype | tokens/s | ms/iter | peak GB | status |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        ok = r.get("status") == "ok"
        tps = f"{r['tokens_per_s'] / 1e3:,.1f}K" if ok else "-"
        ms = f"{r['s_per_iter'] * 1e3:,.1f}" if ok else "-"
        gb = f"{r['peak_gb']:.2f}" if ok and "peak_gb" in r else "-"
        st = r.get("status", "") + (f" ({r['error'][:60]})" if "error" in r else "")
        lines.append(f"| {r['name']} | {r['impl']} | {r['batch']} x {r['seq']} | {r['dtype']} | {tps} | {ms} | "
                     f"{gb} | {st} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
