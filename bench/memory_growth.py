"""``python -m bench.memory_growth SPEC [--steps N] [--every K] [--device cuda] [--cuda-graph] ...``:
does a training run's memory grow with its steps?

Trains SPEC with the ordinary ``Trainer`` (the health benchmark's settings: 8 x 2,048 bytes at its
shipped size unless told) and prints, every K optimizer steps, the memory in use then: on CUDA
``memory_allocated`` and ``memory_reserved``, on the CPU the process's resident set. On CUDA also
the peak allocated since the record before, so an interval holding an evaluation or a stats step
shows what it added. A run whose figure climbs step after step keeps something per step alive (a
leak); a flat one does not. The last line is the growth per 100 steps between the first and last
record after the warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.run import positive_int


def resident_bytes() -> int:
    """The process's resident set (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def live_at_peak(trace: list[dict[str, Any]]) -> tuple[int, dict[int, dict[str, Any]]]:
    """Replay one device's allocation trace (``torch.cuda.memory._snapshot()["device_traces"][i]``):
    the most bytes ever allocated at once and the allocations alive at that moment."""
    def replay(stop: int | None) -> tuple[int, int, dict[int, dict[str, Any]]]:
        live: dict[int, dict[str, Any]] = {}
        cur = peak = peak_at = 0
        for i, ev in enumerate(trace[:stop]):
            if ev["action"] == "alloc":
                live[ev["addr"]] = ev
                cur += ev["size"]
            elif ev["action"] == "free_completed" and ev["addr"] in live:
                cur -= live.pop(ev["addr"])["size"]
            if cur > peak:
                peak, peak_at = cur, i + 1
        return peak, peak_at, live

    peak, peak_at, _ = replay(None)
    return peak, replay(peak_at)[2]


def where(ev: dict[str, Any]) -> str:
    """The innermost frame of an allocation inside nestlearn (else the innermost of all)."""
    frames = ev.get("frames") or []
    ours = [f for f in frames if "nestlearn" in f.get("filename", "")]
    f = (ours or frames or [{}])[0]
    return f"{Path(f.get('filename', '?')).name}:{f.get('line', '?')} {f.get('name', '?')}"


def top_sites(live: dict[int, dict[str, Any]], n: int = 12) -> list[tuple[int, str]]:
    """The ``n`` code sites holding the most bytes among ``live`` allocations."""
    by: dict[str, int] = {}
    for ev in live.values():
        site = where(ev)
        by[site] = by.get(site, 0) + ev["size"]
    return sorted(((b, s) for s, b in by.items()), reverse=True)[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory_growth", description=__doc__.split("\n\n")[0])
    p.add_argument("spec")
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--every", type=positive_int, default=25)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=2048)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--cuda-graph", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--log-every", type=positive_int, default=1,
                   help="the trainer's log interval (1, as bench.health trains: every step a log step)")
    p.add_argument("--snapshot", default=None, metavar="FILE",
                   help="CUDA: record every allocation's stack and write torch's memory snapshot to FILE at the end "
                        "(open it at https://pytorch.org/memory_viz)")
    p.add_argument("--seconds", type=float, default=None,
                   help="stop at this much training time, with an evaluation and a checkpoint (as bench.health)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import nestlearn
    from nestlearn.spec.errors import SpecError
    from nestlearn.train.config import TrainConfig
    from nestlearn.train.errors import TrainError
    from nestlearn.train.loop import Trainer

    try:
        spec = nestlearn.load_spec(a.spec, overrides=a.set, profile=None)
    except SpecError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    cfg = TrainConfig(steps=a.steps, batch=a.batch, seq_len=a.seq_len, device=a.device, cuda_graph=a.cuda_graph,
                      compile=a.compile, eval_every=a.eval_every or a.steps, log_every=a.log_every,
                      threads=a.threads or None, ckpt_every=a.steps, time_limit=a.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(spec, cfg, Path(tmp) / "run")
        cuda = a.device != "cpu" and torch.cuda.is_available()
        if cuda and a.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        records: list[tuple[int, int, int]] = []
        count = [0]

        def record(*_: Any) -> None:
            count[0] += 1
            if count[0] % a.every == 0:
                if cuda:
                    torch.cuda.synchronize()
                    now = (count[0], torch.cuda.memory_allocated(), torch.cuda.memory_reserved())
                    peak = torch.cuda.max_memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    now = (count[0], resident_bytes(), 0)
                records.append(now)
                print(f"step {now[0]:6d}  {'allocated' if cuda else 'resident'} {now[1] / 1e9:8.3f} GB"
                      + (f"  reserved {now[2] / 1e9:8.3f} GB  peak since last {peak / 1e9:8.3f} GB" if cuda else ""),
                      flush=True)

        # global: the trainer builds its optimizer inside fit()
        hook = register_optimizer_step_post_hook(record)
        try:
            trainer.fit()
        except TrainError as err:
            print(f"stopped: {str(err).splitlines()[0]}")
        finally:
            hook.remove()
        if cuda and a.snapshot:
            torch.cuda.memory._dump_snapshot(a.snapshot)
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            print(f"memory snapshot: {a.snapshot}")
            for trace in snap["device_traces"]:
                if trace:
                    peak, live = live_at_peak(trace)
                    print(f"at the recorded peak, {peak / 1e9:.3f} GB allocated; the sites holding most of it:")
                    for size, site in top_sites(live):
                        print(f"  {size / 1e9:8.3f} GB  {site}")
        if cuda:  # what the last step's evaluation and checkpoint added (after the last record)
            print(f"after the last record (final evaluation, checkpoint): allocated "
                  f"{torch.cuda.memory_allocated() / 1e9:.3f} GB, peak {torch.cuda.max_memory_allocated() / 1e9:.3f} GB")
    if len(records) >= 3:
        (s0, m0, _), (s1, m1, _) = records[1], records[-1]
        print(f"growth: {(m1 - m0) / 1e6 / (s1 - s0) * 100:+.1f} MB per 100 steps (steps {s0}-{s1})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
