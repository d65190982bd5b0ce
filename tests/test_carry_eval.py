"""Evaluation from the carried state (``--carry-state``, ``nestlearn/train/carry.py``).

Every number is checked against a reference written out here: the model's forward on the
held-out rows with ``state=`` the carried state (rows picked by hand), and a masked
cross-entropy summed by hand, never through ``Task.evaluate``. Tiny sizes, CPU, one thread."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils._pytree import tree_map

import nestlearn
from nestlearn.tasks import Batch
from nestlearn.train import TrainConfig, Trainer, TrainError, load_checkpoint, read_metrics, save_checkpoint
from nestlearn.train.carry import carried_rows, joined, start_state
from nestlearn.train.evaluate import evaluate_run, load_run
from nestlearn.train.reporting import SilentReporter
from tests.cli_run import nl

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny_run.yaml"  # attention (window 64) + one momentum memory level
ONE_LEVEL = """\
nestlearn: 1
name: one-level
model: {vocab: 256, dim: 16, depth: 1, heads: 2}
levels:
  outer:  {period: outer, rule: {name: adamw, lr: 3.0e-3}}
  memory: {period: 4, objective: l2, rule: {name: momentum, lr: {gate: token, max: 0.5}, beta: 0.9}}
block:
  - {id: n1,  op: rmsnorm, in: x}
  - {id: mem, op: memory,  in: n1, level: memory, memory: {type: linear}}
  - {id: out, op: add,     in: [x, mem]}
"""
STATELESS = """\
nestlearn: 1
name: stateless
model: {vocab: 256, dim: 16, depth: 1, heads: 2}
levels:
  outer: {period: outer, rule: {name: adamw, lr: 3.0e-3}}
block:
  - {id: n1,  op: rmsnorm, in: x}
  - {id: ffn, op: mlp,     in: n1, expand: 2}
  - {id: out, op: add,     in: [x, ffn]}
"""
SMALL = dict(batch=4, seq_len=16, threads=1, eval_batches=2, ckpt_every=100)
TIMING = ("time", "tokens_per_s")


def spec_of(name: str, tmp_path: Path) -> Any:
    if name == "one-level":
        path = tmp_path / "one.yaml"
        path.write_text(ONE_LEVEL)
        return nestlearn.load_spec(path)
    if name == "stateless":
        path = tmp_path / "stateless.yaml"
        path.write_text(STATELESS)
        return nestlearn.load_spec(path)
    if name == "transformer":
        return nestlearn.load_spec(ROOT / "specs" / "transformer.yaml",
                                   ["model.dim=16", "model.depth=1", "model.heads=2"])
    return nestlearn.load_spec(TINY)


def fit(spec: Any, out: Path, **cfg: Any) -> Trainer:
    t = Trainer(spec, TrainConfig(**{**SMALL, **cfg}), out)
    t.fit()
    return t


def rows(state: Any, picks: list[int]) -> Any:
    """The carried ``state`` with its rows ``picks`` (by hand)."""
    return tree_map(lambda t: t[torch.tensor(picks)] if isinstance(t, torch.Tensor) else t, state)


def cat_rows(a: Any, b: Any) -> Any:
    """Two micro-batches' states one after the other (by hand)."""
    return tree_map(lambda x, y: torch.cat([x, y]) if isinstance(x, torch.Tensor) else x, a, b)


def hand_loss(model: torch.nn.Module, batches: list[Batch], state_for: Callable[[int], Any]) -> float:
    """Masked mean cross-entropy over ``batches``, each started from ``state_for(rows)``."""
    total = count = 0.0
    with torch.no_grad():
        for b in batches:
            logits, _ = model(b.inputs, state_for(b.inputs.shape[0]))
            ce = F.cross_entropy(logits.float().flatten(0, 1), b.targets.flatten(), reduction="none")
            total += float((ce * b.mask.flatten()).sum())
            count += float(b.mask.sum())
    return total / count


def old_style(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The evaluation function as it was before carried-state evaluation: the initial state."""
    return lambda x: model(x)[0].float()


def records(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run / "metrics.jsonl")]


# ----------------------------------------------------------------------------- the rules, unit by unit


def test_row_rule_takes_carried_row_i_mod_b_as_a_copy() -> None:
    w = torch.arange(6.0).view(3, 2)
    state = {"0": {"mem": {"params": {"W": w}, "offset": 5, "chunks": 2}, "conv": [torch.ones(3, 1)]}}
    seven = start_state(state, 7)
    assert seven["0"]["mem"]["params"]["W"][:, 0].tolist() == [0, 2, 4, 0, 2, 4, 0]  # rows 0 1 2 0 1 2 0
    assert seven["0"]["mem"]["offset"] == 5 and seven["0"]["mem"]["chunks"] == 2
    assert start_state(state, 2)["0"]["mem"]["params"]["W"].tolist() == [[0, 1], [2, 3]]
    same = start_state(state, 3)
    same["0"]["mem"]["params"]["W"].add_(100)  # the start state is a copy: the carry stays as it was
    assert torch.equal(w, torch.arange(6.0).view(3, 2))
    assert start_state({"0": {}}, 5) == {"0": {}} and carried_rows({"0": {}}) is None
    with pytest.raises(TrainError, match="row count"):
        carried_rows({"a": torch.ones(3, 2), "b": torch.ones(2, 2)})


def test_micro_batches_are_joined_by_rows_in_order() -> None:
    a = {"W": torch.zeros(2, 3), "offset": 4}
    b = {"W": torch.ones(2, 3), "offset": 4}
    both = joined([a, b])
    assert both["W"][:, 0].tolist() == [0, 0, 1, 1] and both["offset"] == 4
    assert joined([a]) is a and joined([a, None]) is None and joined(None) is None
    with pytest.raises(TrainError, match="disagree"):
        joined([a, {"W": torch.ones(2, 3), "offset": 5}])


SHIPPED = sorted(str(p.relative_to(ROOT)) for d in ("specs", "models", "experiments/specs")
                 for p in (ROOT / d).glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_spec_evaluates_from_its_carried_state(path: str) -> None:
    """Two micro-batches' carried states (made with gradients and detached, as the trainer
    carries them) join by rows, and five held-out rows run from them without gradients."""
    spec = nestlearn.load_spec(ROOT / path, ["model.dim=16", "model.depth=1", "model.heads=2"], profile="none")
    model = nestlearn.compile(spec)
    gen = torch.Generator().manual_seed(0)
    carry = []
    for _ in range(2):
        _, st = model(torch.randint(0, 256, (3, 24), generator=gen))
        carry.append(tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, st))
    state = joined(carry)
    assert carried_rows(state) == 6
    with torch.no_grad():
        logits, _ = model(torch.randint(0, 256, (5, 24), generator=gen), start_state(state, 5))
    assert logits.shape == (5, 24, 256) and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize("name", ["one-level", "tiny-run"])
def test_validation_starts_from_the_carried_state(name: str, tmp_path: Path) -> None:
    """The final validation equals the model's forward from ``state=`` the carry, by hand
    (tiny-run's windowed attention carries its cache with the memory's state)."""
    t = fit(spec_of(name, tmp_path), tmp_path / "r", steps=3, carry_state=True)
    val = t.run.summary()["val"]
    assert val["eval_state"] == "carried" and t.carry is not None
    carried = t.carry[0]
    assert val["loss"] == pytest.approx(hand_loss(t.model, t.eval_set, lambda n: carried), rel=1e-5)
    initial = hand_loss(t.model, t.eval_set, lambda n: None)
    assert abs(val["loss"] - initial) > 1e-4  # not vacuous: the carried state changes the result


def test_unwindowed_attention_starts_every_batch_afresh(tmp_path: Path) -> None:
    """An attention without a window does not carry its cache across training batches (it would
    grow with every batch: an unbounded context), so a Transformer trains and evaluates under
    ``--carry-state`` exactly as without it; a windowed attention carries at most its window."""
    spec = spec_of("transformer", tmp_path)
    on = fit(spec, tmp_path / "on", steps=3, carry_state=True)
    fit(spec, tmp_path / "off", steps=3)
    assert on.carry is not None and on.carry[0] == {"0": {}} and on.eval_state == "initial"
    strip = [[{k: v for k, v in r.items() if k != "eval_state"} for r in records(tmp_path / run)]
             for run in ("off", "on")]
    assert strip[0] == strip[1]
    tiny = fit(spec_of("tiny-run", tmp_path), tmp_path / "tiny", steps=6, carry_state=True)
    assert tiny.carry is not None
    caches = [st for blk in tiny.carry[0].values() for st in blk.values() if isinstance(st, dict) and "k" in st]
    assert caches and all(0 < c["k"].shape[2] <= 63 for c in caches)  # window 64: the last 63 keys


def test_accum_joins_the_micro_batches(tmp_path: Path) -> None:
    t = fit(spec_of("one-level", tmp_path), tmp_path / "r", steps=3, carry_state=True, accum=2)
    assert t.carry is not None and len(t.carry) == 2
    both = cat_rows(t.carry[0], t.carry[1])  # rows 0-1 from micro-batch 0, rows 2-3 from micro-batch 1
    val = t.run.summary()["val"]
    assert val["loss"] == pytest.approx(hand_loss(t.model, t.eval_set, lambda n: both), rel=1e-5)
    # the same run without accumulation carries the same rows: the same evaluation up to rounding
    one = fit(spec_of("one-level", tmp_path), tmp_path / "one", steps=3, carry_state=True)
    assert val["loss"] == pytest.approx(one.run.summary()["val"]["loss"], rel=1e-4)


def test_evaluating_leaves_the_training_stream_as_it_was(tmp_path: Path) -> None:
    """Records, weights and carry of a carrying run are the same with an evaluation after every
    step as with one at the end only (two micro-batches, so the joined state is exercised)."""
    spec = spec_of("tiny-run", tmp_path)
    often = fit(spec, tmp_path / "often", steps=5, carry_state=True, accum=2, eval_every=1)
    once = fit(spec, tmp_path / "once", steps=5, carry_state=True, accum=2, eval_every=5)
    train = [r for r in records(tmp_path / "often") if r["split"] == "train"]
    assert train == [r for r in records(tmp_path / "once") if r["split"] == "train"]
    assert sum(r["split"] == "val" for r in records(tmp_path / "often")) == 5
    a, b = (load_file(p / "checkpoints" / "last.safetensors") for p in (tmp_path / "often", tmp_path / "once"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # weights, optimizer, carry
    assert often.run.summary()["val"] == once.run.summary()["val"]


def test_nothing_changes_without_carried_state(tmp_path: Path) -> None:
    """carry_state off: the validation is bitwise the old evaluation from the initial state. A
    spec with no in-context state at all trains and evaluates identically with carry_state on."""
    for name in ("tiny-run", "transformer"):
        t = fit(spec_of(name, tmp_path), tmp_path / name, steps=3)
        val = t.run.summary()["val"]
        assert val["eval_state"] == "initial"
        assert val["loss"] == t.task.evaluate(old_style(t.model), t.eval_set)["loss"]
    spec = spec_of("stateless", tmp_path)
    fit(spec, tmp_path / "off", steps=3)
    fit(spec, tmp_path / "on", steps=3, carry_state=True)
    strip = [[{k: v for k, v in r.items() if k != "eval_state"} for r in records(tmp_path / run)]
             for run in ("off", "on")]
    assert strip[0] == strip[1]


# ----------------------------------------------------------------------------- continual


class _PhaseReference(SilentReporter):
    """At every phase record: each domain's loss from the carry at that moment, by hand."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.pairs: list[tuple[float, float, float]] = []

    def eval(self, record: dict[str, Any]) -> None:
        if record["split"] != "phase" or self.trainer is None:
            return
        t, cfg = self.trainer, self.trainer.config
        state = t.carry[0] if t.carry is not None else None
        for d, m in record["domains"].items():
            batches = t.task.tasks[d].eval_batches(cfg.batch, cfg.seq_len, cfg.eval_batches, cfg.seed)  # type: ignore[attr-defined]
            self.pairs.append((m["loss"], hand_loss(t.model, batches, lambda n: state),
                               t.task.tasks[d].evaluate(old_style(t.model), batches)["loss"]))  # type: ignore[attr-defined]


@pytest.mark.parametrize("carry", [True, False])
def test_continual_phases_evaluate_every_domain_from_the_carried_state(carry: bool, tmp_path: Path) -> None:
    spec = spec_of("one-level", tmp_path)
    cfg = TrainConfig(**{**SMALL, "seq_len": 32}, task="continual", carry_state=carry,
                      task_options={"phases": "parity,anbn", "phase_steps": 2})
    rep = _PhaseReference()
    t = Trainer(spec, cfg, tmp_path / "c", reporter=rep)
    rep.trainer = t
    t.fit()
    phases = [r for r in records(tmp_path / "c") if r["split"] == "phase"]
    assert len(phases) == 2 and len(rep.pairs) == 4
    assert {r["eval_state"] for r in phases} == {"carried" if carry else "initial"}
    for got, by_hand, initial in rep.pairs:
        if carry:
            assert got == pytest.approx(by_hand, rel=1e-5)
        else:
            assert got == initial  # bitwise the evaluation from the initial state, as before


# ----------------------------------------------------------------------------- checkpoint and CLI


@pytest.fixture(scope="module")
def carried_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("carry") / "run"
    code, out = nl("run", TINY, "--carry-state", "--steps", "3", "--batch", "4", "--seq-len", "16",
                   "--eval-batches", "2", "--threads", "1", "-q", "--out", run)
    assert code == 0, out
    return run


def test_eval_cli_starts_from_the_stored_carry(carried_run: Path) -> None:
    code, out = nl("eval", carried_run, "--json")
    assert code == 0, out
    res = json.loads(out)
    summary = json.loads((carried_run / "summary.json").read_text())
    assert res["eval_state"] == "carried" and summary["val"]["eval_state"] == "carried"
    # the checkpoint's carry is the one the trainer's final validation started from
    assert res["val"]["loss"] == pytest.approx(summary["val"]["loss"], rel=1e-5)
    code, out = nl("eval", carried_run, "--json", "--from-initial-state")
    assert code == 0, out
    initial = json.loads(out)
    lr = load_run(carried_run, "cpu")
    assert initial["eval_state"] == "initial"
    assert initial["val"]["loss"] == pytest.approx(hand_loss(lr.model, _eval_batches(lr, 4), lambda n: None), rel=1e-5)
    assert abs(initial["val"]["loss"] - res["val"]["loss"]) > 1e-4
    code, out = nl("eval", carried_run)
    assert code == 0 and "the carried state" in out, out


def _eval_batches(lr: Any, batch: int) -> list[Batch]:
    from nestlearn.train.build import build_task

    cfg = lr.config
    return build_task(cfg).eval_batches(batch, cfg.seq_len, cfg.eval_batches, cfg.seed)


@pytest.mark.parametrize("batch, picks", [(3, [0, 1, 2]), (6, [0, 1, 2, 3, 0, 1])])
def test_eval_with_another_row_count_uses_row_i_mod_b(carried_run: Path, batch: int, picks: list[int]) -> None:
    lr = load_run(carried_run, "cpu")
    carry = lr.checkpoint.carry[0]
    res = evaluate_run(lr, batch=batch)
    by_hand = hand_loss(lr.model, _eval_batches(lr, batch), lambda n: rows(carry, picks))
    assert res["eval_state"] == "carried" and res["batch"] == batch
    assert res["val"]["loss"] == pytest.approx(by_hand, rel=1e-5)


def test_eval_of_a_run_without_carry_and_a_broken_carry(carried_run: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    code, out = nl("run", TINY, "--steps", "2", "--batch", "4", "--seq-len", "16", "--threads", "1", "-q",
                   "--out", plain)
    assert code == 0, out
    for flags in ([], ["--from-initial-state"]):  # nothing carried: the flag changes nothing
        code, out = nl("eval", plain, "--json", *flags)
        assert code == 0 and json.loads(out)["eval_state"] == "initial", out
    # a checkpoint whose carried tensors disagree on the row count: one message, exit 1
    ck_path = carried_run / "checkpoints" / "last.safetensors"
    keep = ck_path.read_bytes()
    try:
        ck = load_checkpoint(ck_path)
        lr = load_run(carried_run, "cpu")
        bad = [tree_map(lambda t: t, ck.carry[0])]
        bad[0]["0"]["mem"]["mem"]["params"]["W0"] = bad[0]["0"]["mem"]["mem"]["params"]["W0"][:2]
        save_checkpoint(ck_path, model=lr.model, spec=lr.spec, step=ck.step, carry=bad, data=ck.data, extra=ck.extra)
        code, out = nl("eval", carried_run)
        assert code == 1 and "carried state" in out and "--from-initial-state" in out, out
        code, out = nl("eval", carried_run, "--from-initial-state", "--json")
        assert code == 0 and json.loads(out)["eval_state"] == "initial", out
    finally:
        ck_path.write_bytes(keep)


# ----------------------------------------------------------------------------- the suite


def test_suite_records_which_state_evaluation_started_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nestlearn.suite import run_suite

    monkeypatch.chdir(ROOT)
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: carry\nseeds: 1\n"
                   "budget: {steps: 2, batch: 2, seq_len: 32, eval_batches: 1, device: cpu, threads: 1, "
                   "carry_state: true}\n"
                   "model: {dim: 16, depth: 1, heads: 2}\n"
                   "specs: [{path: specs/deltanet.yaml, label: delta}]\n"
                   "tasks: [{name: parity, options: {max_len: 8}, eval_lengths: [1, 2]}]\n")
    out = tmp_path / "out"
    code = run_suite(str(exp), out=str(out), fmt="table", stdout=io.StringIO(), stderr=io.StringIO())
    assert code == 0
    rec = json.loads((out / "results.json").read_text())["runs"]["parity/delta/seed0"]
    assert rec["status"] == "done" and rec["eval_state"] == "carried" and rec["val"]["eval_state"] == "carried"
    # the length evaluation at 1 x L starts from the same carried state as the validation
    assert math.isclose(rec["lengths"]["1"]["accuracy"], rec["value"])
    assert "from the state the training stream carried" in (out / "results.md").read_text()
