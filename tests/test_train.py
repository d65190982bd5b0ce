"""The outer loop, checkpoints, metrics and run directories (nestlearn.train), through the API."""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import nestlearn
from nestlearn.train import (
    CheckpointError,
    DivergedError,
    TrainConfig,
    Trainer,
    TrainError,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    train,
)
from nestlearn.train.build import build_model, lr_at
from nestlearn.train.checkpoint import flatten_tree, unflatten_tree

TINY = Path(__file__).parent / "data" / "tiny_run.yaml"
SMALL = dict(batch=4, seq_len=32, threads=1)


@pytest.fixture(scope="module")
def spec() -> Any:
    return nestlearn.load_spec(TINY)


def _strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")} for r in records]


def _model_tensors(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(run / "checkpoints" / "last.safetensors").items() if not k.startswith("rng/")}


# ----------------------------------------------------------------------------- the loop


def test_tiny_run_learns_and_writes_the_run_directory(spec: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    s = train(spec, TrainConfig(steps=40, **SMALL), out)
    assert s["status"] == "done" and s["step"] == 40
    assert s["train"]["loss"] < s["first_loss"] - 1.0, s  # byte LM from ~5.5 nats: visibly learning
    assert s["val"]["loss"] < 4.5 and math.isclose(s["val"]["bits_per_byte"], s["val"]["loss"] / math.log(2))
    for name in ("spec.yaml", "config.json", "metrics.jsonl", "summary.json", "checkpoints/last.safetensors"):
        assert (out / name).exists(), name
    recs = read_metrics(out / "metrics.jsonl")
    train_recs = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, 41))
    r = train_recs[-1]
    assert {"loss", "bits_per_byte", "lr", "grad_norm", "tokens_per_s", "tokens"} <= set(r)
    assert r["levels"]["memory"]["update_norm"] > 0  # the in-context level moved its memory
    assert any(r["split"] == "val" for r in recs)
    # the resolved spec rebuilds the same model
    again = nestlearn.load_spec(out / "spec.yaml")
    assert again == spec
    assert json.loads((out / "summary.json").read_text())["status"] == "done"


def test_lr_schedule_warmup_then_cosine() -> None:
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


def test_outer_rule_is_the_optimizer(spec: Any) -> None:
    from nestlearn.train.build import build_optimizer

    model = build_model(spec)
    opt = build_optimizer(model, spec.levels["outer"].rule, None)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == pytest.approx(3e-3)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.01) and opt.param_groups[1]["weight_decay"] == 0
    sgd = nestlearn.load_spec(TINY, ["levels.outer.rule={name: momentum, lr: 0.1, beta: 0.5}"])
    opt = build_optimizer(build_model(sgd), sgd.levels["outer"].rule, 0.05)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.5
    assert opt.param_groups[0]["lr"] == 0.05


def test_gradient_accumulation_matches_the_full_batch(spec: Any, tmp_path: Path) -> None:
    a = train(spec, TrainConfig(steps=3, **SMALL), tmp_path / "a")
    b = train(spec, TrainConfig(steps=3, accum=2, **SMALL), tmp_path / "b")
    la = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["split"] == "train"]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if r["split"] == "train"]
    assert la == pytest.approx(lb, rel=1e-5)
    assert a["train"]["loss"] == pytest.approx(b["train"]["loss"], rel=1e-5)


def test_metrics_carry_each_level_s_inner_loss_and_update_norm(spec: Any, tmp_path: Path) -> None:
    """At a log step the trainer's record is what ``loops.stats`` reports for that forward."""
    from nestlearn.loops import stats

    t = Trainer(spec, TrainConfig(steps=1, **SMALL), tmp_path / "r")
    t.setup()
    batch = t.task.batch_at(0, 4, 32, 0)
    with torch.no_grad(), stats.collect() as st:
        t.model(batch.inputs)
    expect = stats.summarize(st)
    t._fit()
    rec = next(r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["split"] == "train")
    assert set(rec["levels"]) == {"memory"}
    assert set(rec["levels"]["memory"]) == {"inner_loss", "update_norm", "chunk_gain", "peak_gain"}
    assert rec["levels"]["memory"] == pytest.approx(expect["memory"], rel=1e-5)
    assert all(rec["levels"]["memory"][k] > 0 for k in ("inner_loss", "update_norm", "chunk_gain", "peak_gain"))


def _mlp_memory_case(seed: int) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """An 8 -> 16 -> 8 gelu MLP memory (one head), its weights, 24 tokens' keys, values and rates
    (float64)."""
    from nestlearn.memories import MLPMemory

    g = torch.Generator().manual_seed(seed)
    arch = MLPMemory(8, 8, 1, expand=2, depth=2, act="gelu", residual=False, bias=False)
    w = {"W0": torch.randn(1, 1, 16, 8, generator=g, dtype=torch.float64),
         "W1": torch.randn(1, 1, 8, 16, generator=g, dtype=torch.float64)}
    k, v = (torch.randn(1, 1, 24, 8, generator=g, dtype=torch.float64) for _ in range(2))
    return arch, w, k, v, torch.rand(1, 1, 24, generator=g, dtype=torch.float64) * 0.01


def test_chunk_gain_is_the_rate_times_the_chunk_movement_times_the_last_layer_input() -> None:
    """``loops.stats.chunk_gain``, written out by hand in float64 for an MLP memory under momentum:
    ``S(C, beta) * mean_t(lr_t |h_t|^2)``, ``h`` the hidden activations at the starting weights,
    ``S`` the momentum rule's accumulated step (``stability.accumulated_step``, checked against
    its own sum in tests/test_training_health.py)."""
    from nestlearn import objectives, rules, stability
    from nestlearn.loops import GradMode, MemoryProblem, stats

    arch, w, k, v, lr = _mlp_memory_case(0)
    pb = MemoryProblem(arch, rules.momentum(0.0, 0.5), objectives.l2, k, k, v, {"lr": lr, "beta": 0.5, "decay": 0.0},
                       8, GradMode("unroll"), gain_steps=stability.steps_of(8, 0.5))
    h = torch.nn.functional.gelu(k[0, 0] @ w["W0"][0, 0].T)
    movement = sum(sum(0.5**j for j in range(t)) for t in range(1, 9))  # S(8, 0.5)
    want = movement * float((lr[0, 0] * h.pow(2).sum(-1)).mean())
    inputs = stats.layer_inputs(pb, w)
    got = stats.chunk_gain(pb, inputs)
    assert got is not None and float(got) == pytest.approx(want, rel=1e-12)
    assert stats.chunk_gain(replace(pb, objective=objectives.dot), inputs) is None  # l2 only


def test_peak_gain_is_the_largest_token_s_rate_times_its_curvature_along_its_error() -> None:
    """``loops.stats.peak_gain`` (what a level's ``max_gain`` holds down), written out by hand in
    float64 for an MLP memory: for each token the whole gradient ``g`` of ``|W1 gelu(W0 k) - v|^2``
    by autograd, its curvature along the error ``|g|^2 / |2 e|^2``, times ``S lr_t``; the largest."""
    from nestlearn import objectives, rules
    from nestlearn.loops import GradMode, MemoryProblem, stats

    arch, w, k, v, lr = _mlp_memory_case(1)
    pb = MemoryProblem(arch, rules.sgd(0.0), objectives.l2, k, k, v, {"lr": lr, "decay": 0.0}, 8,
                       GradMode("unroll"), gain_steps=8.0)
    gains = []
    for t in range(24):
        w0, w1 = (w[n][0, 0].clone().requires_grad_() for n in ("W0", "W1"))
        e = w1 @ torch.nn.functional.gelu(w0 @ k[0, 0, t]) - v[0, 0, t]
        g0, g1 = torch.autograd.grad(e.pow(2).sum(), (w0, w1))
        curvature = (g0.pow(2).sum() + g1.pow(2).sum()) / (2 * e.detach()).pow(2).sum()
        gains.append(8.0 * lr[0, 0, t] * curvature)
    got = stats.peak_gain(pb, w)
    assert got is not None and float(got) == pytest.approx(float(max(gains)), rel=1e-12)


def test_a_level_past_gain_one_is_said_once_unless_clipped() -> None:
    """``Steps._warn_gains``: one message per level whose chunk gain passes 1, none for a level
    with a ``clip`` or a ``max_gain`` or below 1."""
    from types import SimpleNamespace

    from nestlearn.train.step import Steps

    said: list[tuple[str, str]] = []
    levels = {"fast": SimpleNamespace(clip=None, max_gain=None), "clipped": SimpleNamespace(clip=1.0, max_gain=None),
              "capped": SimpleNamespace(clip=None, max_gain=0.5), "calm": SimpleNamespace(clip=None, max_gain=None)}
    host = SimpleNamespace(spec=SimpleNamespace(levels=levels), _say_once=lambda key, text: said.append((key, text)))
    stats_ = {"fast": {"chunk_gain": 1.7}, "clipped": {"chunk_gain": 3.0}, "capped": {"chunk_gain": 3.0},
              "calm": {"chunk_gain": 0.4}, "outer": {}}
    Steps._warn_gains(host, 10, stats_)  # type: ignore[arg-type]
    assert [key for key, _ in said] == ["gain:fast"]
    assert "level 'fast' has chunk gain 1.70 > 1" in said[0][1] and "levels.fast.max_gain" in said[0][1]


def test_inner_stats_are_collected_only_at_log_steps(spec: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from nestlearn.loops import stats

    calls: list[str] = []
    real = stats.record

    def counting(pb: Any, before: Any, after: Any) -> None:
        calls.append(pb.level)
        real(pb, before, after)

    monkeypatch.setattr(stats, "record", counting)
    train(spec, TrainConfig(steps=7, log_every=3, **SMALL), tmp_path / "r")
    recs = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in recs] == [3, 6, 7] and all("levels" in r for r in recs)
    assert calls == ["memory"] * 3  # one memory, recorded at steps 3, 6 and 7 only


# ----------------------------------------------------------------------------- torch.compile


class _Messages:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def start(self, info: dict[str, Any]) -> None: ...

    def step(self, rec: dict[str, Any]) -> None: ...

    def eval(self, rec: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None:
        self.messages.append(text)

    def end(self, summary: dict[str, Any]) -> None: ...


def _train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]


def test_compile_equals_eager_with_the_inner_loops_left_eager(spec: Any, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = dict(steps=3, eval_every=3, **SMALL)
    train(spec, TrainConfig(**cfg), tmp_path / "eager")
    rep = _Messages()
    from nestlearn.loops import chunks

    calls: list[int] = []
    real = chunks.compiled
    monkeypatch.setattr(chunks, "compiled", lambda eager: (lambda fn: lambda *a: calls.append(1) or fn(*a))(real(eager)))
    trainer = Trainer(spec, TrainConfig(**cfg, compile=True), tmp_path / "compiled", reporter=rep)
    s = trainer.fit()
    assert calls  # --compile: the in-context level took the compiled chunk step
    assert s["status"] == "done"
    assert rep.messages == ["--compile: the inner loops of level 'memory' run their chunk loop eagerly with the "
                            "closed-form chunk step (sgd / momentum / decay / dgd rules) compiled; everything else is "
                            "compiled"]
    assert _train_losses(tmp_path / "compiled") == pytest.approx(_train_losses(tmp_path / "eager"), rel=1e-4)
    eager = read_metrics(tmp_path / "eager" / "metrics.jsonl")[-2]["levels"]["memory"]
    compiled = read_metrics(tmp_path / "compiled" / "metrics.jsonl")[-2]["levels"]["memory"]
    assert compiled == pytest.approx(eager, rel=1e-4)  # the eager inner loops still record their stats
    # released at the end of the run: the model's inner loops run eagerly again
    assert not any(lv.compile_chunk_steps for lv in trainer.model.levels.values())


def test_a_compiler_failure_is_said_once_and_the_run_goes_on_eagerly(spec: Any, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_backend(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("this backend cannot lower aten.mm")

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=broken_backend))
    from nestlearn.loops import chunks  # the chunk steps compiled by the broken compiler: a cache of their own

    monkeypatch.setattr(chunks, "compiled", functools.cache(chunks.compiled.__wrapped__))
    cfg = dict(steps=3, eval_every=3, **SMALL)
    rep = _Messages()
    s = Trainer(spec, TrainConfig(**cfg, compile=True), tmp_path / "c", reporter=rep).fit()
    assert s["status"] == "done"
    fails = [m for m in rep.messages if "failed" in m]
    assert len(fails) == 1 and "cannot lower aten.mm" in fails[0] and "continuing without compilation" in fails[0]
    train(spec, TrainConfig(**cfg), tmp_path / "e")
    assert _train_losses(tmp_path / "c") == pytest.approx(_train_losses(tmp_path / "e"), rel=1e-6)


# ----------------------------------------------------------------------------- resume


def test_resume_gives_exactly_the_uninterrupted_run(spec: Any, tmp_path: Path) -> None:
    cfg = dict(steps=12, eval_every=4, ckpt_every=5, **SMALL)
    train(spec, TrainConfig(**cfg), tmp_path / "full")
    first = train(spec, TrainConfig(**cfg, stop_at=7), tmp_path / "split")
    assert first["status"] == "stopped" and first["checkpoint_step"] == 7
    second = train(spec, TrainConfig(**cfg), tmp_path / "split", resume=True)
    assert second["status"] == "done" and second["step"] == 12
    a, b = _model_tensors(tmp_path / "full"), _model_tensors(tmp_path / "split")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # parameters and optimizer state
    assert _strip(read_metrics(tmp_path / "full" / "metrics.jsonl")) == \
        _strip(read_metrics(tmp_path / "split" / "metrics.jsonl"))


def test_time_limit_stops_with_an_evaluation_and_a_checkpoint_then_resumes(spec: Any, tmp_path: Path) -> None:
    """``time_limit``: the first step that ends past it is evaluated and saved (status stopped, the
    schedule of ``steps`` kept), and ``resume`` finishes the very run an uninterrupted one gives."""
    cfg = dict(steps=6, eval_every=6, **SMALL)
    first = train(spec, TrainConfig(**cfg, time_limit=1e-9), tmp_path / "split")
    assert first["status"] == "stopped" and first["checkpoint_step"] == 1
    vals = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if r.get("split") == "val"]
    assert vals == [1]
    second = train(spec, TrainConfig(**cfg), tmp_path / "split", resume=True)
    assert second["status"] == "done" and second["step"] == 6
    train(spec, TrainConfig(**cfg), tmp_path / "full")
    a, b = _model_tensors(tmp_path / "full"), _model_tensors(tmp_path / "split")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


class _StopAt:
    """A reporter that asks the trainer to stop (as Ctrl-C does) once ``step`` is reached."""

    def __init__(self, step: int) -> None:
        self.at = step
        self.trainer: Trainer | None = None

    def start(self, info: dict[str, Any]) -> None: ...

    def step(self, rec: dict[str, Any]) -> None:
        if rec["step"] == self.at and self.trainer is not None:
            self.trainer._stop = True

    def eval(self, rec: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...

    def end(self, summary: dict[str, Any]) -> None: ...


def test_interrupt_saves_and_resume_with_carried_state_is_exact(spec: Any, tmp_path: Path) -> None:
    cfg = dict(steps=8, carry_state=True, ckpt_every=100, **SMALL)
    train(spec, TrainConfig(**cfg), tmp_path / "full")
    rep = _StopAt(3)
    t = Trainer(spec, TrainConfig(**cfg), tmp_path / "int", reporter=rep)
    rep.trainer = t
    s = t.fit()
    assert s["status"] == "interrupted" and s["checkpoint_step"] == 3
    ck = load_checkpoint(tmp_path / "int" / "checkpoints" / "last.safetensors", spec)
    assert ck.step == 3 and isinstance(ck.carry, list) and ck.carry[0]["0"]["mem"]["mem"]["offset"] == 0
    assert ck.carry[0]["0"]["mem"]["mem"]["chunks"] == 12  # carried over 3 steps of 4 chunks: an int
    train(spec, TrainConfig(**cfg), tmp_path / "int", resume=True)
    a, b = _model_tensors(tmp_path / "full"), _model_tensors(tmp_path / "int")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(spec: Any, tmp_path: Path) -> None:
    train(spec, TrainConfig(steps=2, **SMALL), tmp_path / "r")
    with pytest.raises(TrainError, match="already holds a run"):
        train(spec, TrainConfig(steps=2, **SMALL), tmp_path / "r")
    with pytest.raises(TrainError, match="batch=4 but this run has 8"):
        train(spec, TrainConfig(steps=4, batch=8, seq_len=32, threads=1), tmp_path / "r", resume=True)
    with pytest.raises(TrainError, match="has no checkpoint|does not exist"):
        train(spec, TrainConfig(steps=2, **SMALL), tmp_path / "none", resume=True)


# ----------------------------------------------------------------------------- checkpoints


def test_tree_round_trip_keeps_types() -> None:
    tree = {"a": {"b": torch.arange(3.0), "n": 7, "e": {}, "none": None}, 3: [1.5, True, "x", (2, torch.ones(2))]}
    tensors, skel = flatten_tree(tree, "t")
    assert tensors["t/a/n"].dtype == torch.int64
    back = unflatten_tree(json.loads(json.dumps(skel)), tensors)
    assert back["a"]["n"] == 7 and isinstance(back["a"]["n"], int) and back["a"]["e"] == {}
    assert back[3][:3] == [1.5, True, "x"] and isinstance(back[3][3], tuple)
    assert torch.equal(back["a"]["b"], tree["a"]["b"])


def test_checkpoint_from_another_spec_is_refused(spec: Any, tmp_path: Path) -> None:
    model = build_model(spec)
    path = save_checkpoint(tmp_path / "c.safetensors", model=model, spec=spec, step=3)
    other = nestlearn.load_spec(TINY, ["model.dim=16"])
    with pytest.raises(CheckpointError, match=r"another spec.*\n.*model.dim: 32 -> 16"):
        load_checkpoint(path, other)
    assert load_checkpoint(path, spec).step == 3


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign"])
def test_corrupt_checkpoint_is_a_clear_error(spec: Any, tmp_path: Path, damage: str) -> None:
    path = save_checkpoint(tmp_path / "c.safetensors", model=build_model(spec), spec=spec, step=1)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        from safetensors.torch import save_file

        save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match="corrupt|not a nestlearn checkpoint"):
        load_checkpoint(path, spec)


def test_checkpoint_writes_are_atomic(spec: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(spec)
    path = save_checkpoint(tmp_path / "c.safetensors", model=model, spec=spec, step=1)
    before = path.read_bytes()

    def boom(*a: Any, **k: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, model=model, spec=spec, step=2)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]


# ----------------------------------------------------------------------------- divergence


def test_divergence_names_the_level_and_keeps_the_last_good_checkpoint(spec: Any, tmp_path: Path) -> None:
    out = tmp_path / "nan"
    train(spec, TrainConfig(steps=2, **SMALL), out)
    good = (out / "checkpoints" / "last.safetensors").read_bytes()
    hot = nestlearn.load_spec(TINY, ["levels.memory.rule.lr.max=1.0e6"])
    # same checkpoint but a spec whose memory diverges: resume is refused (another spec), so
    # train a fresh run that diverges at its first step
    with pytest.raises(DivergedError) as err:
        train(hot, TrainConfig(steps=3, ckpt_every=1, **SMALL), tmp_path / "hot")
    assert err.value.level == "memory" and err.value.step == 1
    assert "level 'memory'" in str(err.value) and "step 1" in str(err.value)
    # loops.stats tells that the memory's update (not its input) went non-finite
    assert "its inner loss was " in str(err.value) and "before the update, the update's norm is nan" in str(err.value)
    assert not (tmp_path / "hot" / "checkpoints" / "last.safetensors").exists()
    assert json.loads((tmp_path / "hot" / "summary.json").read_text())["status"] == "diverged"
    assert (out / "checkpoints" / "last.safetensors").read_bytes() == good


def test_divergence_after_a_checkpoint_keeps_it(spec: Any, tmp_path: Path) -> None:
    out = tmp_path / "late"
    with pytest.raises(DivergedError) as err:
        train(spec, TrainConfig(steps=30, lr=1e3, clip=0, ckpt_every=1, **SMALL), out)
    step = err.value.step
    assert step > 1 and f"step {step}" in str(err.value) and "last good checkpoint is kept" in str(err.value)
    ck = load_checkpoint(out / "checkpoints" / "last.safetensors", spec)
    assert ck.step == step - 1
    assert all(torch.isfinite(v).all() for v in ck.model.values())


# ----------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("kw, match", [
    (dict(batch=0), "--batch"), (dict(steps=0), "--steps"), (dict(device="gpu"), "--device"),
    (dict(precision="fp8"), "--precision"), (dict(accum=3), "--accum"), (dict(lr=-1.0), "--lr"),
    (dict(device="cuda"), "CUDA") if not torch.cuda.is_available() else (dict(batch=0), "--batch"),
    (dict(precision="fp16"), "CUDA") if not torch.cuda.is_available() else (dict(batch=0), "--batch"),
    (dict(stop_at=50, steps=10), "--stop-at"),
])
def test_bad_settings_are_clear_errors(spec: Any, tmp_path: Path, kw: dict[str, Any], match: str) -> None:
    cfg = {**SMALL, "steps": 2, **kw}
    with pytest.raises(TrainError, match=match):
        train(spec, TrainConfig(**cfg), tmp_path / "bad")
    assert not (tmp_path / "bad" / "checkpoints" / "last.safetensors").exists()


def test_synthetic_task_reports_accuracy(spec: Any, tmp_path: Path) -> None:
    s = train(spec, TrainConfig(task="mqar", steps=2, batch=4, seq_len=32, threads=1), tmp_path / "m")
    assert "accuracy" in s["train"] and "accuracy" in s["val"]


def test_a_checkpoint_from_before_a_new_schema_default_still_matches() -> None:
    """Fields added to the schema later (with defaults) do not orphan older checkpoints; a real
    difference is still refused."""
    import json as _json

    from nestlearn.spec.loader import parse_spec as _parse
    from nestlearn.train.checkpoint import Checkpoint, CheckpointError, check_spec, spec_data, spec_hash

    spec = _parse(TINY.read_text(), "tiny.yaml")
    old = spec_data(spec)
    for lv in old["levels"].values():
        lv.pop("read", None)  # as written before `read:` existed
    ck = Checkpoint(Path("old.safetensors"), 1, "0" * 16, _json.dumps(old), {})
    check_spec(ck, spec)
    other = _parse(TINY.read_text(), "tiny.yaml", ["model.dim=64"])
    with pytest.raises(CheckpointError):
        check_spec(Checkpoint(Path("x"), 1, spec_hash(other), _json.dumps(spec_data(other)), {}), spec)


# ----------------------------------------------------------------------------- dead runs


def test_dead_run_watch_reports_a_zero_gradient_streak_once() -> None:
    from nestlearn.train.metrics import DeadRunWatch

    w = DeadRunWatch(steps=3)
    said = [w.update(s, g, 5.5) for s, g in enumerate([0.0, 0.0, 1.0, 0.0, 0.0, 1e-12, 0.0, 0.0, float("nan")], 1)]
    # steps 1-2 are a streak of 2 (broken by a real gradient at 3); 4-6 reach 3: said at step 6 only
    assert [i for i, m in enumerate(said, 1) if m] == [6] and w.since == 4
    assert "since step 4" in said[5] and "dead" in said[5]  # type: ignore[operator]
    assert w.update(10, 2.0, 5.0) is None and w.since == 4  # the summary keeps where it died


def test_a_run_with_zero_gradients_is_called_dead(spec: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every weight zero: the logits are 0 (loss ln 256) and no gradient reaches any weight, as in
    the NIAH control that died by step 21 (docs/results.md). The run finishes (nothing diverged),
    says once that it is dead and the summary keeps where."""
    rep = _Messages()

    from nestlearn.train import loop

    def zeroed(spec: Any) -> torch.nn.Module:
        model = build_model(spec)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return model

    monkeypatch.setattr(loop, "build_model", zeroed)
    s = Trainer(spec, TrainConfig(steps=24, **SMALL), tmp_path / "dead", reporter=rep).fit()
    monkeypatch.undo()
    assert s["status"] == "done" and s["dead_since"] == 1
    assert math.isclose(s["train"]["loss"], math.log(256), rel_tol=1e-6) and s["train"]["grad_norm"] == 0
    dead = [m for m in rep.messages if "dead" in m]
    assert len(dead) == 1 and dead[0].startswith("step 20:")
    # a run that learns never is
    live = train(spec, TrainConfig(steps=24, **SMALL), tmp_path / "live")
    assert "dead_since" not in live


def test_bf16_on_a_cpu_trains_under_cpu_autocast(spec: Any, tmp_path: Path) -> None:
    """``--precision bf16`` on a CPU: the model's matmuls under CPU autocast (the GPU's activation
    numerics at a size the CPU trains), the inner loops in fp32 as on the GPU; the loss is finite
    and differs from the fp32 run's by bf16 rounding only."""
    losses = {}
    for precision in ("bf16", "fp32"):
        t = Trainer(spec, TrainConfig(steps=2, precision=precision, **SMALL), tmp_path / precision)
        t.setup()
        assert t.amp_dtype == (torch.bfloat16 if precision == "bf16" else None)
        t._fit()
        rec = [r for r in read_metrics(tmp_path / precision / "metrics.jsonl") if r["split"] == "train"]
        losses[precision] = rec[-1]["loss"]
    assert math.isfinite(losses["bf16"]) and losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_tf32_switches_the_matmul_precision_on_cuda_only_and_puts_it_back(
        spec: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--tf32``: on a CUDA device the process's fp32 matmul precision becomes ``high`` (the
    in-context levels' Triton kernels then take TF32 dots), said once; on a CPU it changes
    nothing and says so; either way the run leaves the precision as it found it."""
    from nestlearn.loops.dgd_triton import precision as kernel_precision
    from nestlearn.train import loop
    from nestlearn.train.build import set_tf32

    assert torch.get_float32_matmul_precision() == "highest"
    assert set_tf32(False, torch.device("cuda")) == ("highest", None)
    before, note = set_tf32(True, torch.device("cpu"))
    assert before == "highest" and note is not None and "no effect on cpu" in note
    assert torch.get_float32_matmul_precision() == "highest"
    try:
        before, note = set_tf32(True, torch.device("cuda"))
        assert before == "highest" and note is not None and note.startswith("--tf32:")
        assert torch.get_float32_matmul_precision() == "high" and kernel_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision("highest")
    assert kernel_precision() == "ieee"

    rep = _Messages()

    # the CUDA branch on this CPU: what fit does with a precision the setup switched
    seen: list[str] = []
    monkeypatch.setattr(loop, "set_tf32", lambda on, device: set_tf32(on, torch.device("cuda")))
    monkeypatch.setattr(loop.Trainer, "evaluate", lambda self, step: (
        seen.append(torch.get_float32_matmul_precision()), {"loss": 1.0, "bits_per_byte": 1.0})[1])
    Trainer(spec, TrainConfig(steps=2, tf32=True, **SMALL), tmp_path / "tf32", reporter=rep).fit()
    assert seen and set(seen) == {"high"}  # in force during the run
    assert torch.get_float32_matmul_precision() == "highest"  # and put back after it
    with pytest.raises(TrainError):  # a run refused in its setup puts it back too
        Trainer(spec, TrainConfig(steps=2, stop_at=5, tf32=True, **SMALL), tmp_path / "refused").fit()
    assert torch.get_float32_matmul_precision() == "highest"
    assert sum(m.startswith("--tf32:") for m in rep.messages) == 1
