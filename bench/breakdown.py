"""``python -m bench.breakdown [SPEC] [--seq T] [--batch B] [--device cuda|cpu] [--compile] [--set k=v ...]``:
where one block's forward+backward time goes, op by op.

The first block's inputs are recorded from a real forward of the embedded tokens; then each op of
that block is timed alone (forward, a squared-mean loss, backward into its parameters and
inputs): eager, and on CUDA also replayed from a CUDA graph. Each row says how many sequential
inner steps the op runs (its level's period, and the self-modifying op's generator period), so
the time per step -- the quantity a fused kernel would cut -- is printed next to it. The sum over
the ops times the depth is compared with the whole model's step, timed the same way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import nestlearn
from bench.run import graphed, positive_int, seconds_of, trainer_precision
from nestlearn.compile.basic import Op
from nestlearn.compile.model import Block
from nestlearn.compile.selfmod import SelfModOp

SPEC = Path(__file__).resolve().parent.parent / "models" / "hope.yaml"


def timed(step: Callable[[], Any], dev: torch.device, reps: int) -> float:
    """Median seconds of ``step`` after one warm-up call (CUDA events on a GPU)."""
    step()
    times = [seconds_of(step, dev) for _ in range(reps)]
    return statistics.median(times)


def sequential_steps(op: torch.nn.Module, seq: int) -> str:
    """The op's sequential inner steps over ``seq`` tokens (``main+generators`` for selfmod)."""
    level = getattr(op, "level", None)
    if level is None:
        return "-"
    period = level.period
    if not isinstance(period, int):
        return "-"
    steps = f"{-(-seq // period)}"
    if isinstance(op, SelfModOp):  # the self-modifying op's generators (their period defaults to the level's)
        steps += f"+{-(-seq // (op.gen_period or period))}"
    return steps


def op_step(op: torch.nn.Module, xs: list[Tensor], src: dict[str, Tensor]) -> Callable[[], None]:
    """Forward + backward of one op on fixed inputs (gradients into its parameters and inputs)."""
    leaves = [t.detach().requires_grad_() for t in xs]
    srcs = {k: v.detach().requires_grad_() for k, v in src.items()}
    params = [p for p in op.parameters() if p.requires_grad]

    def step() -> None:
        for t in [*params, *leaves, *srcs.values()]:
            t.grad = None
        y, _ = op(leaves, srcs, None)
        y.float().square().mean().backward()

    return step


def _fail(message: str) -> int:
    """A user's mistake: one ``error:`` line on stderr and exit code 2 (as argparse does)."""
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from nestlearn.spec.errors import SpecError

    ap = argparse.ArgumentParser(prog="python -m bench.breakdown", description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", nargs="?", default=str(SPEC))
    ap.add_argument("--seq", type=positive_int, default=2048)
    ap.add_argument("--batch", type=positive_int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                    help="bf16: fp32 weights under bf16 autocast, as nestlearn run trains (default: bf16 on CUDA, "
                         "fp32 on CPU)")
    ap.add_argument("--reps", type=positive_int, default=3)
    ap.add_argument("--no-graph", action="store_true", help="CUDA: eager rows only")
    ap.add_argument("--compile", action="store_true",
                    help="compile the levels' chunk steps (what nestlearn run --compile does to them)")
    ap.add_argument("--set", nargs="*", default=[], help="spec overrides (key=value), e.g. model.dim=128")
    ap.add_argument("--wavefront", type=positive_int, nargs="*", default=[], metavar="TOKENS",
                    help="also time the whole model as a wavefront over segments of TOKENS (one row each)")
    a = ap.parse_args(argv)
    try:
        dev = torch.device(a.device)
    except RuntimeError:
        return _fail(f"--device: expected cpu, cuda or cuda:N, got {a.device!r}")
    if dev.type not in ("cpu", "cuda"):
        return _fail(f"--device: expected cpu, cuda or cuda:N, got {a.device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        return _fail("CUDA is not available; use --device cpu")
    bf16 = (a.dtype or ("bf16" if dev.type == "cuda" else "fp32")) == "bf16"
    dtype = "bf16 autocast, fp32 weights" if bf16 else "fp32"
    torch.manual_seed(0)
    try:
        model = nestlearn.compile(a.spec, a.set)
    except SpecError as err:  # a missing file, a bad override, an invalid spec: its first issue
        return _fail(str(err).splitlines()[0] if str(err) else f"{a.spec}: invalid spec")
    except OSError as err:
        return _fail(f"{a.spec}: {err.strerror or err}")
    if model.embed is None:
        return _fail(f"{a.spec}: bench.breakdown needs a token model (model.input: tokens)")
    model.to(dev)  # in place (no rebinding: model.embed stays known not to be None)
    model.compile_chunk_steps(a.compile)
    spec = model.spec
    x = torch.randint(0, spec.model.vocab, (a.batch, a.seq + 1), device=dev)
    inp, tgt = x[:, :-1], x[:, 1:]
    graph = dev.type == "cuda" and not a.no_graph

    def whole() -> None:
        for p in model.parameters():
            p.grad = None
        out = model(inp)[0]
        F.cross_entropy(out.float().flatten(0, 1), tgt.flatten()).backward()

    # the first block's inputs, op by op
    block = model.blocks[0]
    assert isinstance(block, Block)
    with torch.no_grad(), trainer_precision(dev, bf16):
        values: dict[str, Tensor] = {"x": model.embed(inp)}
        rows: list[tuple[str, str, str, Callable[[], None]]] = []
        for i in block.order:
            op = block.ops[i]
            assert isinstance(op, Op)
            xs = [values[j] for j in block.inputs[i]]
            src = {s: values[s] for s in op.sources}
            rows.append((i, type(op).__name__, sequential_steps(op, a.seq), op_step(op, xs, src)))
            try:
                values[i], _ = op(xs, src, None)
            except (RuntimeError, ValueError) as err:  # a model that cannot run this shape
                return _fail(f"op '{i}' ({type(op).__name__}) fails on {a.batch} x {a.seq} tokens: {err}")

    failed: list[str] = []

    def both(bare: Callable[[], None], name: str) -> tuple[float, float | None]:
        def step() -> None:
            with trainer_precision(dev, bf16):
                bare()

        eager = timed(step, dev, a.reps)
        if not graph:
            return eager, None
        try:
            return eager, timed(graphed(lambda: step, warmup=1)(), dev, a.reps)
        except Exception as err:  # noqa: BLE001 - a capture failure marks the row, the table goes on
            failed.append(f"{name}: no graph time ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
            return eager, None

    def fmt(s: float | None) -> str:  # 10 wide either way, so a missing graph time keeps the columns
        return f"{'-':>10}" if s is None else f"{s * 1e3:10.2f}"

    device = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"# {spec.name}: {a.batch} x {a.seq} tokens, {dtype}, {device}, depth {spec.model.depth}; "
          "ms per forward+backward of one op (first block)")
    head = f"{'op':<8} {'type':<12} {'steps':>9} {'eager ms':>10} {'graph ms':>10} {'share':>6} {'us/step':>9}"
    print(head)
    timings = [(i, kind, steps, *both(step, i)) for i, kind, steps, step in rows]
    ref = [g if g is not None else e for *_, e, g in timings]
    total = sum(ref)
    for (i, kind, steps, e, g), r in zip(timings, ref):
        n = sum(int(s) for s in steps.split("+")) if steps != "-" else 0
        per = f"{r / n * 1e6:9.1f}" if n else f"{'-':>9}"
        print(f"{i:<8} {kind:<12} {steps:>9} {fmt(e)} {fmt(g)} {r / total:6.1%} {per}")
    e_sum = sum(t[3] for t in timings)
    g_sum = sum(t[4] for t in timings) if graph and not failed else None  # type: ignore[misc]
    print(f"{'block':<8} {'sum':<12} {'':>9} {fmt(e_sum)} {fmt(g_sum)}")
    whole_e, whole_g = both(whole, "model")
    depth = spec.model.depth
    print(f"{'model':<8} {'whole':<12} {'':>9} {fmt(whole_e)} {fmt(whole_g)}  "
          f"(depth {depth} x block sum: {fmt(depth * e_sum).strip()} / {fmt(depth * g_sum if g_sum else None).strip()} ms)")
    tps = a.batch * a.seq / (whole_g if whole_g is not None else whole_e)
    print(f"whole model: {tps:,.0f} tokens/s ({'graphed' if whole_g is not None else 'eager'})")
    for seg in a.wavefront:  # the same model, its blocks overlapped over segments (compile/wavefront.py)
        model.set_wavefront(seg)
        wave_e, wave_g = both(whole, f"wavefront {seg}")
        wave = wave_g if wave_g is not None else wave_e
        print(f"{'model':<8} {f'wavefront {seg}':<12} {'':>9} {fmt(wave_e)} {fmt(wave_g)}  "
              f"{a.batch * a.seq / wave:,.0f} tokens/s, {(whole_g or whole_e) / wave:.2f}x the block loop")
        model.set_wavefront(None)
    for line in failed:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
