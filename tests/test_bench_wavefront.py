"""``python -m bench.wavefront``: one row per segment after the block loop's, the overlapped model's
gradients equal to the loop's, and a bad shape is argparse's one-line error."""

from __future__ import annotations

import re

import pytest

from bench import wavefront


def test_table_has_the_loop_and_each_segment(capsys: pytest.CaptureFixture[str]) -> None:
    rc = wavefront.main(["specs/titans-mal.yaml", "--shapes", "1x64", "--segments", "16", "32", "--device", "cpu",
                         "--reps", "1", "--set", "model.dim=32", "model.depth=2", "model.heads=2"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = re.findall(r"^titans-mal\s+1x64\s+(\S+)\s+[\d,]+\s+-\s+([\d.]+)x\s+(\S+)$", out, re.M)
    assert [r[0] for r in rows] == ["loop", "16", "32"], out
    assert rows[0][1] == "1.00"
    assert all(float(r[2]) < 1e-4 for r in rows), out  # fp32: the same gradients


def test_bad_shape_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        wavefront.main(["--shapes", "8by2048", "--device", "cpu"])
    assert exc.value.code == 2
    assert "expected BATCHxTOKENS" in capsys.readouterr().err
