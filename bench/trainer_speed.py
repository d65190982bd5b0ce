"""``nestlearn run``'s steady tokens/s next to the bench's step on the same model (issue 12, item 4).

    python -m bench.trainer_speed                       # GPU: transformer + HOPE, 8 x 2048, --cuda-graph
    python -m bench.trainer_speed --device cpu --set model.dim=32 --set model.heads=2 --seq-len 64 --batch 2

For each spec, in one process: the bench's step on the spec's model, built as the trainer builds
it (fp32 weights, the trainer's autocast, its fused optimizer; the forward + masked cross-entropy
+ backward captured in a CUDA graph and replayed, with ``--compile`` the chunk steps compiled as
``nestlearn run --compile --cuda-graph`` does), timed with CUDA events as forward + backward alone
and as forward + backward + clipping + optimizer step; then the ordinary ``Trainer`` for
``--skip + --steps`` steps (``--cuda-graph``, ``--compile`` for specs with in-context levels,
``--log-every 1`` as the CLI's default, one evaluation and one checkpoint at the end, or
``--ckpt-every`` N within the run) and its steady tokens/s from its own metrics.jsonl: the
``time`` of step ``skip + steps - 2`` minus that of step ``skip`` (compilation and graph capture
are before the window; the last step's extra stats forward, evaluation and checkpoint after it:
a step's time is read once the next step is queued). The table printed last has the ratio
trainer / bench (fwd+bwd+opt); the target is 80%.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.run import graphed, positive_int

DEFAULT_SPECS = ("specs/transformer.yaml", "models/hope.yaml")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.trainer_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="*", default=list(DEFAULT_SPECS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a spec override for every spec (repeatable)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=2048)
    p.add_argument("--steps", type=positive_int, default=40, help="trainer steps after --skip (the window: all but the last 2)")
    p.add_argument("--skip", type=positive_int, default=5, help="trainer steps before the window (capture, compile)")
    p.add_argument("--reps", type=positive_int, default=20, help="bench steps timed")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="auto: for specs with in-context levels on CUDA (HOPE), as the issue's runs")
    p.add_argument("--ckpt-every", type=positive_int, default=None, help="checkpoints within the run (default: at the end)")
    p.add_argument("--log-every", type=positive_int, default=1)
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn: Callable[[], None], reps: int, tokens: int, device: torch.device) -> float:
    """Tokens/s of ``reps`` back-to-back calls (no sync between them; CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    _sync(device)
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        seconds = a.elapsed_time(b) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        seconds = time.perf_counter() - t0
    return tokens * reps / seconds


def bench_step(spec: Any, cfg: Any, device: torch.device, compile_steps: bool, reps: int) -> dict[str, float]:
    """The model's own step, as the trainer builds it, without the trainer around it."""
    from nestlearn.train.build import build_model, build_optimizer, build_task, resolve_precision

    torch.manual_seed(cfg.seed)
    model = build_model(spec).to(device)
    model.compile_chunk_steps(compile_steps)  # type: ignore[operator]
    model.train()
    amp = resolve_precision(cfg.precision, device)
    opt = build_optimizer(model, spec.levels[spec.outer_level].rule, cfg.lr, fused=device.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    batch = build_task(cfg).batch_at(0, cfg.batch, cfg.seq_len, cfg.seed).to(device)
    n_tok = max(float(batch.mask.sum()), 1.0)

    def autocast() -> AbstractContextManager[Any]:
        return nullcontext() if amp is None else torch.autocast(device.type, dtype=amp, cache_enabled=False)

    def fwd_bwd() -> None:
        for p in params:
            p.grad = None
        with autocast():
            logits, _ = model(batch.inputs)
        ce = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none")
        ((ce * batch.mask.flatten()).sum() / n_tok).backward()

    step = graphed(lambda: fwd_bwd)() if cfg.cuda_graph else fwd_bwd

    def full() -> None:
        step()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
        opt.step()

    tokens = cfg.batch * cfg.seq_len
    out = {"fwd_bwd": _rate(step, reps, tokens, device), "fwd_bwd_opt": _rate(full, reps, tokens, device)}
    model.compile_chunk_steps(False)  # type: ignore[operator]
    return out


def trainer_rate(spec: Any, cfg: Any, skip: int, out: Path) -> dict[str, Any]:
    """The ``Trainer``'s steady tokens/s over steps ``skip`` .. ``cfg.steps - 2`` (its metrics.jsonl)."""
    from nestlearn.train import Trainer, read_metrics

    trainer = Trainer(spec, cfg, out)
    summary = trainer.fit()
    times = {r["step"]: r["time"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"}
    last = max(cfg.steps - 2, skip + 1)
    if skip not in times or last not in times:
        raise SystemExit(f"the trainer logged no record at step {skip} or {last}: use --log-every 1")
    steady = (last - skip) * cfg.batch * cfg.seq_len / (times[last] - times[skip])
    return {"steady": steady, "run": summary["tokens_per_s"], "lag": trainer.lag}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    from nestlearn import load_spec
    from nestlearn.train import TrainConfig
    from nestlearn.train.build import build_model, resolve_device
    from nestlearn.train.compiling import inner_loop_ops

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    total = args.skip + args.steps
    rows = []
    for path in args.specs:
        spec = load_spec(path, args.overrides, profile=None)
        in_context = next(inner_loop_ops(build_model(spec)), None) is not None
        compile_ = args.compile == "on" or (args.compile == "auto" and cuda and in_context)
        cfg = TrainConfig(steps=total, batch=args.batch, seq_len=args.seq_len, device="cuda" if cuda else "cpu", cuda_graph=cuda,
                          compile=compile_, eval_every=total, eval_batches=1, ckpt_every=args.ckpt_every or total,
                          log_every=args.log_every, threads=1 if not cuda else None)
        flags = " ".join(f for f, on in (("--cuda-graph", cuda), ("--compile", compile_)) if on)
        print(f"{spec.name}: {args.batch} x {args.seq_len} on {device} {flags}", flush=True)
        bench = bench_step(spec, cfg, device, compile_ and cuda, args.reps)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        print(f"  bench: fwd+bwd {bench['fwd_bwd']:,.0f} tokens/s, fwd+bwd+opt {bench['fwd_bwd_opt']:,.0f}", flush=True)
        run = trainer_rate(spec, cfg, args.skip, Path(tempfile.mkdtemp(prefix="trainer-speed-")))
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        print(f"  trainer: {run['steady']:,.0f} tokens/s steady, {run['run']:,.0f} over the whole run "
              f"(steps read {'a step late' if run['lag'] else 'at once'})", flush=True)
        rows.append({"spec": spec.name, "flags": flags, "device": str(device), "batch": args.batch,
                     "seq_len": args.seq_len, **bench, "trainer": run["steady"], "trainer_run": run["run"], "lag": run["lag"],
                     "ratio": run["steady"] / bench["fwd_bwd_opt"]})
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"\ntrainer vs bench, {args.batch} x {args.seq_len}, {gpu}, {args.steps} steps after {args.skip} "
          "(tokens/s; target: trainer >= 80% of fwd+bwd+opt)")
    head = f"{'spec':<14}{'flags':<26}{'fwd+bwd':>12}{'fwd+bwd+opt':>13}{'trainer':>12}{'whole run':>11}{'ratio':>8}"
    print(head)
    for r in rows:
        print(f"{r['spec']:<14}{r['flags']:<26}{r['fwd_bwd']:>12,.0f}{r['fwd_bwd_opt']:>13,.0f}{r['trainer']:>12,.0f}"
              f"{r['trainer_run']:>11,.0f}{r['ratio']:>8.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
