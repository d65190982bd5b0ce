"""``python -m bench [--device cuda|cpu] [--small] [--only NAME,...] [--out FILE]``.

Times forward+backward of the compiled specs and, in the same process, the peers that are
importable (titans-pytorch, fla, torch SDPA, kmccleary3301 nested-learning's HOPEModel); prints one
table and the targets/crossover report (bench/report.py) and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch

from bench.report import report
from bench.run import cases, time_case


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small sizes (CPU smoke run, < 1 min)")
    ap.add_argument("--only", default="", help="comma-separated case names or impls")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of timed work per case at most")
    ap.add_argument("--skip-after", type=float, default=20.0,
                    help="skip a family's longer sequences once one iteration takes this many seconds")
    ap.add_argument("--chunks", default="", help="comma-separated chunk sizes: extra rows of the bare delta rule")
    ap.add_argument("--seqs", default="", help="comma-separated batch-1 lengths of the gpt/sdpa/stack/HOPE rows")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
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
    only = {s for s in a.only.split(",") if s} or None
    rows = []
    slow: dict[tuple[str, str], float] = {}
    t_all = time.time()
    ints = lambda s: tuple(int(n) for n in s.split(",") if n)  # noqa: E731
    for c in cases(dev, a.small, only, ints(a.chunks), ints(a.seqs)):
        key = (c.name, c.impl)
        if key in slow:
            rows.append({"name": c.name, "impl": c.impl, "batch": c.batch, "seq": c.seq, "dtype": c.dtype,
                         "status": "skipped", "note": f"{slow[key]:.1f} s/iter at a shorter length"})
        else:
            rows.append(time_case(c, dev, a.warmup, a.reps, a.budget))
            r = rows[-1]
            if r.get("status") == "ok" and r["s_per_iter"] > a.skip_after or r.get("status") == "OOM":
                slow[key] = r.get("s_per_iter", float("nan"))
        _print_row(rows[-1])
        if a.out:  # written after every row, so a run cut short keeps what it measured
            with open(a.out, "w") as f:
                json.dump({"meta": {"partial": True}, "rows": rows}, f, indent=1)
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
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "rows": rows, "report": targets}, f, indent=1)
    return 0


def _print_row(r: dict) -> None:
    tps = f"{r['tokens_per_s']:.4g}" if r.get("status") == "ok" else r.get("status")
    print(f"  {r['name']:<16} {r['impl']:<19} {r['batch']}x{r['seq']:<6} {r['dtype']:<5} {tps} "
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
