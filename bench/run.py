"""Cases and timing: forward+backward tokens/s and peak memory, ours and the peers'."""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from bench import specs

Step = Callable[[], None]


@dataclass
class Case:
    name: str  # the row's family, e.g. "titans"
    impl: str  # "nestlearn", "titans-pytorch", ...
    batch: int
    seq: int
    dtype: str
    build: Callable[[], Step]  # builds inputs/model, returns one fwd+bwd step
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def relative_error(got: Iterable[torch.Tensor], want: Iterable[torch.Tensor]) -> float:
    """The largest entry-wise difference of any pair, relative to that reference tensor's largest
    entry: the benches' check that a fast path computed the same outputs or gradients. Pairs run to
    the shorter sequence (a forward-only row against a reference with gradients compares outputs)."""
    return max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-30)) for g, w in zip(got, want))


def positive_int(text: str) -> int:
    """argparse type of the bench's counts (lengths, reps, warm-up calls before a graph capture,
    which fails without one: lazy cuBLAS / autograd initialisation)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def seconds_of(step: Step, dev: torch.device) -> float:
    """Seconds of one call of ``step``: CUDA events on a GPU (device time, no host sync inside)."""
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def time_case(case: Case, dev: torch.device, warmup: int, reps: int, budget_s: float) -> dict[str, Any]:
    row: dict[str, Any] = {"name": case.name, "impl": case.impl, "batch": case.batch, "seq": case.seq,
                           "dtype": case.dtype, "note": case.note, **case.extra}
    try:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        step = case.build()
        times = []
        t0 = time.perf_counter()
        step()
        _sync(dev)
        first = time.perf_counter() - t0
        n_warm = 0 if first * (warmup + reps) > budget_s else warmup - 1
        for _ in range(max(0, n_warm)):
            step()
        n_reps = max(1, min(reps, int(budget_s / max(first, 1e-6))))
        for _ in range(n_reps):
            times.append(seconds_of(step, dev))
        med = statistics.median(times)
        row.update(status="ok", s_per_iter=med, tokens_per_s=case.batch * case.seq / med, reps=len(times),
                   spread=(max(times) - min(times)) / med if len(times) > 1 else 0.0)
        if dev.type == "cuda":
            row["peak_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
    except torch.cuda.OutOfMemoryError:
        row.update(status="OOM")
    except Exception as e:  # a peer's failure is a row, not a crash
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
    finally:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- builders

def _dt(name: str) -> torch.dtype:
    """The weights' dtype of a row: ``bf16-amp`` keeps fp32 weights (``trainer_precision``)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-amp": torch.float32, "fp64": torch.float64}[name]


def trainer_precision(dev: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 as ``nestlearn run`` trains in it: fp32 weights, the forward under bf16 autocast, so the
    inner loops run in fp32 through their kernels (bf16 weights would send HOPE's levels to the
    bf16 closed forms, a path no training run takes); autocast's cache off so a CUDA graph can
    capture it."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=False) if bf16 else contextlib.nullcontext()


def _randomise_gates(model: torch.nn.Module) -> None:
    """Gates start at zero weight; give them data dependence so the timing is not of a constant."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "gates" in n and n.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


@contextlib.contextmanager
def environ(**env: str) -> Iterator[None]:
    """``os.environ`` updated with ``env`` inside the block, restored after."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fla_on(fla: bool) -> contextlib.AbstractContextManager[None]:
    """``NESTLEARN_FLA`` for one step: ``nestlearn`` rows time the pure-PyTorch executors even
    where fla is installed; ``nestlearn+fla`` rows let ``loops.run`` dispatch to it."""
    return environ(NESTLEARN_FLA="1" if fla else "0")


def _require_fla_dispatch(step: Step) -> None:
    """Run ``step`` once and fail (an error row, not a mislabelled timing) unless a memory op
    reached ``fla_backend.run_fla`` through ``loops.run``."""
    from nestlearn.loops import fla_backend

    real, calls = fla_backend.run_fla, []

    def counting(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(*a, **kw)

    fla_backend.run_fla = counting  # type: ignore[assignment]
    try:
        step()
    finally:
        fla_backend.run_fla = real  # type: ignore[assignment]
    if not calls:
        raise RuntimeError("the spec did not dispatch to fla: loops/__init__.py must call fla_backend.run_fla "
                           "where fla_backend.available(pb) and fla_backend.supports(pb)")


def compiled_step(doc: dict[str, Any], b: int, t: int, dtype: str, dev: torch.device,
                  hand: bool = False, fla: bool = False, compile_steps: bool = False) -> Callable[[], Step]:
    """``compile_steps``: the chunk steps of the closed form and of the DGD closed form through
    torch.compile (``CompiledModel.compile_chunk_steps``; what ``nestlearn run --compile`` does
    inside the inner loops), for this model only."""
    def build() -> Step:
        from nestlearn.compile import compile_spec

        torch.manual_seed(0)
        model = compile_spec(specs.validate(doc)).to(dev, _dt(dtype))
        model.compile_chunk_steps(compile_steps)
        _randomise_gates(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if doc["model"].get("input") == "embeddings":
            x = torch.randn(b, t, doc["model"]["dim"], device=dev, dtype=_dt(dtype))
            if hand:
                from bench.handwritten import HandTitans

                fn = HandTitans(model)
                forward = lambda: fn(x)  # noqa: E731
            else:
                forward = lambda: model(x)[0]  # noqa: E731
            loss_of = lambda out: out.float().square().mean()  # noqa: E731
        else:
            x = torch.randint(0, 256, (b, t + 1), device=dev)
            inp, tgt = x[:, :-1], x[:, 1:]
            forward = lambda: model(inp)[0]  # noqa: E731
            loss_of = lambda out: F.cross_entropy(out.float().flatten(0, 1), tgt.flatten())  # noqa: E731

        amp = dtype == "bf16-amp"

        def step() -> None:
            for p in params:
                p.grad = None
            with _fla_on(fla):
                with trainer_precision(dev, amp):
                    loss = loss_of(forward())
                loss.backward()

        if fla:
            _require_fla_dispatch(step)
        return step

    return build


def delta_kernel_step(b: int, t: int, h: int, d: int, dev: torch.device, backend: str,
                      chunk: int | None = None) -> Callable[[], Step]:
    """The bare inner loop (no projections), bf16 in: ours in PyTorch (``torch``, at ``chunk``
    or the default), fla's kernel (``fla``), or our DeltaNet problem mapped onto fla's kernel
    (``nestlearn+fla``: ``loops/fla_backend.run_fla``, i.e. fla plus our layout/rate mapping)."""
    def build() -> Step:
        g = torch.Generator(device=dev).manual_seed(0)
        mk = lambda *s: torch.randn(*s, device=dev, generator=g, dtype=torch.bfloat16)  # noqa: E731
        q = mk(b, h, t, d).requires_grad_()
        k = F.normalize(mk(b, h, t, d).float(), dim=-1).bfloat16().requires_grad_()
        v = mk(b, h, t, d).requires_grad_()
        beta = torch.rand(b, h, t, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_()
        if backend == "fla":
            from fla.ops.delta_rule import chunk_delta_rule

            qt, kt, vt = (z.detach().transpose(1, 2).contiguous().requires_grad_() for z in (q, k, v))
            bt = beta.detach().transpose(1, 2).contiguous().requires_grad_()

            def step() -> None:
                o, _ = chunk_delta_rule(qt, kt, vt, bt, scale=1.0)
                o.float().square().mean().backward()
        elif backend == "nestlearn+fla":
            from nestlearn.loops import MemoryProblem, init_state
            from nestlearn.loops.common import GradMode
            from nestlearn.loops.fla_backend import run_fla, supports
            from nestlearn.memories import LinearMemory
            from nestlearn.objectives import l2
            from nestlearn.rules import sgd

            lr = (beta.detach() / 2).requires_grad_()  # fla's beta = 2 lr (l2 is not halved)
            arch, rule = LinearMemory(d, d, h), sgd(0.0)
            pb = MemoryProblem(arch, rule, l2, q, k, v, {"lr": lr}, 1, GradMode("unroll"))
            if not supports(pb):
                raise RuntimeError("fla_backend.supports rejected the bare DeltaNet problem")
            state = init_state(arch, rule, {"W": torch.zeros(h, d, d, device=dev)}, b)

            def step() -> None:
                y, _ = run_fla(pb, state)
                y.float().square().mean().backward()
        else:
            from nestlearn.loops.delta import delta_rule

            w0 = torch.zeros(b, h, d, d, device=dev)

            def step() -> None:  # chunk=None: delta_rule's own auto_chunk
                y, _ = delta_rule(q.float(), k.float(), v.float(), beta.float(), None, w0, chunk=chunk)
                y.bfloat16().float().square().mean().backward()

        return step

    return build


def titans_pytorch_step(b: int, t: int, dev: torch.device, dim_head: int | None = None,
                       batch_size: int | None = None) -> Callable[[], Step]:
    """titans-pytorch's ``NeuralMemory(dim=512, heads=4, chunk_size=64)``: by default each head is
    ``dim_head = dim`` wide (16x our bench spec's memory per head) and every chunk's gradient is
    taken at the weights the call started from (then associative scans over momentum and decay:
    parallel over chunks). ``dim_head=128`` gives our head size; ``batch_size=64`` updates the
    weights after every chunk, so each chunk's gradient is taken at its own start weights, as in
    the Titans paper's mini-batch form and in nestlearn (one ``store_memories`` call per chunk)."""
    def build() -> Step:
        from titans_pytorch import NeuralMemory

        torch.manual_seed(0)
        mem = NeuralMemory(dim=512, heads=4, chunk_size=64, dim_head=dim_head, batch_size=batch_size).to(dev)
        x = torch.randn(b, t, 512, device=dev)

        def step() -> None:
            for p in mem.parameters():
                p.grad = None
            out, _ = mem(x)
            out.square().mean().backward()

        return step

    return build


def kmccleary_hope_config(dim: int = 512, depth: int = 4, n_cms: int | None = None) -> tuple[Any, str | None]:
    """kmccleary3301 ``nested-learning`` 0.2.0's shipped ``configs/pilot.yaml`` (read from the
    installed package; ``hope_hybrid`` blocks: attention, Titans memory MLP, chain of CMS MLPs) at
    this width and depth with a byte vocabulary; ``n_cms`` keeps only its first CMS levels.
    Returns the package's ``ModelConfig`` (built as its ``training.build_model_from_cfg`` does,
    without needing omegaconf) and the pilot's autocast dtype (``train.mixed_precision``) or None."""
    from importlib.resources import files

    import yaml
    from nested_learning.levels import LevelSpec
    from nested_learning.model import ModelConfig

    pilot = yaml.safe_load((files("nested_learning") / "configs" / "pilot.yaml").read_text())
    m = dict(pilot["model"])
    m.update(vocab_size=256, dim=dim, num_layers=depth)
    m["titan_level"] = LevelSpec(**m["titan_level"])
    m["cms_levels"] = [LevelSpec(**lv) for lv in m["cms_levels"][:n_cms]]
    mp = pilot.get("train", {}).get("mixed_precision") or {}
    return ModelConfig(**m), (str(mp.get("dtype", "bf16")) if mp.get("enabled") else None)


def kmccleary_hope_params(dim: int = 512, depth: int = 4, n_cms: int | None = None) -> int:
    """Parameter count (the tied embedding / LM head once), built on the meta device."""
    from nested_learning.model import HOPEModel

    with torch.device("meta"):
        model = HOPEModel(kmccleary_hope_config(dim, depth, n_cms)[0])
    return sum(p.numel() for p in model.parameters())


def kmccleary_hope_step(b: int, t: int, dev: torch.device, dim: int = 512, depth: int = 4,
                        n_cms: int | None = None) -> Callable[[], Step]:
    """One plain forward+backward of the LM loss of its ``HOPEModel``: ``model(tokens)`` with no
    teach signal, which runs attention, Titans memory and CMS as fixed layers and applies none
    of its online (test-time) updates (those need ``teach_signal(s)=``, a second forward that
    its training loop runs after ``loss.backward()``), so this is a lower bound on its training
    step. fp32 weights under bf16 autocast on CUDA, as the pilot's ``train.mixed_precision``;
    plain fp32 on CPU."""
    def build() -> Step:
        from nested_learning.model import HOPEModel

        cfg, amp = kmccleary_hope_config(dim, depth, n_cms)
        torch.manual_seed(0)
        model = HOPEModel(cfg).to(dev).train()
        params = [p for p in model.parameters() if p.requires_grad]
        x = torch.randint(0, cfg.vocab_size, (b, t + 1), device=dev)
        inp, tgt = x[:, :-1], x[:, 1:]
        amp_dt = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                  "float16": torch.float16}[amp] if amp is not None and dev.type == "cuda" else None

        def step() -> None:
            for p in params:
                p.grad = None
            with torch.autocast("cuda", dtype=amp_dt) if amp_dt is not None else contextlib.nullcontext():
                logits = model(inp)
                loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
            loss.backward()

        return step

    return build


def sdpa_step(b: int, t: int, h: int, d: int, dev: torch.device) -> Callable[[], Step]:
    def build() -> Step:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
        q, k, v = (torch.randn(b, h, t, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))

        def step() -> None:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).float().square().mean().backward()

        return step

    return build


def graphed(build: Callable[[], Step], warmup: int = 3) -> Callable[[], Step]:
    """The same step captured once in a CUDA graph and replayed (removes launch overhead);
    ``warmup`` eager calls on a side stream first (lazy initialisation, cuBLAS workspaces)."""
    def build_graphed() -> Step:
        step = build()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        # the capture allocates from a private pool: hand the warm-up's cached blocks back first,
        # or a step that fills half the GPU (HOPE at 65,536 tokens) runs out of memory mid-capture
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph.replay

    return build_graphed


def _fla_kernels() -> bool:
    try:
        from nestlearn.loops import fla_backend
    except Exception:
        return False
    return fla_backend.kernels() is not None


def importable(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except Exception:
        return False


def cases(dev: torch.device, small: bool, only: set[str] | None, chunks: tuple[int, ...] = (),
          lengths: tuple[int, ...] = (), graph_warmup: int = 3) -> list[Case]:
    """Every row of the run; ``chunks``: also the bare delta rule at these chunk sizes;
    ``lengths``: the batch-1 sequence lengths of the GPT / SDPA / Titans-stack / HOPE rows;
    ``graph_warmup``: eager calls before a CUDA graph's capture."""
    gpu = dev.type == "cuda"
    lp = "bf16" if gpu else "fp32"  # CPU has no fast bf16; time the same graphs in fp32
    # whole specs train as `nestlearn run` does: fp32 weights under bf16 autocast (until the
    # fifteenth session they ran in bf16 weights, which kept HOPE off its fp32 kernels)
    amp = "bf16-amp" if gpu else "fp32"
    fla = gpu and _fla_kernels()  # our fla backend's rows (fla installed, CUDA)
    D = 512 if not small else 64
    out: list[Case] = []
    titans_sizes = [(8, 2048), (4, 8192), (1, 65536)] if not small else [(2, 128)]
    seqs = list(lengths) or ([2048, 8192, 16384, 32768, 65536] if not small else [128, 512])
    # batch 1 at every length of the HOPE rows, for bench/report.py's HOPE/GPT ratios and crossover
    gpt_sizes = [(8, 2048), (32, 2048)] + [(1, t) for t in seqs] if not small else [(2, 128), (1, 128)]
    tm = specs.titans_memory(D, 4, 64 if not small else 16)
    tm_remat = copy.deepcopy(tm)
    tm_remat["levels"]["memory"]["remat"] = 8
    for b, t in titans_sizes:
        out.append(Case("titans-memory", "nestlearn", b, t, "fp32", compiled_step(tm, b, t, "fp32", dev)))
        out.append(Case("titans-memory", "hand-written", b, t, "fp32", compiled_step(tm, b, t, "fp32", dev, True)))
        out.append(Case("titans-memory", "nestlearn-remat8", b, t, "fp32", compiled_step(tm_remat, b, t, "fp32", dev),
                        note="levels.memory.remat: 8 (backward recomputes per group of 8 chunks)"))
        out.append(Case("titans-memory", "nestlearn-compiled-step", b, t, "fp32",
                        compiled_step(tm, b, t, "fp32", dev, compile_steps=True),
                        note="chunk step through torch.compile (CompiledModel.compile_chunk_steps)"))
        if gpu and importable("titans_pytorch"):
            out.append(Case("titans-memory", "titans-pytorch", b, t, "fp32", titans_pytorch_step(b, t, dev),
                            note="defaults: dim_head 512 (16x our memory per head), gradients at the call's start weights"))
            out.append(Case("titans-memory", "titans-pytorch-dh128", b, t, "fp32", titans_pytorch_step(b, t, dev, 128),
                            note="our head size; gradients at the call's start weights (parallel over chunks)"))
            out.append(Case("titans-memory", "titans-pytorch-dh128-batch64", b, t, "fp32",
                            titans_pytorch_step(b, t, dev, 128, 64),
                            note="our head size and our math: weights updated after every chunk (batch_size=64)"))
    dn = specs.deltanet(D, 4, None if not small else 16)
    dn_sizes = [(8, 2048), (1, 65536)] if not small else [(2, 128)]
    for b, t in dn_sizes:
        out.append(Case("deltanet", "nestlearn", b, t, amp, compiled_step(dn, b, t, amp, dev),
                        note="whole spec: q/k/v/gate/out projections + delta rule"))
        if fla:
            out.append(Case("deltanet", "nestlearn+fla", b, t, amp, compiled_step(dn, b, t, amp, dev, fla=True),
                            note="whole spec, delta rule dispatched to fla (loops/fla_backend.py)"))
        out.append(Case("deltanet-kernel", "nestlearn", b, t, lp,
                        delta_kernel_step(b, t, 4, D // 4, dev, "torch"), note="bare delta rule, fp32 inside"))
        if gpu and importable("fla"):
            out.append(Case("deltanet-kernel", "fla", b, t, "bf16", delta_kernel_step(b, t, 4, D // 4, dev, "fla"),
                            note="fla chunk_delta_rule"))
        if fla:
            out.append(Case("deltanet-kernel", "nestlearn+fla", b, t, "bf16",
                            delta_kernel_step(b, t, 4, D // 4, dev, "nestlearn+fla"),
                            note="bare delta rule through fla_backend.run_fla"))
        for n in chunks:
            out.append(Case("deltanet-kernel", f"nestlearn-c{n}", b, t, lp,
                            delta_kernel_step(b, t, 4, D // 4, dev, "torch", n), note=f"bare delta rule, chunk {n}"))
    gpt = specs.transformer(D, 4 if not small else 2, 4)
    for b, t in gpt_sizes:
        out.append(Case("gpt", "nestlearn", b, t, amp, compiled_step(gpt, b, t, amp, dev)))
    sdpa_sizes = [(1, s) for s in seqs]
    for b, t in sdpa_sizes:
        out.append(Case("sdpa", "torch", b, t, lp, sdpa_step(b, t, 4, D // 4, dev)))
    stack = specs.titans_stack(D, 4 if not small else 2, 4, 64 if not small else 16)
    for t in seqs:
        out.append(Case("titans-stack", "nestlearn", 1, t, amp, compiled_step(stack, 1, t, amp, dev)))
    # the shipped chunks (main 16, generators 64), both at 16 (the first session's HOPE), both at 64
    # and the shipped chunks with remat on the levels that save the most per chunk (peak memory)
    hope_variants: dict[str, dict[str, Any]] = {
        "hope": {}, "hope-c16": {"gen_period": 16}, "hope-c64": {"period": 64, "gen_period": 64},
        "hope-remat": {"remat": {"selfmod": 8, "cms_fast": 8, "cms_mid": 2}}}
    for name, periods in hope_variants.items():
        hope = specs.hope(D, 4 if not small else 2, 4, **periods)
        if hope is None:
            continue
        # the shipped periods also at the GPT's batched sizes (the 8 x 2,048 and 32 x 2,048 rows)
        sizes = [(1, t) for t in (seqs[:1] if small else seqs)]
        if name in ("hope", "hope-remat") and not small:
            sizes = [(8, 2048), (32, 2048), *sizes]
        for b, t in sizes:
            note = ", ".join(f"{k}={v}" for k, v in periods.items())
            out.append(Case(name, "nestlearn", b, t, amp, compiled_step(hope, b, t, amp, dev), note=note))
            out.append(Case(name, "nestlearn-compiled-step", b, t, amp,
                            compiled_step(hope, b, t, amp, dev, compile_steps=True),
                            note=", ".join([*([note] if note else []), "chunk steps through torch.compile"])))
    if importable("nested_learning.model"):  # the peer HOPE (kmccleary3301 nested-learning 0.2.0)
        kd, kl = (D, 4) if not small else (D, 2)
        k_sizes = [(8, 2048), (1, 2048), (1, 16384), (1, 65536)] if not small else [(1, 128)]
        # "kmccleary-hope": pilot.yaml as shipped (4 CMS levels); "kmccleary-hope-3cms": its first 3
        # CMS levels, the 71.5M-parameter model of the design brief's bar (dim 512, 4 layers)
        for impl, n_cms in (("kmccleary-hope", None), ("kmccleary-hope-3cms", 3)):
            n = kmccleary_hope_params(kd, kl, n_cms)
            kdt = "bf16" if gpu else "fp32"
            note = (f"nested-learning 0.2.0 HOPEModel, configs/pilot.yaml at dim {kd}, {kl} layers, vocab 256"
                    f"{', first 3 CMS levels' if n_cms else ''}, {n / 1e6:.1f}M params; plain fwd+bwd of the "
                    f"LM loss, no teach signal (no online updates); "
                    + ("fp32 weights, bf16 autocast (pilot train.mixed_precision)" if gpu else "fp32"))
            for b, t in k_sizes:
                out.append(Case("hope", impl, b, t, kdt, kmccleary_hope_step(b, t, dev, kd, kl, n_cms),
                                note=note, extra={"params": n}))
    if gpu:  # the same steps replayed from a CUDA graph
        for c in list(out):
            graphable = ("titans-memory", "deltanet", "deltanet-kernel", "titans-stack", "gpt", *hope_variants)
            if c.impl.startswith("nestlearn") and c.name in graphable:
                out.append(Case(c.name, c.impl + "+graph", c.batch, c.seq, c.dtype, graphed(c.build, graph_warmup),
                                c.note))
    if only:
        out = [c for c in out if c.name in only or c.impl in only or f"{c.name}:{c.impl}" in only]
    return out
