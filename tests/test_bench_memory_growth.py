"""``python -m bench.memory_growth``: one record every K optimizer steps and a growth line; a bad
spec is one error line and exit code 2."""

from __future__ import annotations

import re

import pytest

from bench import memory_growth


def test_records_every_k_steps_and_reports_growth(capsys: pytest.CaptureFixture[str]) -> None:
    rc = memory_growth.main(["specs/transformer.yaml", "--set", "model.dim=32", "--set", "model.depth=1",
                             "--device", "cpu", "--batch", "1", "--seq-len", "32", "--steps", "6", "--every", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    steps = [int(m) for m in re.findall(r"^step\s+(\d+)\s+resident", out, re.M)]
    assert steps == [2, 4, 6], out
    assert re.search(r"growth: [+-]\d+\.\d MB per 100 steps \(steps 4-6\)", out), out


def test_bad_spec_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert memory_growth.main(["no/such.yaml", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_peak_replay_finds_what_was_alive_at_the_peak() -> None:
    here = [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": "/x/nestlearn/loops/dual.py", "line": 42, "name": "_segment"}]
    other = [{"filename": "/x/nestlearn/train/evaluate.py", "line": 7, "name": "fn"}]
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": here},
        {"action": "alloc", "addr": 2, "size": 50, "frames": other},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 3, "size": 30, "frames": other},  # 80 live: below the peak of 150
    ]
    peak, live = memory_growth.live_at_peak(trace)
    assert peak == 150 and sorted(live) == [1, 2]
    assert memory_growth.top_sites(live) == [(100, "dual.py:42 _segment"), (50, "evaluate.py:7 fn")]
