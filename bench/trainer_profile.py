"""Where does a training step's time go? ``nestlearn run``'s own cost next to the model's.

    python -m bench.trainer_profile specs/transformer.yaml --device cuda --cuda-graph --steps 30
    python -m bench.trainer_profile models/hope.yaml --device cuda --cuda-graph --compile

Runs the ordinary ``Trainer`` under ``torch.profiler`` for ``--steps`` steps, skipping the first
``--skip`` (compilation, graph capture), and prints per step the wall time and, for each named
phase of the step (``nestlearn.data``, ``forward_backward``, ``clip``, ``host_sync``,
``optimizer``, ``record``, ``evaluate``, ``checkpoint``; ``train/step.py::phase``), its host
time. Then the ops with the largest self time on the host and on the device. The step's model
work is ``forward_backward``; the rest is the trainer's. ``--trace FILE`` also writes a Chrome
trace.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from bench.run import positive_int


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.trainer_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=2048)
    p.add_argument("--steps", type=positive_int, default=30, help="profiled steps")
    p.add_argument("--skip", type=positive_int, default=5, help="steps run before profiling (the last one warms the profiler up)")
    p.add_argument("--cuda-graph", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--top", type=positive_int, default=12)
    p.add_argument("--trace", default=None, help="also write a Chrome trace here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    from nestlearn import load_spec
    from nestlearn.train import TrainConfig, Trainer
    from nestlearn.train.step import Queued

    total = args.skip + args.steps
    spec = load_spec(args.spec, args.overrides, profile=None)
    cfg = TrainConfig(steps=total, batch=args.batch, seq_len=args.seq_len, device=args.device,
                      cuda_graph=args.cuda_graph, compile=args.compile, eval_every=total, ckpt_every=total)
    trainer = Trainer(spec, cfg, tempfile.mkdtemp(prefix="trainer-profile-"))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    walls: list[float] = []
    last = [time.perf_counter()]

    prof = profile(activities=activities, schedule=schedule(wait=args.skip - 1, warmup=1, active=args.steps, repeat=1),
                   record_shapes=False)
    plain_step = trainer.train_step

    def stepping(step: int) -> Queued:
        out = plain_step(step)
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step >= args.skip:
            walls.append(now - last[0])
        last[0] = now
        prof.step()
        return out

    trainer.train_step = stepping  # type: ignore[method-assign]
    with prof:
        trainer.fit()
    events = prof.key_averages()
    n = max(len(walls), 1)
    wall_ms = 1e3 * sum(walls) / n
    tokens = args.batch * args.seq_len
    print(f"\n{spec.name}: {n} profiled steps of {args.batch} x {args.seq_len}, "
          f"{'cuda-graph ' if args.cuda_graph else ''}{'compile ' if args.compile else ''}on "
          f"{'cuda' if cuda else 'cpu'}: {wall_ms:.2f} ms a step, {tokens / wall_ms * 1e3:,.0f} tokens/s "
          "(wall clock, synchronized)")
    print(f"{'phase':<28}{'host ms/step':>14}{'share':>8}")
    for e in sorted((e for e in events if e.key.startswith("nestlearn.")), key=lambda e: -e.cpu_time_total):
        ms = e.cpu_time_total / 1e3 / n
        print(f"{e.key:<28}{ms:>14.3f}{ms / wall_ms:>8.0%}")
    print(f"\ntop {args.top} ops by self host time (ms/step)")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        print(f"  {e.key[:60]:<60}{e.self_cpu_time_total / 1e3 / n:>10.3f}  x{e.count / n:.1f}")
    if cuda:
        print(f"\ntop {args.top} ops by self device time (ms/step)")
        for e in sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0))[: args.top]:
            print(f"  {e.key[:60]:<60}{getattr(e, 'self_device_time_total', 0) / 1e3 / n:>10.3f}  x{e.count / n:.1f}")
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
