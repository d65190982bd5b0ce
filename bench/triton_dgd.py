"""``python -m bench.triton_dgd [--batch 8] [--seq 2048] [--heads 8] [--dim-head 64] [--chunk 16]
[--reps 20] [--no-graph] [--train]``: the fused DGD kernel (``nestlearn/loops/triton/dgd_mlp.py``) against
the closed form it replaces (``loops/dgd_dual.py``), forward (and with ``--train`` forward + backward), at HOPE's self-modifying
memory's size (8 heads of 64, chunk 16; ``models/hope.yaml``) on CUDA.

Rows: the kernel in fp32 (``ieee``, what the executor runs), in 3xTF32 (tensor cores, near-fp32:
a candidate default) and in TF32 (for scale, not exact);
``run_dgd_dual`` eagerly and with its chunk steps through ``torch.compile`` (``nestlearn run
--compile``), each also replayed from a CUDA graph (``--cuda-graph``; ``--no-graph`` skips).
Median of ``--reps`` CUDA-event timings after warm-up; tokens/s counts ``batch x seq``; the
last column is the largest error against eager ``run_dgd_dual``, relative to the largest output.

``--model`` adds ``models/hope.yaml``'s whole no-grad forward with and without the kernel.
``--train`` adds (printed last) forward + backward -- a loss on the outputs and the carried
weights, ``autograd.grad`` to q, k, v, lr, decay and the initial weights -- of the kernel's
``DGDMLPFunction`` (backward recomputed through ``dgd_dual`` from checkpoints every
``--save-every`` chunks; 1 and the default as rows, and the default with the recompute's chunk
steps through torch.compile; and the fused Triton backward, ``dgd_mlp_bwd.py``, checkpoints
every chunk) against ``run_dgd_dual`` eager and compiled
(``grad: unroll``), with each row's peak memory and largest gradient error against eager.
``--ptxas`` needs no GPU: it compiles the kernel for sm_90 and prints registers and spills per
``num_warps`` (with ``dgd_mlp.launch_options``' register cap) and precision. ptxas reports
spills at every setting for D = 64 on Triton 3.9: the four 64 x 64 fp32 state matrices plus the
fp32 dots' operands do not fit the register file.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch

from bench.run import relative_error
from nestlearn import objectives, rules
from nestlearn.loops.common import GradMode, MemoryProblem, MemoryState
from nestlearn.loops.dgd_dual import run_dgd_dual
from nestlearn.memories import MLPMemory


def hope_inputs(b: int, h: int, t: int, d: int, dev: str) -> dict[str, Any]:
    """HOPE-like inputs: unit q / k, lr = 0.002 sigmoid(.), decay = 0.1 sigmoid(. - 6), beta 0.9."""
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=dev)

    q, k = (torch.nn.functional.normalize(rnd(b, h, t, d), dim=-1) for _ in range(2))
    return {
        "q": q, "k": k, "v": rnd(b, h, t, d),
        "lr": 0.002 * torch.sigmoid(rnd(b, h, t)), "decay": 0.1 * torch.sigmoid(rnd(b, h, t) - 6),
        "beta": torch.full((1, 1, 1), 0.9, device=dev).expand(b, h, t),
        "weights": tuple((rnd(1, h, d, d) / d**0.5).expand(b, h, d, d) for _ in range(2)),
        "momenta": tuple(torch.zeros(b, h, d, d, device=dev) for _ in range(2)),
    }


def dual_fn(x: dict[str, Any], chunk: int, compiled: bool) -> Callable[[], torch.Tensor]:
    h, d = x["q"].shape[1], x["q"].shape[3]
    arch = MLPMemory(d, d, h, expand=1, depth=2, act="gelu", residual=True, bias=False)
    pb = MemoryProblem(arch, rules.dgd(0.0, 0.0, 0.0), objectives.l2, x["q"], x["k"], x["v"],
                       {"lr": x["lr"], "decay": x["decay"], "beta": 0.9}, chunk, GradMode("unroll"),
                       clip=1.0, compiled=compiled)
    p = {"W0": x["weights"][0], "W1": x["weights"][1]}
    st = MemoryState(params=p, opt={"m": {"W0": x["momenta"][0], "W1": x["momenta"][1]}}, anchor=p,
                     offset=0, chunks=0)
    return lambda: run_dgd_dual(pb, st)[0]


def kernel_fn(x: dict[str, Any], chunk: int, precision: str, **launch: Any) -> Callable[[], torch.Tensor]:
    from nestlearn.loops.triton.dgd_mlp import dgd_mlp_fwd

    return lambda: dgd_mlp_fwd(**x, chunk=chunk, clip=1.0, precision=precision, **launch).y


def grad_leaves(x: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``hope_inputs``' q, k, v, lr, decay and initial weights (one ``[1, H, D, D]`` leaf each,
    expanded over the batch as ``init_state`` shares it) as leaves that require grad."""
    ts = {n: x[n] for n in ("q", "k", "v", "lr", "decay")}
    ts.update(w0=x["weights"][0][:1], w1=x["weights"][1][:1])
    return {n: t.detach().clone().requires_grad_() for n, t in ts.items()}


def train_loss(y: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """A loss on the outputs and the carried weights (so both adjoints reach the backward)."""
    g = torch.Generator(device=y.device).manual_seed(1)
    cy = torch.randn(y.shape, generator=g, device=y.device)
    return (y * cy).sum() + (w0 * w0).sum() + w1.sum()


GradFn = Callable[[], tuple[torch.Tensor, ...]]


def kernel_train_fn(x: dict[str, Any], leaves: dict[str, torch.Tensor], chunk: int, save_every: int,
                    compiled: bool = False, backward: str = "recompute", carry_mem: bool = False,
                    precision: str = "ieee") -> GradFn:
    import os

    from nestlearn.loops.triton.dgd_mlp import dgd_mlp

    b = x["q"].shape[0]

    def run() -> tuple[torch.Tensor, ...]:
        os.environ["NESTLEARN_DGD_BWD_CARRY"] = "memory" if carry_mem else "registers"
        lv = leaves
        w = (lv["w0"].expand(b, -1, -1, -1), lv["w1"].expand(b, -1, -1, -1))
        out = dgd_mlp(lv["q"], lv["k"], lv["v"], lv["lr"], lv["decay"], x["beta"], w, x["momenta"], chunk=chunk,
                      clip=1.0, save_every=save_every, compiled=compiled, backward=backward, precision=precision)
        return torch.autograd.grad(train_loss(out.y, *out.weights), list(leaves.values()))

    return run


def dual_train_fn(x: dict[str, Any], leaves: dict[str, torch.Tensor], chunk: int, compiled: bool) -> GradFn:
    b, h, _, d = x["q"].shape
    arch = MLPMemory(d, d, h, expand=1, depth=2, act="gelu", residual=True, bias=False)
    lv = leaves

    def run() -> tuple[torch.Tensor, ...]:
        pb = MemoryProblem(arch, rules.dgd(0.0, 0.0, 0.0), objectives.l2, lv["q"], lv["k"], lv["v"],
                           {"lr": lv["lr"], "decay": lv["decay"], "beta": 0.9}, chunk, GradMode("unroll"),
                           clip=1.0, compiled=compiled)
        p = {"W0": lv["w0"].expand(b, -1, -1, -1), "W1": lv["w1"].expand(b, -1, -1, -1)}
        st = MemoryState(params=p, opt={"m": {"W0": x["momenta"][0], "W1": x["momenta"][1]}}, anchor=p,
                         offset=0, chunks=0)
        y, new = run_dgd_dual(pb, st)
        return torch.autograd.grad(train_loss(y, new["params"]["W0"], new["params"]["W1"]), list(leaves.values()))

    return run


def train_rows(x: dict[str, Any], chunk: int, warmup: int, reps: int, save_every: int) -> None:
    """Forward + backward (``--train``): the kernel against ``dgd_dual``, each row printed as it
    is timed (a time limit keeps what ran), the fused rows right after the eager reference."""
    leaves = grad_leaves(x)
    b, _, t, _ = x["q"].shape
    rows: list[tuple[str, Callable[[], GradFn]]] = [
        ("dgd_dual eager", lambda: dual_train_fn(x, leaves, chunk, False)),
        ("triton fwd + fused triton bwd (adjoints in registers)", lambda: kernel_train_fn(x, leaves, chunk, 1, backward="fused")),
        ("same, adjoints carried in memory", lambda: kernel_train_fn(x, leaves, chunk, 1, backward="fused",
                                                                     carry_mem=True)),
        # the dots on tensor cores (what nestlearn run would use with TF32 matmuls allowed): the
        # backward spills least there (--ptxas), so it may gain more than the forward's 15%
        *((f"same, dots {p}", lambda p=p: kernel_train_fn(x, leaves, chunk, 1, backward="fused", carry_mem=True,
                                                          precision=p)) for p in ("tf32x3", "tf32")),
        ("dgd_dual compiled chunk steps", lambda: dual_train_fn(x, leaves, chunk, True)),
        *((f"triton fwd + recompute bwd, save {e}", lambda e=e: kernel_train_fn(x, leaves, chunk, e))
          for e in sorted({1, save_every})),
        (f"triton fwd + compiled recompute, save {save_every}",
         lambda: kernel_train_fn(x, leaves, chunk, save_every, compiled=True)),
    ]
    ref = dual_train_fn(x, leaves, chunk, False)()
    print(f"\n# DGD forward + backward (grad: unroll; dq, dk, dv, dlr, ddecay, dW0, dW1), batch {b} x {t} tokens, "
          f"chunk {chunk}; {torch.cuda.get_device_name()}")
    print(f"{'path':<38} {'ms':>9} {'tokens/s':>12} {'vs eager':>9} {'peak MiB':>9} {'max rel err':>12}", flush=True)
    base: float | None = None
    for name, build in rows:
        try:
            fn = build()
            ms = time_ms(fn, warmup, reps)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            grads = fn()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            err = relative_error(grads, ref)
            base = ms if name == "dgd_dual eager" else base
            speed = f"{base / ms:>8.2f}x" if base else f"{'':>9}"
            print(f"{name:<38} {ms:>9.2f} {b * t / ms * 1e3:>12,.0f} {speed} {peak:>9.0f} {err:>12.2e}", flush=True)
        except Exception as exc:  # a row that cannot run here says why
            print(f"{name:<38} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}", flush=True)


def graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` captured in a CUDA graph (after warm-up on a side stream) and replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()

    def replay() -> torch.Tensor:
        g.replay()
        return out

    return replay


def time_ms(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def ptxas_usage(d: int, chunk: int, precision: str = "ieee", num_warps: int | None = None, arch: int = 90,
                save: bool = True, backward: bool = False, carry_mem: bool = False) -> str:
    """Compile the kernel for ``sm_<arch>`` without a GPU (triton ships ptxas) with
    ``dgd_mlp.launch_options`` and return ptxas's ``REG:<registers> STACK:<spilled bytes>`` per
    thread and the program's ``SHARED:<bytes>``; ``save``: the training variant (it also writes the backward's checkpoints);
    ``backward``: the fused backward kernel (``dgd_mlp_bwd.py``) instead. Needs the kernel
    modules decorated without ``TRITON_INTERPRET``."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nestlearn.loops.triton.dgd_mlp import _dgd_mlp_fwd_kernel, launch_options
    from nestlearn.loops.triton.dgd_mlp_bwd import _dgd_mlp_bwd_kernel

    fn = _dgd_mlp_bwd_kernel if backward else _dgd_mlp_fwd_kernel
    consts: dict[str, Any] = {"BT": chunk, "LOG_BT": chunk.bit_length() - 1, "D": d, "CLIP": True, "PREC": precision}
    if not backward:
        consts["SAVE"] = save
    else:
        consts["CARRY_MEM"] = carry_mem
    sig = {n: ("*fp32" if n.endswith(("_ptr", "_out")) else "constexpr" if n in consts
               else "fp32" if n == "clip" else "i32") for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                       options=launch_options(d, num_warps))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    line = next((ln for ln in usage.splitlines() if "REG:" in ln), "?")
    # shared memory per program: a launch needing more than the device has raises OutOfResources
    return " ".join(line.split()[:2]) + f" SHARED:{k.metadata.shared}"


def ptxas_table(d: int, chunk: int, arch: int = 90) -> None:
    """Per ``num_warps`` and ``tl.dot`` precision, the registers and stack (spilled registers) per
    thread that ptxas reports (``ptxas_usage``): where tuning starts before a GPU is at hand."""
    from nestlearn.loops.triton.dgd_mlp import launch_options

    print(f"# ptxas, sm_{arch}: D {d}, chunk {chunk} (REG: registers per thread, STACK: bytes of spills per thread)")
    for kind in ("fwd", "bwd", "bwd-mem"):
        for prec in ("ieee", "tf32x3", "tf32"):
            for warps in (4, 8, 16):
                cap = launch_options(d, warps).get("maxnreg", "-")
                usage = ptxas_usage(d, chunk, prec, warps, arch, backward=kind != "fwd", carry_mem=kind == "bwd-mem")
                print(f"{kind:<7} {prec:<7} num_warps {warps:>2} maxnreg {cap}: {usage}", flush=True)


def model_rows(batch: int, seq: int, warmup: int, reps: int) -> None:
    """``models/hope.yaml``'s no-grad forward (evaluation) with the kernel and without it
    (``NESTLEARN_TRITON=0``): what the row buys a whole model, CMS levels and all."""
    import os
    from pathlib import Path

    import nestlearn

    spec = Path(__file__).resolve().parent.parent / "models" / "hope.yaml"
    model = nestlearn.compile(spec).to("cuda").eval()
    tokens = torch.randint(0, 256, (batch, seq), device="cuda")
    print(f"\n# models/hope.yaml forward under no_grad, {batch} x {seq} tokens")
    old = os.environ.get("NESTLEARN_TRITON")
    try:
        with torch.no_grad():
            for flag, name in (("0", "closed form (dgd_dual)"), ("1", "fused kernel (dgd_triton)")):
                os.environ["NESTLEARN_TRITON"] = flag
                ms = time_ms(lambda: model(tokens)[0], warmup, reps)
                print(f"{name:<34} {ms:>9.3f} {batch * seq / ms * 1e3:>12,.0f} tokens/s")
    finally:
        if old is None:
            os.environ.pop("NESTLEARN_TRITON", None)
        else:
            os.environ["NESTLEARN_TRITON"] = old


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim-head", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph rows")
    ap.add_argument("--num-warps", type=int, default=None, help="the kernel's launch option (default: 8 at D >= 64)")
    ap.add_argument("--maxnreg", type=int, default=None, help="the kernel's register cap (e.g. 255 with 8 warps)")
    ap.add_argument("--model", action="store_true", help="also time models/hope.yaml's no-grad forward with / without")
    ap.add_argument("--ptxas", action="store_true", help="no GPU needed: registers / spills per num_warps and precision")
    ap.add_argument("--train", action="store_true", help="also time forward + backward (printed last)")
    ap.add_argument("--save-every", type=int, default=None, help="--train: the kernel's checkpoint spacing (chunks)")
    a = ap.parse_args()
    if a.ptxas:
        ptxas_table(a.dim_head, a.chunk)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench.triton_dgd needs a CUDA device")
    x = hope_inputs(a.batch, a.heads, a.seq, a.dim_head, "cuda")
    launch = {"num_warps": a.num_warps, "maxnreg": a.maxnreg}
    rows: list[tuple[str, Callable[[], Callable[[], torch.Tensor]]]] = [
        ("triton kernel (fp32 ieee)", lambda: kernel_fn(x, a.chunk, "ieee", **launch)),
        ("triton kernel (3xtf32)", lambda: kernel_fn(x, a.chunk, "tf32x3", **launch)),
        ("triton kernel (tf32)", lambda: kernel_fn(x, a.chunk, "tf32", **launch)),
        ("dgd_dual eager", lambda: dual_fn(x, a.chunk, False)),
        ("dgd_dual compiled chunk steps", lambda: dual_fn(x, a.chunk, True)),
    ]
    if not a.no_graph:
        rows += [("dgd_dual eager + CUDA graph", lambda: graphed(dual_fn(x, a.chunk, False))),
                 ("dgd_dual compiled + CUDA graph", lambda: graphed(dual_fn(x, a.chunk, True)))]
    tokens = a.batch * a.seq
    chunks = a.seq // a.chunk
    print(f"# DGD forward, HOPE's MLP memory: batch {a.batch} x {a.seq} tokens, {a.heads} heads of {a.dim_head}, "
          f"chunk {a.chunk}; {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'path':<34} {'ms':>9} {'tokens/s':>12} {'us/chunk':>9} {'vs eager':>9} {'max rel err':>12}")
    results: list[tuple[str, float, float] | tuple[str, str]] = []
    with torch.no_grad():
        ref = dual_fn(x, a.chunk, False)()
        for name, build in rows:
            try:
                fn = build()
                ms = time_ms(fn, a.warmup, a.reps)
                results.append((name, ms, float((fn() - ref).abs().max() / ref.abs().max())))
            except Exception as exc:  # a row that cannot run here (e.g. a graph capture) says why
                results.append((name, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"))
    base = next((r[1] for r in results if r[0] == "dgd_dual eager" and len(r) == 3), None)
    for r in results:
        if len(r) == 2:
            print(f"{r[0]:<34} {r[1]}")
            continue
        name, ms, err = r
        speed = f"{base / ms:>8.2f}x" if isinstance(base, float) else f"{'':>9}"
        print(f"{name:<34} {ms:>9.3f} {tokens / ms * 1e3:>12,.0f} {ms * 1e3 / chunks:>9.1f} {speed} {err:>12.2e}")
    if a.model:
        model_rows(a.batch, a.seq, a.warmup, max(3, a.reps // 4))
    if a.train:
        from nestlearn.loops.triton.dgd_mlp import SAVE_EVERY

        train_rows(x, a.chunk, a.warmup, max(3, a.reps // 4), a.save_every or SAVE_EVERY)

if __name__ == "__main__":
    main()
