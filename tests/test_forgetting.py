"""Forgetting in a continual run: the run's summary, ``nestlearn run``'s table and the suite's
tables report the same number, the paper's ``100 (best - final) / best`` on performance (accuracy,
or 8 - bits/byte for text), computed here by hand from the run's own phase records. The loss
increase in nats is reported beside it under its own name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nestlearn.suite.evaluate import continual_metrics
from nestlearn.tasks import TaskError, forgetting_percent, loss_increase
from nestlearn.train import read_metrics
from tests.cli_run import nl

TINY = Path(__file__).parent / "data" / "tiny_run.yaml"
PHASES = ["code", "prose", "anbn"]


@pytest.fixture(scope="module")
def continual_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("forget") / "run"
    code, out = nl("run", TINY, "--task", "continual", "--task-opt", "phases=code,prose,anbn",
                   "--task-opt", "phase_steps=2", "--steps", "6", "--batch", "2", "--seq-len", "32",
                   "--eval-batches", "1", "--threads", "1", "--out", run)
    assert code == 0, out
    return run, out


def _by_hand(run: Path) -> tuple[dict[str, float | None], dict[str, float]]:
    recs = {r["phase"]: r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "phase"}
    assert sorted(recs) == [0, 1, 2] and [recs[p]["domain"] for p in range(3)] == PHASES

    def perf(m: dict[str, float]) -> float:
        return m["accuracy"] if "accuracy" in m else 8.0 - m["bits_per_byte"]

    pct: dict[str, float | None] = {}
    nats: dict[str, float] = {}
    for j, d in enumerate(PHASES[:2]):  # code is last trained in phase 0, prose in phase 1
        best = max(perf(recs[p]["domains"][d]) for p in range(j + 1))
        # undefined where nothing was learned (a 6-step run can stay above 8 bits/byte)
        pct[d] = 100.0 * (best - perf(recs[2]["domains"][d])) / best if best > 0 else None
        nats[d] = recs[2]["domains"][d]["loss"] - recs[j]["domains"][d]["loss"]
    return pct, nats


def test_summary_forgetting_is_the_papers_percentage(continual_run: tuple[Path, str]) -> None:
    run, _ = continual_run
    summary = json.loads((run / "summary.json").read_text())
    pct, nats = _by_hand(run)
    assert set(summary["forgetting"]) == {"code", "prose"}
    assert any(v is not None for v in pct.values())  # the run learned at least one domain
    for d in pct:
        assert summary["forgetting"][d] == (None if pct[d] is None else pytest.approx(pct[d], rel=1e-9))
        assert summary["loss_increase"][d] == pytest.approx(nats[d], rel=1e-9)
    assert summary["loss_increase"]["mean"] == pytest.approx(sum(nats.values()) / 2, rel=1e-9)
    # the suite's tables read the same records and give the same numbers
    suite = continual_metrics(run, 3)["forgetting"]
    assert suite == summary["forgetting"]


def test_run_and_eval_print_both_under_their_own_names(continual_run: tuple[Path, str]) -> None:
    run, out = continual_run
    pct, _ = _by_hand(run)
    shown = ", ".join(f"{d} {'-' if v is None else f'{v:.1f}%'}" for d, v in pct.items())
    assert shown in out.replace("\n", " ") or shown in out, out
    assert "loss increase" in out and "nats" in out
    code, ev = nl("eval", run, "--json")
    assert code == 0, ev
    res = json.loads(ev)
    assert res["forgetting"] == json.loads((run / "summary.json").read_text())["forgetting"]
    assert "loss_increase" in res


def test_forgetting_functions_by_hand() -> None:
    perf = [[4.0, 1.0, 0.5], [3.0, 5.0, 0.5], [1.0, 4.0, 0.9]]
    assert forgetting_percent(perf, PHASES) == {"code": 75.0, "prose": 20.0}
    assert forgetting_percent([[0.0, 1.0], [-1.0, 2.0]], ["a", "b"]) == {"a": None}  # nothing learned
    losses = [[1.0, 5.0, 5.0], [1.5, 2.0, 5.0], [2.0, 2.5, 0.5]]
    assert loss_increase(losses, PHASES) == {"code": 1.0, "prose": 0.5, "mean": 0.75}
    with pytest.raises(TaskError, match="expected a 3 x 3 matrix"):
        forgetting_percent([[1.0, 2.0, 3.0]], PHASES)
