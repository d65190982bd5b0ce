"""Training health: train every shipped language-model spec at its own size on the default
corpus for the same steps and tokens, and print one row each: bits/byte on held-out text, the
mean training bits/byte of the last 50 steps (the same batches for every spec of a seed), the
largest outer gradient norm (before clipping), end-to-end tokens/s and peak GPU memory.

    python -m bench.health --device cuda --steps 300 --batch 8 --seq-len 2048 --cuda-graph
    python -m bench.health --device cpu --steps 20 --batch 2 --seq-len 2048 --set model.dim=64 --set model.depth=2

Every run is an ordinary ``nestlearn run`` (``Trainer``) into ``--out/<spec>``, one process per
spec (so one spec's CUDA-graph pools and peak memory never reach the next one's row);
``--resume`` skips the specs whose row is already in ``--out/health.json``. ``--seconds S`` stops each
run at S seconds of training with an evaluation, so a device lease still gives every row its
bits/byte (at the step it reached; the learning-rate schedule stays that of ``--steps``), and
``--resume`` continues such a row from its checkpoint: one command, repeated, spreads a long run
over several leases (on a machine that keeps ``--out``). ``--jobs N`` trains up
to N specs at once (to fit more runs into a device lease): bits/byte and gradient norms are
unaffected, but the rows' tokens/s are then shared-device figures, and the table says so.
A diverged run gets its row with the step it stopped at. The table goes to stdout last (markdown).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.run import positive_int

SPECS = (
    "specs/transformer.yaml", "specs/deltanet.yaml", "specs/gated-deltanet.yaml", "specs/titans-lmm.yaml",
    "specs/titans-mal.yaml", "specs/titans-mag.yaml", "specs/titans-mac.yaml", "specs/ttt-linear.yaml",
    "specs/ttt-mlp.yaml", "models/hope.yaml",
)
"""The shipped language-model specs, in the order of the table (the Transformer first: the
reference for the gradient-norm ratio)."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.health", description=__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="*", help="spec files (default: every shipped LM spec)")
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=2048)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--cuda-graph", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--wavefront", type=positive_int, default=None, metavar="TOKENS",
                   help="run the blocks as a wavefront over segments of TOKENS (nestlearn run --wavefront)")
    p.add_argument("--tf32", action="store_true", help="fp32 products on TF32 tensor cores (nestlearn run --tf32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batches", type=positive_int, default=8)
    p.add_argument("--eval-every", type=positive_int, default=None,
                   help="also evaluate every N steps (default: at the end only); a run cut short keeps them")
    p.add_argument("--jobs", type=positive_int, default=1, help="train up to N specs at once (shared device)")
    p.add_argument("--seconds", type=float, default=None,
                   help="stop each run at this much training time with an evaluation (the schedule stays --steps')")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every spec")
    p.add_argument("--out", default="runs/health", help="run directories and health.json go here")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in OUT/health.json; continue those stopped by --seconds")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: train one spec, write its row here
    return p.parse_args(argv)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def trained_tokens(run_dir: Path) -> int:
    """Tokens the run in ``run_dir`` has trained on so far (0 for none): where a resumed run starts."""
    train = [r for r in read_metrics(run_dir) if r.get("split") == "train"]
    return int(train[-1].get("tokens") or 0) if train else 0


TRAIN_WINDOW = 50
"""Steps of the training-loss column: the last this many of a run."""


def train_tail(train: list[dict[str, Any]]) -> tuple[float | None, list[int] | None]:
    """Mean training bits/byte over the run's last ``TRAIN_WINDOW`` steps and their first and last
    step. The trainer draws batch k of a seed identically for every spec, so runs of one seed
    that reached the same step compare here on the same bytes: less noise than the held-out
    evaluation, whose few batches differ by seed."""
    tail = [(r["step"], r["bits_per_byte"]) for r in train[-TRAIN_WINDOW:]
            if isinstance(r.get("bits_per_byte"), (int, float)) and math.isfinite(r["bits_per_byte"])]
    if not tail:
        return None, None
    return sum(b for _, b in tail) / len(tail), [tail[0][0], tail[-1][0]]


def summarise(name: str, run_dir: Path, wall: float, peak_gb: float | None, error: str | None,
              params: int | None, tokens_before: int = 0) -> dict[str, Any]:
    """One row from the run's metrics; tokens/s counts the tokens trained since ``tokens_before``
    over ``wall`` (this process's part of a resumed run)."""
    rows = read_metrics(run_dir)
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    gnorms = [r["grad_norm"] for r in train if isinstance(r.get("grad_norm"), (int, float))]
    finite = [g for g in gnorms if math.isfinite(g)]
    last_val = val[-1] if val else {}
    bpb = last_val.get("bits_per_byte")
    tokens = train[-1].get("tokens") if train else None
    train_bpb, window = train_tail(train)
    gain = largest_chunk_gain(train)
    return {
        "spec": name, "params": params, "steps": train[-1]["step"] if train else 0,
        "bits_per_byte": bpb, "train_bits_per_byte": train_bpb, "train_window": window,
        "max_grad_norm": max(finite) if finite else None,
        "median_grad_norm": sorted(finite)[len(finite) // 2] if finite else None,
        "nonfinite_grad_steps": len(gnorms) - len(finite),
        "tokens": tokens, "tokens_per_s": ((tokens - tokens_before) / wall) if tokens and wall > 0 else None,
        "peak_gb": peak_gb, "error": error,
        "max_chunk_gain": gain,
    }


def largest_chunk_gain(train: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The largest per-level chunk gain the run recorded (``nestlearn/loops/stats.py``; at
    its log steps, graphed runs at their evaluations): ``{"level", "gain", "step"}``."""
    best: dict[str, Any] | None = None
    for r in train:
        for level, vals in (r.get("levels") or {}).items():
            g = vals.get("chunk_gain") if isinstance(vals, dict) else None
            if isinstance(g, (int, float)) and math.isfinite(g) and (best is None or g > best["gain"]):
                best = {"level": level, "gain": g, "step": r.get("step")}
    return best


def run_one(path: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch

    import nestlearn
    from nestlearn.spec.errors import SpecError
    from nestlearn.train.config import TrainConfig
    from nestlearn.train.errors import TrainError
    from nestlearn.train.loop import Trainer

    name = Path(path).stem
    run_dir = out / name
    spec = nestlearn.load_spec(path, overrides=args.set, profile=None)
    params = sum(p.numel() for p in nestlearn.compile(spec).parameters())
    cfg = TrainConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, device=args.device,
                      precision=args.precision, cuda_graph=args.cuda_graph, compile=args.compile, seed=args.seed,
                      wavefront=args.wavefront, tf32=args.tf32,
                      eval_every=args.eval_every or args.steps, eval_batches=args.eval_batches, log_every=1, threads=args.threads,
                      ckpt_every=args.steps, time_limit=args.seconds)
    resume = args.resume and (run_dir / "checkpoints" / "last.safetensors").exists()
    before = trained_tokens(run_dir) if resume else 0
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    error = None
    status = None
    summary: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        summary = Trainer(spec, cfg, run_dir, resume=resume).fit()
        status = summary.get("status")
    except (TrainError, SpecError, RuntimeError) as exc:  # a diverged or failed run still gets its row
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    row = summarise(name, run_dir, wall, peak, error, params, before)
    if status == "stopped":  # --seconds: evaluated where it stopped, short of --steps
        row["stopped_early"] = True
    if summary.get("dead_since") is not None:  # finished with a zero gradient from this step on
        row["dead_since"] = summary["dead_since"]
    return row


def child_argv(path: str, args: argparse.Namespace, row: Path) -> list[str]:
    """The command that trains ``path`` alone in a fresh process and writes its row to ``row``."""
    argv = [sys.executable, "-m", "bench.health", path, "--row", str(row), "--out", args.out,
            "--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
            "--device", args.device, "--precision", args.precision, "--seed", str(args.seed),
            "--eval-batches", str(args.eval_batches)]
    argv += ["--eval-every", str(args.eval_every)] if args.eval_every else []
    argv += ["--seconds", str(args.seconds)] if args.seconds else []
    argv += ["--resume"] * args.resume
    argv += ["--cuda-graph"] * args.cuda_graph + ["--compile"] * args.compile
    argv += ["--wavefront", str(args.wavefront)] if args.wavefront else []
    argv += ["--tf32"] * args.tf32
    argv += ["--threads", str(args.threads)] if args.threads else []
    for kv in args.set:
        argv += ["--set", kv]
    return argv


def start_isolated(path: str, args: argparse.Namespace, out: Path) -> subprocess.Popen[bytes]:
    row = out / f".{Path(path).stem}.row.json"
    row.unlink(missing_ok=True)
    return subprocess.Popen(child_argv(path, args, row))


def collect(path: str, proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    row = out / f".{Path(path).stem}.row.json"
    if row.exists():
        return json.loads(row.read_text())  # type: ignore[no-any-return]
    run_dir = out / Path(path).stem  # the process died (a crash, the OOM killer): the row from its metrics
    return summarise(Path(path).stem, run_dir, 0.0, None, f"the training process exited with {proc.returncode}", None)


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]]) -> str:
    ref = next((r for r in rows if r["spec"] == "transformer"), None)
    ref_g = ref["median_grad_norm"] if ref else None
    lines = ["| spec | params | steps | bits/byte | train bits/byte (steps) | max grad norm | x Transformer (median) "
             "| tokens/s | peak GB | note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        ratio = r["median_grad_norm"] / ref_g if ref_g and r["median_grad_norm"] else None
        note = r["error"] or (f"{r['nonfinite_grad_steps']} non-finite steps" if r["nonfinite_grad_steps"] else "")
        if r.get("dead_since"):
            note = "; ".join(x for x in (note, f"dead (zero gradient) from step {r['dead_since']}") if x)
        if r.get("stopped_early"):
            note = "; ".join(x for x in (note, f"stopped by --seconds at step {r['steps']}") if x)
        gain = r.get("max_chunk_gain")
        if gain and gain["gain"] > 1:  # past the chunk-step bound (docs/training-health.md §7)
            note = "; ".join(x for x in (note, f"chunk gain {gain['gain']:.2f} > 1 at {gain['level']} "
                                               f"(step {gain['step']})") if x)
        if r.get("shared_device"):
            note = "; ".join(x for x in (note, f"tokens/s with {r['shared_device']} runs sharing the device") if x)
        window = r.get("train_window")
        train = f"{_fmt(r.get('train_bits_per_byte'), '.3f')} ({window[0]}-{window[1]})" if window else "-"
        lines.append(f"| {r['spec']} | {_fmt(r['params'], ',')} | {r['steps']} | {_fmt(r['bits_per_byte'], '.3f')} | "
                     f"{train} | {_fmt(r['max_grad_norm'], '.3g')} | {_fmt(ratio, '.2f')} | {_fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{_fmt(r['peak_gb'], '.1f')} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.row is not None:  # the child: one spec, its row to a file
        (path,) = args.specs
        Path(args.row).write_text(json.dumps(run_one(path, args, out)))
        return 0
    store = out / "health.json"
    done: dict[str, dict[str, Any]] = {}
    if args.resume and store.exists():
        done = {r["spec"]: r for r in json.loads(store.read_text())["rows"]}
    specs = args.specs or list(SPECS)
    missing = [p for p in specs if not Path(p).exists()]
    if missing:
        print(f"error: no spec file {missing[0]}", file=sys.stderr)
        return 2
    # a row stopped by --seconds is not finished: --resume continues it from its checkpoint
    todo = [(i, p) for i, p in enumerate(specs, 1) if Path(p).stem not in done or done[Path(p).stem].get("stopped_early")]
    running: list[tuple[int, str, subprocess.Popen[bytes]]] = []
    # the most runs that shared the device during each run's life (its tokens/s depends on it)
    sharing: dict[str, int] = {}
    while todo or running:
        while todo and len(running) < args.jobs:
            i, path = todo.pop(0)
            print(f"[{i}/{len(specs)}] {Path(path).stem} ...", file=sys.stderr, flush=True)
            running.append((i, path, start_isolated(path, args, out)))
        for _, path, _ in running:
            sharing[path] = max(sharing.get(path, 1), len(running))
        finished = [r for r in running if r[2].poll() is not None]
        if not finished:
            time.sleep(0.5)
            continue
        for i, path, proc in finished:
            running.remove((i, path, proc))
            name = Path(path).stem
            done[name] = collect(path, proc, out)
            if sharing.get(path, 1) > 1:
                done[name]["shared_device"] = sharing[path]
            print(f"[{i}/{len(specs)}] {name}: {json.dumps(done[name])}", file=sys.stderr, flush=True)
            tmp = store.with_suffix(".tmp")
            tmp.write_text(json.dumps({"args": vars(args), "rows": list(done.values())}, indent=1))
            os.replace(tmp, store)
    rows = [done[Path(p).stem] for p in specs if Path(p).stem in done]
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
