"""``python -m bench.trainer_speed`` runs end to end (on the CPU, tiny) and prints its table."""

from __future__ import annotations

import pytest

from bench import trainer_speed


def test_trainer_speed_prints_the_bench_and_the_trainer(capsys: pytest.CaptureFixture[str]) -> None:
    rows = trainer_speed.main(["specs/transformer.yaml", "--set", "model.dim=32", "--set", "model.depth=1",
                               "--device", "cpu", "--batch", "1", "--seq-len", "32", "--steps", "3", "--skip", "1",
                               "--reps", "2"])
    out = capsys.readouterr().out
    assert len(rows) == 1 and rows[0]["spec"] == "transformer"
    assert all(rows[0][k] > 0 for k in ("fwd_bwd", "fwd_bwd_opt", "trainer", "ratio"))
    assert "fwd+bwd+opt" in out and "ratio" in out.splitlines()[-2]
