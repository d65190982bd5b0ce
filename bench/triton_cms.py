"""``python -m bench.triton_cms [--batch 8] [--seq 2048] [--dim 512] [--hidden 1024] [--chunk 16]
[--reps 10] [--no-graph] [--no-train] [--block-h N] [--block-d N] [--num-warps N] [--bwd-block-h N]
[--bwd-block-d N] [--bwd-num-warps N] [--ptxas]``: the Triton chunk step of HOPE's CMS levels
(``nestlearn/loops/triton/sgd_mlp.py``) against the closed form it replaces (``loops/dual.py``) at
the fast level c1's shape (``models/hope.yaml``: one head, 512 -> 1024 -> 512, SGD with lr = 3e-5
sigmoid(.), chunk 16, RMS-normalised k / v), on CUDA.

Forward rows (no grad): the kernel in fp32 (``ieee``, what the executor runs) and in TF32 (for
scale, not exact); ``run_dual`` eagerly and with its chunk steps through ``torch.compile``
(``nestlearn run --compile``), each also replayed from a CUDA graph (``--no-graph`` skips).
Forward + backward rows (``grad: unroll``; a loss on the outputs and the end weights,
``autograd.grad`` to q, k, v, lr and the initial weights): ``run_dual`` eager / compiled /
compiled + CUDA graph, and the kernel's ``SGDMLPStep`` with its fused backward (``sgd_mlp_bwd.py``,
the default; eager and from a CUDA graph), its hand-derived PyTorch backward (eager / compiled /
compiled + CUDA graph) or its recompute through ``run_dual`` (``sgd_mlp.py``'s docstring), and
``sgd_mlp_rev``'s one node over the chunks with the start weights rebuilt in the backward (what
training runs since the fifteenth session; eager and from a CUDA graph): fused against manual
against rebuilt against the closed form in one process, with each row's peak memory. ``--ptxas`` needs no GPU: it prints
registers, spills and shared memory of the fused backward's kernels for sm_90 and exits. Median of ``--reps``
CUDA-event timings after warm-up; tokens/s counts ``batch x seq``; the last column is the
largest error against eager ``run_dual`` (of ``y``; of every gradient), relative to its largest entry.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, cast

import torch

from bench.run import relative_error
from bench.triton_dgd import graphed, time_ms
from nestlearn import objectives, rules
from nestlearn.loops.common import GradMode, MemoryProblem, MemoryState
from nestlearn.loops.dual import run_dual
from nestlearn.memories import MLPMemory

NAMES = ("q", "k", "v", "lr", "w0", "w1")


def cms_inputs(b: int, t: int, d: int, hidden: int, dev: str, lr_max: float = 3e-5) -> dict[str, torch.Tensor]:
    """c1-like inputs: q the (pre-normed) input, RMS-normalised k / v (``kv_norm``), a per-token
    lr, and initial weights shared over the batch (stride-0 views, as ``init_state`` makes them)."""
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=dev)

    rms = torch.nn.functional.rms_norm
    return {"q": rnd(b, 1, t, d), "k": rms(rnd(b, 1, t, d), (d,)), "v": rms(rnd(b, 1, t, d), (d,)),
            "lr": lr_max * torch.sigmoid(rnd(b, 1, t)),
            "w0": (rnd(1, 1, hidden, d) / d**0.5).expand(b, -1, -1, -1),
            "w1": (rnd(1, 1, d, hidden) / hidden**0.5).expand(b, -1, -1, -1)}


def dual_out(x: dict[str, torch.Tensor], chunk: int, compiled: bool, grad: str = "stop"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, hidden = x["q"].shape[-1], x["w0"].shape[-2]
    arch = MLPMemory(d, d, 1, expand=hidden / d, depth=2, act="gelu", residual=False, bias=False)
    pb = MemoryProblem(arch, rules.sgd(0.0), objectives.l2, x["q"], x["k"], x["v"], {"lr": x["lr"], "decay": 0.0},
                       chunk, GradMode(grad), compiled=compiled)
    p = {"W0": x["w0"], "W1": x["w1"]}
    y, st = run_dual(pb, MemoryState(params=p, opt={}, anchor=p, offset=0, chunks=0))
    return y, st["params"]["W0"], st["params"]["W1"]


def kernel_out(x: dict[str, torch.Tensor], chunk: int, precision: str = "ieee", compiled: bool = False,
               backward: str | None = None, rebuilt: bool = False, **launch: Any
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from nestlearn.loops.triton import sgd_mlp

    if rebuilt:  # training's default: one node, start weights rebuilt in the backward (sgd_mlp_rev)
        from nestlearn.loops.triton.sgd_mlp_rev import sgd_mlp_chunks

        out = sgd_mlp_chunks(*(x[n] for n in NAMES), chunk=chunk, precision=precision)
        return out.y, *out.weights

    if launch and not torch.is_grad_enabled():  # launch options: the raw forward, chunk by chunk
        w0, w1, ys = x["w0"], x["w1"], []
        for t0 in range(0, x["q"].shape[2], chunk):
            sl = slice(t0, t0 + chunk)
            y, w0, w1 = sgd_mlp.sgd_mlp_step_fwd(x["q"][:, :, sl], x["k"][:, :, sl], x["v"][:, :, sl],
                                                 x["lr"][:, :, sl], w0, w1, precision=precision, **launch)
            ys.append(y)
        return torch.cat(ys, 2), w0, w1
    out = sgd_mlp.sgd_mlp(*(x[n] for n in NAMES), chunk=chunk, precision=precision, compiled=compiled,
                          backward=backward or sgd_mlp.BACKWARD)
    return out.y, *out.weights


def forward_fn(run: Callable[..., tuple[torch.Tensor, ...]], x: dict[str, torch.Tensor], chunk: int,
               **kw: Any) -> Callable[[], torch.Tensor]:
    return lambda: run(x, chunk, **kw)[0]


def leaves(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """q, k, v, lr and the initial weights (one ``[1, 1, ., .]`` leaf each) that require grad."""
    return {n: (x[n][:1] if n in ("w0", "w1") else x[n]).detach().clone().requires_grad_() for n in NAMES}


def train_fn(run: Callable[..., tuple[torch.Tensor, ...]], lv: dict[str, torch.Tensor], chunk: int,
             **kw: Any) -> Callable[[], tuple[torch.Tensor, ...]]:
    b = lv["q"].shape[0]
    g = torch.Generator(device=lv["q"].device).manual_seed(1)
    cy = torch.randn(lv["q"].shape, generator=g, device=lv["q"].device)

    def step() -> tuple[torch.Tensor, ...]:
        x = {**lv, "w0": lv["w0"].expand(b, -1, -1, -1), "w1": lv["w1"].expand(b, -1, -1, -1)}
        y, w0, w1 = run(x, chunk, **kw)
        loss = (y * cy).sum() + (w0 * w0).sum() + w1.sum()  # both adjoints reach the backward
        return torch.autograd.grad(loss, list(lv.values()))

    return step


def graphed_any(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``bench.triton_dgd.graphed`` for a function of any outputs (here: a tuple of gradients)."""
    return graphed(cast(Callable[[], torch.Tensor], fn))


def table(title: str, rows: list[tuple[str, Callable[[], Any]]], ref: tuple[torch.Tensor, ...], tokens: int,
          chunks: int, warmup: int, reps: int, memory: bool = False) -> None:
    """Time every row, printing each as it is timed (a time limit keeps what ran; a row that
    cannot run here says why)."""
    base: float | None = None
    print(f"\n# {title}")
    mem_head = f" {'peak MiB':>9}" if memory else ""
    print(f"{'path':<40} {'ms':>9} {'tokens/s':>12} {'us/chunk':>9} {'vs first':>9}{mem_head} {'max rel err':>12}",
          flush=True)
    for name, build in rows:
        try:
            fn = build()
            ms = time_ms(fn, warmup, reps)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = fn()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            err = relative_error(out if isinstance(out, tuple) else (out,), ref)
            base = base or ms
            mem = f" {peak:>9.0f}" if memory else ""
            print(f"{name:<40} {ms:>9.3f} {tokens / ms * 1e3:>12,.0f} {ms * 1e3 / chunks:>9.1f} "
                  f"{base / ms:>8.2f}x{mem} {err:>12.2e}", flush=True)
        except Exception as exc:  # e.g. a graph capture that this torch refuses
            print(f"{name:<40} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}", flush=True)


def ptxas_shared(d: int = 512, hidden: int = 1024, chunk: int = 16, arch: int = 90, **launch: int) -> dict[str, int]:
    """Compile the four forward kernels for ``sm_<arch>`` without a GPU (triton ships ptxas) at
    the tiles ``sgd_mlp_step_fwd`` picks (or ``block_h`` / ``block_d``): each one's shared
    memory per program. Needs the kernel module decorated without ``TRITON_INTERPRET``."""
    import math

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nestlearn.loops.triton import sgd_mlp as K

    consts: dict[str, Any] = {"BT": max(16, triton.next_power_of_2(chunk)), "DI": d, "DO": d, "PREC": "ieee",
                              "BH": launch.get("block_h") or K.block(hidden),
                              "BD": launch.get("block_d") or K.block(math.gcd(d, d)), "READ_START": False,
                              "STORE_D0": True}  # as training stores d0 (sgd_mlp_rev)
    out = {}
    for fn in (K._signals, K._error, K._update, K._read):
        cs = {n: v for n, v in consts.items() if n in fn.arg_names}
        sig = {n: "*fp32" if n.endswith("_ptr") else "constexpr" if n in cs else "i32" for n in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, cs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": launch.get("num_warps", 4)})
        out[fn.__name__] = k.metadata.shared
    return out


def ptxas_bwd(d: int = 512, hidden: int = 1024, chunk: int = 16, arch: int = 90, read_start: bool = False,
              **launch: int) -> dict[str, str]:
    """Compile the fused backward's four own kernels (``sgd_mlp_bwd.py``; its first two launches are
    the forward's) for ``sm_<arch>`` without a GPU at the tiles ``sgd_mlp_step_bwd`` picks (or
    ``block_h`` / ``block_d``): ptxas's ``REG:<registers> STACK:<spilled bytes>`` per thread and
    the program's ``SHARED:<bytes>``, per kernel. Needs the modules decorated without
    ``TRITON_INTERPRET``."""
    import math
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nestlearn.loops.triton import sgd_mlp as K
    from nestlearn.loops.triton import sgd_mlp_bwd as KB

    consts: dict[str, Any] = {"BT": max(16, triton.next_power_of_2(chunk)), "DI": d, "DO": d, "PREC": "ieee",
                              "BH": launch.get("block_h") or K.block(hidden),
                              "BD": launch.get("block_d") or K.block(math.gcd(d, d)), "READ_START": read_start}
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    out = {}
    for fn in (KB._bwd_local, KB._bwd_error, KB._bwd_weights, KB._bwd_inputs):
        cs = {n: v for n, v in consts.items() if n in fn.arg_names}
        sig = {n: "*fp32" if n.endswith("_ptr") else "constexpr" if n in cs else "i32" for n in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, cs), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": launch.get("num_warps", 4)})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        line = next((ln for ln in usage.splitlines() if "REG:" in ln), "?")
        out[fn.__name__] = " ".join(line.split()[:2]) + f" SHARED:{k.metadata.shared}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph rows")
    ap.add_argument("--no-train", action="store_true", help="skip forward + backward")
    ap.add_argument("--block-h", type=int, default=None, help="the kernels' hidden tile (default 64)")
    ap.add_argument("--block-d", type=int, default=None, help="the kernels' column block (default 64)")
    ap.add_argument("--num-warps", type=int, default=None, help="the kernels' launch option (default 4)")
    ap.add_argument("--bwd-block-h", type=int, default=None, help="the fused backward's hidden tile")
    ap.add_argument("--bwd-block-d", type=int, default=None, help="the fused backward's column block")
    ap.add_argument("--bwd-num-warps", type=int, default=None, help="the fused backward's warps (default 4)")
    ap.add_argument("--ptxas", action="store_true", help="no GPU: the fused backward's ptxas report, then exit")
    a = ap.parse_args()
    launch = {k: v for k, v in (("block_h", a.block_h), ("block_d", a.block_d), ("num_warps", a.num_warps)) if v}
    bwd_launch = {k: v for k, v in (("block_h", a.bwd_block_h), ("block_d", a.bwd_block_d),
                                    ("num_warps", a.bwd_num_warps)) if v}
    if a.ptxas:
        for rs in (False, True):
            print(f"# fused backward, sm_90, {a.dim} -> {a.hidden} -> {a.dim}, chunk {a.chunk}, read_start {rs}, "
                  f"{bwd_launch}")
            for name, usage in ptxas_bwd(a.dim, a.hidden, a.chunk, read_start=rs, **bwd_launch).items():
                print(f"{name:<14} {usage}")
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench.triton_cms needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the closed form too
    from nestlearn.loops.triton import sgd_mlp_bwd

    sgd_mlp_bwd.LAUNCH.update(bwd_launch)  # what SGDMLPStep passes to the fused backward
    x = cms_inputs(a.batch, a.seq, a.dim, a.hidden, "cuda")
    tokens, chunks = a.batch * a.seq, a.seq // a.chunk
    head = (f"batch {a.batch} x {a.seq} tokens, {a.dim} -> {a.hidden} -> {a.dim}, chunk {a.chunk}; "
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    fwd: list[tuple[str, Callable[[], Any]]] = [
        ("run_dual eager", lambda: forward_fn(dual_out, x, a.chunk, compiled=False)),
        ("run_dual compiled chunk steps", lambda: forward_fn(dual_out, x, a.chunk, compiled=True)),
        ("triton (fp32 ieee)", lambda: forward_fn(kernel_out, x, a.chunk, **launch)),
        ("triton (tf32, not exact)", lambda: forward_fn(kernel_out, x, a.chunk, precision="tf32", **launch)),
    ]
    if not a.no_graph:
        fwd += [("run_dual eager + CUDA graph", lambda: graphed(forward_fn(dual_out, x, a.chunk, compiled=False))),
                ("run_dual compiled + CUDA graph", lambda: graphed(forward_fn(dual_out, x, a.chunk, compiled=True))),
                ("triton (fp32) + CUDA graph", lambda: graphed(forward_fn(kernel_out, x, a.chunk, **launch)))]
    with torch.no_grad():
        ref = (dual_out(x, a.chunk, False)[0],)
        table(f"CMS forward (no grad), {head}", fwd, ref, tokens, chunks, a.warmup, a.reps)
    if a.no_train:
        return
    lv = leaves(x)
    train: list[tuple[str, Callable[[], Any]]] = [
        ("run_dual eager", lambda: train_fn(dual_out, lv, a.chunk, compiled=False, grad="unroll")),
        ("run_dual compiled chunk steps", lambda: train_fn(dual_out, lv, a.chunk, compiled=True, grad="unroll")),
        ("triton fwd + fused bwd", lambda: train_fn(kernel_out, lv, a.chunk, backward="fused")),
        ("triton, rebuilt start weights (default)", lambda: train_fn(kernel_out, lv, a.chunk, rebuilt=True)),
        ("triton fwd + manual bwd (eager)", lambda: train_fn(kernel_out, lv, a.chunk, backward="manual")),
        ("triton fwd + manual bwd (compiled)",
         lambda: train_fn(kernel_out, lv, a.chunk, compiled=True, backward="manual")),
        ("triton fwd + recompute bwd (eager)", lambda: train_fn(kernel_out, lv, a.chunk, backward="recompute")),
    ]
    if not a.no_graph:  # the backward captured too (what the trainer's --cuda-graph replays)
        train += [("run_dual compiled + CUDA graph",
                   lambda: graphed_any(train_fn(dual_out, lv, a.chunk, compiled=True, grad="unroll"))),
                  ("triton (compiled manual bwd) + CUDA graph",
                   lambda: graphed_any(train_fn(kernel_out, lv, a.chunk, compiled=True, backward="manual"))),
                  ("triton (fused bwd) + CUDA graph",
                   lambda: graphed_any(train_fn(kernel_out, lv, a.chunk, backward="fused"))),
                  ("triton, rebuilt weights + CUDA graph",
                   lambda: graphed_any(train_fn(kernel_out, lv, a.chunk, rebuilt=True)))]
    ref_g = train_fn(dual_out, lv, a.chunk, compiled=False, grad="unroll")()
    table(f"CMS forward + backward (grad: unroll; dq, dk, dv, dlr, dW0, dW1), {head}", train, ref_g, tokens, chunks,
          a.warmup, max(3, a.reps // 2), memory=True)


if __name__ == "__main__":
    main()
