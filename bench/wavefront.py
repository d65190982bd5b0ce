"""``python -m bench.wavefront [SPEC ...] [--shapes 8x2048 1x16384] [--segments 256 512] [--device cuda]``:
a whole model's forward + backward with its blocks in a loop and as a wavefront over segments
(``compile/wavefront.py``), timed in one process, eagerly and from a CUDA graph. One table at the
end: tokens/s per (spec, shape, segment) and the ratio to the block loop, plus the largest
difference of the outer gradients from the loop's (the check that the overlap computed the same
thing). Under bf16 (the default on CUDA: fp32 weights, the forward under bf16 autocast, as
``nestlearn run`` trains; until the fifteenth session the weights themselves were bf16, which
sent HOPE's levels to the bf16 closed forms instead of their fp32 kernels) a last column gives
each row's difference from the block loop run in fp32: the wavefront is as accurate as the loop
when its figure is no larger than the loop's own (a reordering moves low-precision gradients by
about their error).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F

import nestlearn
from bench.breakdown import timed
from bench.run import graphed, positive_int, relative_error, trainer_precision

SPECS = ("models/hope.yaml", "specs/titans-mal.yaml")


def shape(text: str) -> tuple[int, int]:
    """``BxT`` -> ``(B, T)``."""
    try:
        b, t = (int(x) for x in text.lower().split("x"))
    except ValueError:
        b = t = 0
    if b <= 0 or t <= 0:
        raise argparse.ArgumentTypeError(f"expected BATCHxTOKENS such as 8x2048, got {text!r}")
    return b, t


Row = tuple[str, str, str, float, float | None, float, float | None]
"""(spec, shape, segment or ``loop``, eager s, graphed s or None, gradient difference from the loop,
difference from the fp32 loop or None)."""



def time_model(model: Any, b: int, t: int, segments: list[int], dev: torch.device, reps: int,
               graph: bool, bf16: bool = False) -> list[Row]:
    """One row per segment (``loop`` first): eager and graphed seconds of a forward + backward,
    and the largest gradient difference from the loop's, relative to that gradient's largest entry
    (and, under ``bf16`` -- fp32 weights, the forward under bf16 autocast, as ``nestlearn run``
    trains -- from the loop's in fp32)."""
    name = model.spec.name
    x = torch.randint(0, model.spec.model.vocab, (b, t + 1), device=dev)

    def step(amp: bool = bf16) -> None:
        for q in model.parameters():
            q.grad = None
        with trainer_precision(dev, amp):
            out = model(x[:, :-1])[0]
            loss = F.cross_entropy(out.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()

    def grads(amp: bool = bf16) -> list[torch.Tensor]:
        step(amp)
        return [q.grad.float().clone() for q in model.parameters() if q.grad is not None]

    rows: list[Row] = []
    model.set_wavefront(None)
    ref32 = grads(amp=False) if bf16 else None  # the loop without autocast
    ref = grads()
    for seg in [None, *segments]:
        model.set_wavefront(seg)
        got = ref if seg is None else grads()
        diff = 0.0 if seg is None else relative_error(got, ref)
        diff32 = None if ref32 is None else relative_error(got, ref32)
        del got
        try:
            eager = timed(step, dev, reps)
            replay = timed(graphed(lambda: step, warmup=1)(), dev, reps) if graph else None
        except torch.OutOfMemoryError:
            print(f"{name} {b}x{t} wavefront {seg}: out of memory", file=sys.stderr)
            torch.cuda.empty_cache()
            continue
        rows.append((name, f"{b}x{t}", "loop" if seg is None else str(seg), eager, replay, diff, diff32))
        print(f"{name} {b}x{t} {rows[-1][2]}: eager {eager * 1e3:.1f} ms"
              + (f", graph {replay * 1e3:.1f} ms" if replay is not None else ""), file=sys.stderr, flush=True)
    model.set_wavefront(None)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.wavefront", description=__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="*", default=list(SPECS))
    p.add_argument("--shapes", type=shape, nargs="+", default=[(8, 2048), (1, 16384)])
    p.add_argument("--segments", type=positive_int, nargs="+", default=[256, 512])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=positive_int, default=3)
    p.add_argument("--no-graph", action="store_true")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16: fp32 weights under bf16 autocast, as nestlearn run trains (auto: bf16 on CUDA, "
                        "fp32 on the CPU)")
    p.add_argument("--set", nargs="*", default=[], help="spec overrides (key=value)")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    graph = dev.type == "cuda" and not a.no_graph
    bf16 = a.dtype == "bf16" or (a.dtype == "auto" and dev.type == "cuda")
    rows: list[Row] = []
    for path in a.specs:
        torch.manual_seed(0)
        try:
            model = nestlearn.compile(path, a.set).to(dev)
        except Exception as err:  # noqa: BLE001 - one line per unusable spec, the table goes on
            print(f"{path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)
            continue
        for b, t in a.shapes:
            rows += time_model(model, b, t, a.segments, dev, a.reps, graph, bf16)
    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    precision = "bf16 autocast, fp32 weights" if bf16 else "fp32"
    print(f"\n# forward + backward, {precision}, {device}; ratio = tokens/s against the block loop's (graph where timed)")
    print(f"{'spec':<12} {'shape':>9} {'segment':>8} {'eager tok/s':>12} {'graph tok/s':>12} {'ratio':>6} {'grad diff':>9}"
          + (f" {'vs fp32':>8}" if bf16 else ""))
    base: dict[tuple[str, str], float] = {}
    for name, shp, seg, eager, replay, diff, diff32 in rows:
        b, t = shape(shp)
        best = replay if replay is not None else eager
        if seg == "loop":
            base[(name, shp)] = best
        ratio = base.get((name, shp), best) / best
        print(f"{name:<12} {shp:>9} {seg:>8} {b * t / eager:>12,.0f} "
              f"{(f'{b * t / replay:,.0f}' if replay is not None else '-'):>12} {ratio:>5.2f}x {diff:>9.1e}"
              + (f" {diff32:>8.1e}" if diff32 is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
