"""``nestlearn run --cuda-graph``: the training step captured in a CUDA graph and replayed.

CPU (always): the flag's errors (no CUDA device, --carry-state, torchrun), its
plumbing through the config and ``--resume``, and the trainer's use of ``GraphedStep`` with
``torch.cuda``'s graph API replaced by an emulation (a "replay" recomputes the captured body
and writes the results into the captured tensors, as a real replay does).

GPU (skipped without CUDA): real capture and replay give the same gradients and losses as eager
execution in fp32, with and without gradient accumulation, for the tiny Titans-like spec and a
tiny HOPE; a CLI run with the flag (bf16) completes, writes its metrics and resumes.

    python -m pytest -q tests/test_cuda_graph.py        # on a machine with a GPU: all of them
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import nestlearn
from nestlearn.tasks import Batch
from nestlearn.train import TrainConfig, Trainer, TrainError, read_metrics
from nestlearn.train import cuda_graph as cg
from nestlearn.train.build import build_model
from nestlearn.train.cuda_graph import GraphedStep, check_supported
from nestlearn.train.reporting import SilentReporter
from tests.cli_run import nl

ROOT = Path(__file__).resolve().parents[1]
TINY = Path(__file__).parent / "data" / "tiny_run.yaml"
HOPE = ROOT / "models" / "hope.yaml"
FAST = ["--batch", "4", "--seq-len", "32", "--threads", "1", "-q"]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _specs() -> list[Any]:
    out = [pytest.param(TINY, [], id="tiny-titans")]
    if HOPE.exists():
        out.append(pytest.param(HOPE, ["model.dim=32", "model.depth=1"], id="tiny-hope"))
    return out


def _compiling(model: Any) -> bool:
    """Whether ``model``'s in-context levels run their chunk steps through torch.compile."""
    return all(lv.compile_chunk_steps for lv in model.levels.values() if not lv.is_outer)


def _released(model: Any) -> bool:
    return not any(lv.compile_chunk_steps for lv in model.levels.values())


def _train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]


def _grad_norms(run: Path) -> list[float]:
    """(Adam hides a wrong gradient scale from the losses; the gradient norm shows it.)"""
    return [r["grad_norm"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]


# ----------------------------------------------------------------------------- CPU: errors and plumbing


def test_cuda_graph_on_cpu_is_one_clear_error(tmp_path: Path) -> None:
    code, out = nl("run", TINY, "--device", "cpu", "--cuda-graph", "--steps", "2", *FAST, "--out", tmp_path / "r")
    assert code == 1, out
    assert "error: --cuda-graph:" in out and "CUDA device" in out, out
    assert len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "r" / "metrics.jsonl").exists() and not (tmp_path / "r" / "checkpoints").exists()


def test_cuda_graph_refuses_carry_state(tmp_path: Path) -> None:
    code, out = nl("run", TINY, "--device", "cpu", "--cuda-graph", "--carry-state", "--steps", "2", *FAST,
                   "--out", tmp_path / "r")
    assert code == 1, out
    assert "--cuda-graph" in out and "--carry-state" in out and "use one of them" in out, out
    assert len(out.strip().splitlines()) == 1, out


def test_check_supported() -> None:
    check_supported(False, "cpu", 4, cuda_available=False)  # the flag off: nothing to check
    check_supported(True, "auto", 1, cuda_available=True)
    check_supported(True, "cuda", 1, cuda_available=True)
    for device, cuda in (("cpu", True), ("auto", False), ("cuda", False)):
        with pytest.raises(TrainError, match="--cuda-graph: CUDA graphs need a CUDA device"):
            check_supported(True, device, 1, cuda_available=cuda)
    with pytest.raises(TrainError, match="--cuda-graph: not supported with several processes"):
        check_supported(True, "auto", 2, cuda_available=True)


def test_config_plumbing(tmp_path: Path) -> None:
    from nestlearn.cli.run_cmds import _resolve_config

    assert TrainConfig().cuda_graph is False
    cfg = TrainConfig(cuda_graph=True)
    cfg.check()
    assert TrainConfig.from_dict(cfg.to_dict()).cuda_graph is True
    old = {k: v for k, v in cfg.to_dict().items() if k != "cuda_graph"}  # a config.json from before the flag
    assert TrainConfig.from_dict(old).cuda_graph is False
    _, config, _, _, _ = _resolve_config(str(TINY), [], False, str(tmp_path / "r"), {"cuda_graph": True})
    assert config.cuda_graph is True


def test_resume_a_cuda_graph_run_on_cpu_with_no_cuda_graph(tmp_path: Path) -> None:
    run = tmp_path / "r"
    code, out = nl("run", TINY, "--device", "cpu", "--steps", "2", *FAST, "--out", run)
    assert code == 0, out
    path = run / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "cuda_graph": True}))  # as if run on a GPU
    code, out = nl("run", run, "--resume", "--steps", "3")
    assert code == 1 and "--cuda-graph" in out and "--no-cuda-graph" in out, out
    code, out = nl("run", run, "--resume", "--steps", "3", "--no-cuda-graph", "-q")
    assert code == 0, out
    assert json.loads((run / "summary.json").read_text())["step"] == 3
    assert json.loads(path.read_text())["cuda_graph"] is False


# ----------------------------------------------------------------------------- CPU: the trainer, graph API emulated


_REAL_BODY = GraphedStep._body


class _FakeStream:
    def __init__(self, device: Any = None) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass


class _FakeGraph:
    """``torch.cuda.CUDAGraph`` stand-in: ``replay`` reruns the captured step's body with no
    gradients and copies every result into the tensors the capture produced."""

    capturing: _FakeGraph | None = None

    def __init__(self) -> None:
        self.step: GraphedStep | None = None

    def replay(self) -> None:
        step = self.step
        assert step is not None and step._out is not None
        held = [p.grad for p in step.params]
        for p in step.params:
            p.grad = None
        out, state = _REAL_BODY(step)
        step._out.copy_(out)
        leaves = torch.utils._pytree.tree_leaves
        for a, b in zip(leaves(step._state), leaves(state), strict=True):
            if isinstance(a, torch.Tensor) and not any(s == 0 for s in a.stride()):  # not broadcast views
                a.copy_(b)
        for p, g in zip(step.params, step._grads, strict=True):
            if g is not None:
                g.copy_(p.grad)
        for p, h in zip(step.params, held, strict=True):
            p.grad = h


@contextlib.contextmanager
def _fake_capture(graph: _FakeGraph) -> Iterator[None]:
    _FakeGraph.capturing = graph
    try:
        yield
    finally:
        _FakeGraph.capturing = None


def _recording_body(self: GraphedStep) -> Any:
    if _FakeGraph.capturing is not None:
        _FakeGraph.capturing.step = self
    return _REAL_BODY(self)


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _fake_capture)
    monkeypatch.setattr(GraphedStep, "_body", _recording_body)
    monkeypatch.setattr("nestlearn.train.loop.check_supported", lambda *a, **k: None)


class _Messages(SilentReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)

    def end(self, summary: dict[str, Any]) -> None:
        pass


def _fit(spec: Any, out: Path, **kw: Any) -> tuple[Trainer, _Messages]:
    msgs = _Messages()
    cfg = TrainConfig(**{"steps": 6, "eval_every": 3, "eval_batches": 1, "batch": 4, "seq_len": 32, "seed": 0, **kw})
    trainer = Trainer(spec, cfg, out, reporter=msgs)
    trainer.fit()
    return trainer, msgs


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize(("path", "overrides"), _specs())
def test_trainer_replays_the_graph_with_eager_results(emulated: None, tmp_path: Path, path: Path,
                                                      overrides: list[str], accum: int) -> None:
    spec = nestlearn.load_spec(path, overrides)
    _fit(spec, tmp_path / "eager", device="cpu", threads=1, accum=accum)
    trainer, msgs = _fit(spec, tmp_path / "graph", device="cpu", threads=1, accum=accum, cuda_graph=True)
    assert trainer.graphed is not None and trainer.graphed.captured
    # every step replays the graph; steps 3 and 6 (evaluation / last, logged) take the level
    # stats from a no-grad forward (an eager training step beside the graph's pool ran out of memory)
    assert trainer.graphed.replays == 6 * accum
    assert msgs.lines == [cg.NOTE]
    eager, graph = _train_losses(tmp_path / "eager"), _train_losses(tmp_path / "graph")
    assert len(graph) == 6
    assert graph == pytest.approx(eager, rel=1e-6, abs=1e-7)
    assert _grad_norms(tmp_path / "graph") == pytest.approx(_grad_norms(tmp_path / "eager"), rel=1e-6, abs=1e-7)
    recs = [r for r in read_metrics(tmp_path / "graph" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in recs if "levels" in r] == [3, 6]
    eager_recs = {r["step"]: r for r in read_metrics(tmp_path / "eager" / "metrics.jsonl") if r["split"] == "train"}
    for got in [r for r in recs if "levels" in r]:
        want = eager_recs[got["step"]]
        assert set(got["levels"]) == set(want["levels"])
        for level, vals in want["levels"].items():
            assert got["levels"][level] == pytest.approx(vals, rel=1e-5, abs=1e-7), (got["step"], level)
    assert (tmp_path / "graph" / "checkpoints" / "last.safetensors").exists()


def test_compile_with_cuda_graph_compiles_only_the_chunk_steps(emulated: None, tmp_path: Path) -> None:
    """``--compile --cuda-graph``: the chunk steps are compiled and run inside the captured step,
    the rest of the model stays as the graph captures it; same results as eager; released after."""
    from nestlearn.loops import chunks, dual

    spec = nestlearn.load_spec(TINY)
    _fit(spec, tmp_path / "eager", device="cpu", threads=1)
    seen: list[bool] = []
    calls: list[int] = []
    real_capture, real_compiled = GraphedStep.capture, chunks.compiled

    def capture(self: GraphedStep, *a: Any, **k: Any) -> None:
        seen.append(_compiling(self.model))
        real_capture(self, *a, **k)

    def counting(eager: Any) -> Any:  # count the compiled chunk step's calls
        fn = real_compiled(eager)
        return (lambda *a: calls.append(1) or fn(*a)) if eager is dual._segment else fn

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GraphedStep, "capture", capture)
        mp.setattr(chunks, "compiled", counting)
        trainer, msgs = _fit(spec, tmp_path / "graph", device="cpu", threads=1, cuda_graph=True, compile=True)
    assert seen == [True] and calls  # the captured step runs the compiled chunk step
    assert trainer.compiled is not None and trainer.compiled.active
    assert trainer.fwd is trainer.model  # the outer model is not torch.compile'd under a graph
    assert trainer.graphed is not None and trainer.graphed.replays == 6  # every step replays, the stats steps too
    assert any("chunk step" in m and "captured by --cuda-graph" in m for m in msgs.lines), msgs.lines
    assert not any("failed" in m for m in msgs.lines), msgs.lines
    assert _released(trainer.model)  # released at the end
    graph, eager = _train_losses(tmp_path / "graph"), _train_losses(tmp_path / "eager")
    assert graph == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert _grad_norms(tmp_path / "graph") == pytest.approx(_grad_norms(tmp_path / "eager"), rel=1e-4, abs=1e-6)


def _fake_chunk_steps(mp: pytest.MonkeyPatch, fail: Any = None) -> list[bool]:
    """Make the "compiled" chunk steps (``chunks.compiled``) the eager ones (no minutes of
    inductor on a CPU), each raising where ``fail()`` says the compiler would. Returns a list
    that gets one entry per call of a compiled step."""
    from nestlearn.loops import chunks

    calls: list[bool] = []

    def compiled(eager: Any) -> Any:
        def step(*a: Any) -> Any:
            calls.append(True)
            if fail is not None and fail():
                raise RuntimeError("BackendCompilerFailed: backend='inductor' raised: simulated")
            return eager(*a)

        return step

    mp.setattr(chunks, "compiled", compiled)
    return calls


def test_compile_failure_in_the_graph_warmup_falls_back_and_captures_eagerly(emulated: None,
                                                                             tmp_path: Path) -> None:
    """``--compile --cuda-graph`` where the compiler fails at the first compiled chunk step (in the
    capture's warm-up): said once, the step is redone eagerly and the graph captures the eager
    chunk steps; the results equal an eager run's and nothing stays switched on."""
    spec = nestlearn.load_spec(TINY)
    _fit(spec, tmp_path / "eager", device="cpu", threads=1)
    captured_with: list[bool] = []
    real_capture = GraphedStep.capture

    def capture(self: GraphedStep, *a: Any, **k: Any) -> None:
        real_capture(self, *a, **k)
        captured_with.append(_compiling(self.model))

    with pytest.MonkeyPatch.context() as mp:
        calls = _fake_chunk_steps(mp, fail=lambda: True)
        mp.setattr(GraphedStep, "capture", capture)
        trainer, msgs = _fit(spec, tmp_path / "graph", device="cpu", threads=1, cuda_graph=True, compile=True)
    assert len(calls) == 1  # the first call failed; none after the fall-back
    failed = [m for m in msgs.lines if "failed" in m]
    assert len(failed) == 1 and "torch.compile failed" in failed[0] and "simulated" in failed[0], msgs.lines
    assert trainer.compiled is not None and not trainer.compiled.active
    assert captured_with == [False]  # the capture that succeeded ran the eager chunk steps
    assert trainer.graphed is not None and trainer.graphed.replays == 6  # every step replays, the stats steps too
    assert _released(trainer.model)
    graph, eager = _train_losses(tmp_path / "graph"), _train_losses(tmp_path / "eager")
    assert len(graph) == 6 and graph == pytest.approx(eager, rel=1e-6, abs=1e-7)
    assert _grad_norms(tmp_path / "graph") == pytest.approx(_grad_norms(tmp_path / "eager"), rel=1e-6, abs=1e-7)


def test_compile_failure_first_met_in_evaluation_falls_back(emulated: None, tmp_path: Path) -> None:
    """The chunk step's no-grad variant is first compiled by a no-grad pass (the stats forward of
    step 3, before its evaluation; the graphed training steps compiled only the grad one); a
    compiler failure there falls back too, instead of ending the run with the compiler's exception."""
    spec = nestlearn.load_spec(TINY)
    _fit(spec, tmp_path / "eager", device="cpu", threads=1)
    with pytest.MonkeyPatch.context() as mp:
        calls = _fake_chunk_steps(mp, fail=lambda: not torch.is_grad_enabled())
        trainer, msgs = _fit(spec, tmp_path / "graph", device="cpu", threads=1, cuda_graph=True, compile=True)
    assert calls
    failed = [m for m in msgs.lines if "failed" in m]
    assert len(failed) == 1 and "torch.compile failed" in failed[0], msgs.lines
    assert trainer.compiled is not None and not trainer.compiled.active
    assert trainer.graphed is not None and trainer.graphed.replays == 7  # keeps replaying; step 3 twice: the fall-back redoes it
    summary = json.loads((tmp_path / "graph" / "summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == 6
    val = [r["loss"] for r in read_metrics(tmp_path / "graph" / "metrics.jsonl") if r["split"] == "val"]
    val_eager = [r["loss"] for r in read_metrics(tmp_path / "eager" / "metrics.jsonl") if r["split"] == "val"]
    assert len(val) == 2 and val == pytest.approx(val_eager, rel=1e-6, abs=1e-7)
    assert _train_losses(tmp_path / "graph") == pytest.approx(_train_losses(tmp_path / "eager"), rel=1e-6, abs=1e-7)


def test_resume_a_compile_cuda_graph_run(emulated: None, tmp_path: Path) -> None:
    """``nestlearn run RUN --resume`` of a ``--compile --cuda-graph`` run stopped at step 3: the
    resumed session compiles the chunk steps and captures again, and the run's losses equal an
    uninterrupted eager run's."""
    eager, run = tmp_path / "eager", tmp_path / "r"
    every = ["--eval-every", "3", "--eval-batches", "1"]  # steps 1, 2, 4, 5 replay the graph
    code, out = nl("run", TINY, "--device", "cpu", "--steps", "6", *every, *FAST, "--out", eager)
    assert code == 0, out
    captures: list[bool] = []
    real_capture = GraphedStep.capture

    def capture(self: GraphedStep, *a: Any, **k: Any) -> None:
        captures.append(_compiling(self.model))
        real_capture(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        calls = _fake_chunk_steps(mp)
        mp.setattr(GraphedStep, "capture", capture)
        code, out = nl("run", TINY, "--device", "cpu", "--compile", "--cuda-graph", "--steps", "6", "--stop-at", "3",
                       *every, *FAST, "--out", run)
        assert code == 0, out
        config = json.loads((run / "config.json").read_text())
        assert config["compile"] is True and config["cuda_graph"] is True
        assert json.loads((run / "summary.json").read_text())["step"] == 3
        n_first = len(calls)
        code, out = nl("run", run, "--resume", "-q")
        assert code == 0, out
    assert captures == [True, True] and len(calls) > n_first  # each session compiled and captured
    assert json.loads((run / "summary.json").read_text())["step"] == 6
    assert _released(build_model(nestlearn.load_spec(TINY)))  # a later model runs eagerly (off by default)
    assert _train_losses(run) == pytest.approx(_train_losses(eager), rel=1e-6, abs=1e-7)
    assert _grad_norms(run) == pytest.approx(_grad_norms(eager), rel=1e-6, abs=1e-7)


def test_a_failure_after_compiling_releases_the_chunk_steps(emulated: None, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainer setup compiles last: a setup error leaves no chunk step compiled."""
    from nestlearn.tasks import TaskError
    from nestlearn.tasks.text import CorpusLM
    from nestlearn.train import loop

    def no_eval(*a: Any, **k: Any) -> Any:
        raise TaskError("lm: the validation split is too short (simulated)")

    compiled: list[Any] = []  # the models compile_model switched on
    real = loop.compile_model
    monkeypatch.setattr(loop, "compile_model", lambda model, *a, **k: compiled.append(model) or real(model, *a, **k))
    monkeypatch.setattr(CorpusLM, "eval_batches", no_eval)
    _fake_chunk_steps(monkeypatch)
    with pytest.raises(TaskError, match="simulated"):
        _fit(nestlearn.load_spec(TINY), tmp_path / "r", device="cpu", threads=1, cuda_graph=True, compile=True)
    assert all(_released(m) for m in compiled)
    assert _released(build_model(nestlearn.load_spec(TINY)))  # a later model runs eagerly (off by default)


def test_fall_back_keeps_the_ddp_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Compiled.fall_back`` returns to the module the trainer wrapped (DDP under torchrun), not
    to the bare model, whose steps would skip the gradient all-reduce."""
    from nestlearn.train.compiling import compile_model

    model = build_model(nestlearn.load_spec(TINY))
    wrapper = torch.nn.Sequential(model)  # stands in for DistributedDataParallel(model)
    monkeypatch.setattr(torch, "compile", lambda m, **k: torch.nn.Sequential(m) if isinstance(m, torch.nn.Module) else m)
    _fake_chunk_steps(monkeypatch)
    for outer in (True, False):
        compiled = compile_model(model, wrapper, outer=outer)
        assert (compiled.fwd is not wrapper) == outer
        compiled.fall_back(RuntimeError("simulated"))
        assert compiled.fwd is wrapper and not compiled.active
    compiled = compile_model(model, outer=True)
    compiled.fall_back(RuntimeError("simulated"))
    assert compiled.fwd is model


def test_graphed_step_fits_and_install_grads(emulated: None) -> None:
    torch.manual_seed(0)
    model = build_model(nestlearn.load_spec(TINY))
    step = GraphedStep(model, None, scaled=False, warmup=1)
    full = torch.randint(0, 256, (4, 17))
    mb = Batch.from_sequences(full)
    assert step.fits(mb)  # anything fits before the capture
    step.capture(mb, 1.0 / 16)
    assert step.fits(mb) and not step.fits(Batch.from_sequences(full[:2]))
    assert all(p.grad is None for p in step.params)  # warm-up and capture leave no gradient behind
    with pytest.raises(ValueError, match="does not fit"):
        step.run(Batch.from_sequences(full[:, :9]), 1.0)
    # eager reference: two micro-batches accumulated by autograd
    halves = [Batch.from_sequences(full[:2]), Batch.from_sequences(full[2:])]
    ref_step = GraphedStep(model, None, scaled=False, warmup=0)  # only to reuse _body's arithmetic
    for h in halves:
        ref_step._load(h, 1.0 / 32, None)
        _REAL_BODY(ref_step)
    ref = [p.grad.clone() if p.grad is not None else None for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    two = GraphedStep(model, None, scaled=False, warmup=1)
    for i, h in enumerate(halves):
        two.run(h, 1.0 / 32)
        two.install_grads(i, 2)
        if i == 0:
            assert all(p.grad is None for p in two.params)  # the sum is installed after the last one
    for p, r in zip(two.params, ref, strict=True):
        if r is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, r, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- GPU: real capture


def _eager_grads(model: torch.nn.Module, mb: Batch, factor: float) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    logits, _ = model(mb.inputs, None)
    ce = F.cross_entropy(logits.float().flatten(0, 1), mb.targets.flatten(), reduction="none")
    ce_sum = (ce * mb.mask.flatten()).sum()
    (ce_sum * factor).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return ce_sum.detach(), grads


@needs_cuda
def test_gpu_replay_gives_eager_gradients_on_new_data() -> None:
    torch.manual_seed(0)
    model = build_model(nestlearn.load_spec(TINY)).cuda()
    g = torch.Generator().manual_seed(1)
    batches = [Batch.from_sequences(torch.randint(0, 256, (4, 33), generator=g)).to("cuda") for _ in range(3)]
    step = GraphedStep(model, None, scaled=False)
    for mb in [*batches, batches[0]]:  # new data each replay, then the first batch again
        out, _ = step.run(mb, 1.0 / 128)
        step.install_grads(0, 1)
        got_loss = out[0].clone()
        got = [None if p.grad is None else p.grad.clone() for p in step.params]
        loss, want = _eager_grads(model, mb, 1.0 / 128)
        torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-5)
        for a, b in zip(got, want, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # fresh each replay, not accumulated
    assert step.replays == 4


@needs_cuda
@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize(("path", "overrides"), _specs())
def test_gpu_training_with_cuda_graph_matches_eager(tmp_path: Path, path: Path, overrides: list[str],
                                                    accum: int) -> None:
    spec = nestlearn.load_spec(path, overrides)
    kw = {"device": "cuda", "precision": "fp32", "accum": accum}
    _fit(spec, tmp_path / "eager", **kw)
    trainer, msgs = _fit(spec, tmp_path / "graph", cuda_graph=True, **kw)
    assert not any("failed" in m for m in msgs.lines), msgs.lines
    assert trainer.graphed is not None and trainer.graphed.replays == 6 * accum  # every step, the stats steps too
    eager, graph = _train_losses(tmp_path / "eager"), _train_losses(tmp_path / "graph")
    assert len(graph) == 6 and all(math.isfinite(x) for x in graph)
    assert graph == pytest.approx(eager, rel=1e-4, abs=1e-5)
    assert _grad_norms(tmp_path / "graph") == pytest.approx(_grad_norms(tmp_path / "eager"), rel=1e-4, abs=1e-6)


@needs_cuda
@pytest.mark.parametrize(("path", "overrides"), _specs())
def test_gpu_compile_with_cuda_graph_matches_eager(tmp_path: Path, path: Path, overrides: list[str]) -> None:
    spec = nestlearn.load_spec(path, overrides)
    kw = {"device": "cuda", "precision": "fp32"}
    _fit(spec, tmp_path / "eager", **kw)
    trainer, msgs = _fit(spec, tmp_path / "graph", cuda_graph=True, compile=True, **kw)
    assert not any("failed" in m for m in msgs.lines), msgs.lines
    assert trainer.compiled is not None and trainer.compiled.active
    assert trainer.graphed is not None and trainer.graphed.replays == 6  # every step replays, the stats steps too
    graph = _train_losses(tmp_path / "graph")
    assert all(math.isfinite(x) for x in graph)
    assert graph == pytest.approx(_train_losses(tmp_path / "eager"), rel=1e-4, abs=1e-5)


@needs_cuda
def test_gpu_fp16_with_grad_scaler_trains(tmp_path: Path) -> None:
    spec = nestlearn.load_spec(TINY)
    _fit(spec, tmp_path / "eager", device="cuda", precision="fp16")
    trainer, msgs = _fit(spec, tmp_path / "graph", device="cuda", precision="fp16", cuda_graph=True)
    assert not any("failed" in m for m in msgs.lines), msgs.lines
    assert trainer.graphed is not None and trainer.graphed.replays == 6  # every step replays, the stats steps too
    assert _train_losses(tmp_path / "graph") == pytest.approx(_train_losses(tmp_path / "eager"), rel=1e-3, abs=1e-3)


@needs_cuda
def test_gpu_cli_run_with_cuda_graph_writes_metrics_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "r"
    args = ["--batch", "4", "--seq-len", "64", "--eval-every", "6", "--eval-batches", "1"]
    code, out = nl("run", TINY, "--steps", "12", "--cuda-graph", *args, "--out", run)  # bf16 by default on CUDA
    assert code == 0, out
    assert out.count("--cuda-graph: each step's forward") == 1 and "failed" not in out, out
    recs = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in recs)
    assert [r["step"] for r in recs if "levels" in r] == [6, 12]  # the eager (evaluation) steps
    assert json.loads((run / "config.json").read_text())["cuda_graph"] is True
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "done" and s["train"]["loss"] < s["first_loss"]
    code, out = nl("run", run, "--resume", "--steps", "14", "-q")  # a new process would capture anew
    assert code == 0, out
    assert json.loads((run / "summary.json").read_text())["step"] == 14


@pytest.mark.parametrize(("path", "want"), [(TINY, True), (ROOT / "specs" / "transformer.yaml", False)])
def test_launch_bound_hint_only_for_in_context_specs_on_cuda(tmp_path: Path, path: Path, want: bool) -> None:
    """An eager CUDA run of a spec with in-context levels is told once about --cuda-graph."""
    trainer = Trainer(nestlearn.load_spec(path, ["model.dim=32", "model.depth=1"]),
                      TrainConfig(steps=1, batch=2, seq_len=16, device="cpu", threads=1), tmp_path / "r")
    trainer.setup()
    assert not trainer._launch_bound_hint()  # a CPU run: no hint
    trainer.device = torch.device("cuda")  # only its type is read
    assert trainer._launch_bound_hint() is want
    trainer.config.carry_state = True  # --cuda-graph refuses it: no hint either
    assert not trainer._launch_bound_hint()
