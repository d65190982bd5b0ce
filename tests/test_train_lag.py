"""The trainer's own cost: steps read a step late (``Steps.lag``), prefetched batches, fused
optimizer kernels kept across a resume, checkpoints written in the background.

``lag`` is on for one CUDA process; here it is forced on the CPU (fused AdamW runs there too),
and every result must equal the same run read at once, step for step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import nestlearn
from nestlearn.tasks import Batch, TaskError
from nestlearn.train import DivergedError, TrainConfig, Trainer, load_checkpoint, read_metrics
from nestlearn.train.batches import Batches
from nestlearn.train.build import build_model, build_optimizer, is_fused, keep_kernels
from nestlearn.train.checkpoint import CheckpointWriter, checkpoint_contents
from nestlearn.train.step import Queued

TINY = Path(__file__).parent / "data" / "tiny_run.yaml"
SMALL = dict(batch=4, seq_len=32, threads=1)


@pytest.fixture(scope="module")
def spec() -> Any:
    return nestlearn.load_spec(TINY)


class Fused(Trainer):
    """Fused optimizer kernels, every step read at once (the reference)."""

    def _fuse(self) -> bool:
        return True


class Lagged(Fused):
    """Fused kernels, steps read a step late, as on one GPU; counts the late reads."""

    late = 0

    def _lags(self) -> bool:
        return self.scaler is None and is_fused(self.optimizer)

    def _record(self, q: Queued, latest: bool) -> bool:
        type(self).late += not latest
        return super()._record(q, latest)


def _fit(cls: type[Trainer], spec: Any, out: Path, resume: bool = False, **kw: Any) -> Trainer:
    trainer = cls(spec, TrainConfig(**{**SMALL, **kw}), out, resume=resume)
    trainer.fit()
    return trainer


def _records(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")}
            for r in read_metrics(run / "metrics.jsonl")]


def test_lagged_steps_log_the_same_records_and_weights(spec: Any, tmp_path: Path) -> None:
    cfg = dict(steps=10, eval_every=5, ckpt_every=5)
    ref = _fit(Fused, spec, tmp_path / "ref", **cfg)
    Lagged.late = 0
    lag = _fit(Lagged, spec, tmp_path / "lag", **cfg)
    assert lag.lag and not ref.lag and Lagged.late == 8  # all but steps 5 and 10 (checkpoints) read late
    assert _records(tmp_path / "lag") == _records(tmp_path / "ref")  # train and val records, in order
    a, b = ref.model.state_dict(), lag.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ck = load_checkpoint(tmp_path / "lag" / "checkpoints" / "last.safetensors", spec)
    assert ck.step == 10 and all(torch.equal(ck.model[k], a[k].cpu()) for k in a)


def test_lagged_log_interval_logs_the_per_step_values(spec: Any, tmp_path: Path) -> None:
    _fit(Fused, spec, tmp_path / "every", steps=10, eval_every=10, ckpt_every=10)
    _fit(Lagged, spec, tmp_path / "third", steps=10, eval_every=10, ckpt_every=10, log_every=3)
    every = {r["step"]: r for r in _records(tmp_path / "every") if r["split"] == "train"}
    third = [r for r in _records(tmp_path / "third") if r["split"] == "train"]
    assert [r["step"] for r in third] == [3, 6, 9, 10]
    for r in third:
        want = {k: v for k, v in every[r["step"]].items() if k != "levels" or "levels" in r}
        assert r == want


def test_a_lagged_divergence_is_caught_at_its_step_and_skips_its_update(spec: Any, tmp_path: Path) -> None:
    cfg = dict(steps=30, lr=0.1, warmup=0, clip=0.0, ckpt_every=3, eval_every=30)  # diverges at step 5
    with pytest.raises(DivergedError) as want:
        ref = Fused(spec, TrainConfig(**SMALL, **cfg), tmp_path / "ref")
        ref.fit()
    Lagged.late = 0
    with pytest.raises(DivergedError) as got:
        lag = Lagged(spec, TrainConfig(**SMALL, **cfg), tmp_path / "lag")
        lag.fit()
    step = want.value.step
    assert step > 3 and step % 3 != 0  # after a checkpoint, and found late (the next step was queued)
    assert got.value.step == step and got.value.level == want.value.level
    assert str(got.value) == str(want.value).replace(str(tmp_path / "ref"), str(tmp_path / "lag"))
    assert lag.step == ref.step == step - 1
    # the diverged step's update (and the next step's) were skipped on the device: the weights
    # and the optimizer state are those the synchronous check left
    a, b = ref.model.state_dict(), lag.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = ref.optimizer.state_dict()["state"], lag.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    ck = load_checkpoint(tmp_path / "lag" / "checkpoints" / "last.safetensors", spec)
    assert ck.step == (step - 1) // 3 * 3 and all(torch.isfinite(v).all() for v in ck.model.values())


def test_lagged_stop_and_resume_give_the_uninterrupted_run(spec: Any, tmp_path: Path) -> None:
    cfg = dict(steps=12, eval_every=4, ckpt_every=5)
    _fit(Lagged, spec, tmp_path / "full", **cfg)
    _fit(Lagged, spec, tmp_path / "split", stop_at=7, **cfg)
    resumed = _fit(Lagged, spec, tmp_path / "split", resume=True, **cfg)
    assert resumed.step == 12 and resumed.optimizer.param_groups[0]["fused"]
    assert _records(tmp_path / "split") == _records(tmp_path / "full")


def test_lagged_time_limit_stops_at_the_step_it_is_read(spec: Any, tmp_path: Path) -> None:
    """Out of time, the step just queued is read at once (not a step late), evaluated and saved."""
    t = _fit(Lagged, spec, tmp_path / "t", steps=6, eval_every=6, time_limit=1e-9)
    assert t.step == 1
    ck = load_checkpoint(tmp_path / "t" / "checkpoints" / "last.safetensors", spec)
    assert ck.step == 1
    resumed = _fit(Lagged, spec, tmp_path / "t", resume=True, steps=6, eval_every=6)
    assert resumed.step == 6


# ----------------------------------------------------------------------------- the pieces


def test_prefetched_batches_are_the_step_s_batch_and_failures_wait_for_their_step() -> None:
    calls: list[int] = []

    def fetch(step: int) -> Batch:
        calls.append(step)
        if step == 3:
            raise TaskError("no batch 3")
        return Batch.from_sequences(torch.full((2, 5), step))

    b = Batches(fetch, torch.device("cpu"))
    b.prefetch(1)
    got, n_tok = b.get(1)
    assert calls == [1] and n_tok == 8.0 and int(got.inputs[0, 0]) == 1
    got, _ = b.get(2)  # nothing fetched ahead for 2
    assert int(got.inputs[0, 0]) == 2
    b.prefetch(3)  # fails quietly ...
    with pytest.raises(TaskError, match="no batch 3"):  # ... and again, loudly, at its own step
        b.get(3)


def test_a_resumed_optimizer_keeps_this_run_s_kernels(spec: Any) -> None:
    model = build_model(spec)
    rule = spec.levels[spec.outer_level].rule
    plain = build_optimizer(model, rule, None)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    plain.step()
    fused = build_optimizer(model, rule, None, fused=True)
    assert is_fused(fused) and not is_fused(plain)
    fused.load_state_dict(plain.state_dict())
    assert not is_fused(fused)  # torch takes the saved groups' flags ...
    keep_kernels(fused, True)  # ... and this puts this run's back
    assert is_fused(fused)
    fused.step()
    assert all(s["step"].item() == 2.0 for s in fused.state.values())


def test_checkpoint_writer_writes_in_order_and_reports_a_failure(spec: Any, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(spec)
    writer = CheckpointWriter()
    for step in (1, 2):
        writer.submit(tmp_path / "c.safetensors", *checkpoint_contents(model=model, spec=spec, step=step))
    writer.wait()
    assert load_checkpoint(tmp_path / "c.safetensors", spec).step == 2

    def boom(*a: Any, **k: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("nestlearn.train.checkpoint.atomic_write", boom)
    writer.submit(tmp_path / "c.safetensors", *checkpoint_contents(model=model, spec=spec, step=3))
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    assert load_checkpoint(tmp_path / "c.safetensors", spec).step == 2
