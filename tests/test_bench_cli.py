"""``python -m bench``: rows written as they come, Ctrl-C keeps them, ``--resume`` times only the rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import bench.__main__ as cli

SMALL = ["--device", "cpu", "--small", "--only", "sdpa"]  # two fast rows: 1x128, 1x512


def _rows(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text())["rows"])


def test_interrupt_keeps_rows_and_resume_times_only_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    real = cli.time_case
    timed: list[int] = []

    def interrupt_second(case: Any, *a: Any) -> dict[str, Any]:
        if timed:
            raise KeyboardInterrupt
        timed.append(case.seq)
        return real(case, *a)

    monkeypatch.setattr(cli, "time_case", interrupt_second)
    assert cli.main([*SMALL, "--out", str(out)]) == 130
    assert "interrupted; 1 rows kept" in capsys.readouterr().err
    assert [r["seq"] for r in _rows(out)] == [128]

    resumed: list[int] = []
    monkeypatch.setattr(cli, "time_case", lambda case, *a: resumed.append(case.seq) or real(case, *a))
    assert cli.main([*SMALL, "--out", str(out), "--resume"]) == 0
    assert resumed == [512]
    doc = json.loads(out.read_text())
    assert [r["seq"] for r in doc["rows"]] == [128, 512] and "partial" not in doc["meta"]


def test_bad_input_is_one_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([*SMALL, "--seqs", "128,x"])
    assert e.value.code == 2 and "--seqs: expected comma-separated positive integers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([*SMALL, "--resume"])
    assert e.value.code == 2 and "--resume needs --out" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main([*SMALL, "--out", str(bad), "--resume"]) == 2
    assert "cannot read the rows of" in capsys.readouterr().err


def test_graph_warmup_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([*SMALL, "--graph-warmup", "0"])
    assert e.value.code == 2 and "--graph-warmup: expected a positive integer, got '0'" in capsys.readouterr().err


def test_only_matching_nothing_is_an_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "time_case", lambda *a: pytest.fail("nothing should be timed"))
    assert cli.main(["--device", "cpu", "--small", "--only", "sdpa:nestlearn+graph"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--only sdpa:nestlearn+graph: no row" in err, err


def test_only_takes_name_impl_pairs() -> None:
    import torch

    from bench.run import cases

    picked = cases(torch.device("cpu"), True, {"hope:nestlearn-compiled-step", "sdpa"})
    assert {(c.name, c.impl) for c in picked} == {("hope", "nestlearn-compiled-step"), ("sdpa", "torch")}


def test_full_size_rows_cover_the_issue_sizes() -> None:
    """HOPE (shipped periods) and the GPT at 8 and 32 x 2,048 and at batch 1 over the lengths
    asked for: the rows `device_batch.sh speed` compares (nothing is built here)."""
    import torch

    from bench.run import cases

    picked = cases(torch.device("cpu"), False, {"hope:nestlearn", "gpt:nestlearn"}, lengths=(2048, 16384, 65536))
    want = {(8, 2048), (32, 2048), (1, 2048), (1, 16384), (1, 65536)}
    for name in ("hope", "gpt"):
        assert {(c.batch, c.seq) for c in picked if c.name == name} == want, name


def test_an_oom_skips_only_rows_at_least_as_large() -> None:
    """A batched row's OOM (HOPE at 32 x 2,048) must not skip the family's smaller batch-1 rows,
    only those with as many tokens or more (it skipped every later row once)."""
    from types import SimpleNamespace

    from bench.__main__ import _note_slow, _skip_reason

    slow: dict = {}
    _note_slow({"name": "hope", "impl": "x", "batch": 32, "seq": 2048, "status": "OOM"}, slow, 60.0)

    def case(b: int, t: int, impl: str = "x") -> SimpleNamespace:
        return SimpleNamespace(name="hope", impl=impl, batch=b, seq=t)

    assert _skip_reason(case(1, 2048), slow) is None and _skip_reason(case(1, 16384), slow) is None
    assert _skip_reason(case(1, 65536), slow) == "OOM at 32 x 2048"
    assert _skip_reason(case(1, 65536, "y"), slow) is None  # another impl is its own family
    _note_slow({"name": "hope", "impl": "x", "batch": 1, "seq": 16384, "status": "ok", "s_per_iter": 90.0}, slow, 60.0)
    assert _skip_reason(case(1, 16384), slow) == "90.0 s/iter at 1 x 16384"  # the smaller threshold wins
