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


def test_bf16_rows_carry_their_distance_from_fp32(capsys: pytest.CaptureFixture[str]) -> None:
    """In bf16 (fp32 weights under bf16 autocast, as nestlearn run trains) each row also gives its
    gradients' difference from the block loop without autocast: nonzero for the loop itself
    (bf16's own error), and of that order for the wavefront."""
    rc = wavefront.main(["specs/titans-mal.yaml", "--shapes", "1x64", "--segments", "16", "--device", "cpu",
                         "--reps", "1", "--dtype", "bf16", "--set", "model.dim=32", "model.depth=2", "model.heads=2"])
    out = capsys.readouterr().out
    assert rc == 0 and "vs fp32" in out, out
    rows = re.findall(r"^titans-mal\s+1x64\s+(\S+)\s+[\d,]+\s+-\s+[\d.]+x\s+(\S+)\s+(\S+)$", out, re.M)
    assert [r[0] for r in rows] == ["loop", "16"], out
    loop32, seg32 = float(rows[0][2]), float(rows[1][2])
    assert 0 < loop32 < 1 and seg32 < 10 * loop32, out


def test_bad_shape_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        wavefront.main(["--shapes", "8by2048", "--device", "cpu"])
    assert exc.value.code == 2
    assert "expected BATCHxTOKENS" in capsys.readouterr().err


def test_check_prints_every_variant_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """``bench.wavefront_check`` smoke-tested on the CPU, where every variant is the one-stream
    order: each row's differences are fp32 rounding."""
    from bench import wavefront_check

    assert wavefront_check.main(["specs/titans-mal.yaml", "--device", "cpu", "--tokens", "16", "--depth", "2"]) == 0
    rows = re.findall(r"^titans-mal\s+(.+?)\s+([\d.e+-]+)\s+([\d.e+-]+)$", capsys.readouterr().out, re.M)
    assert [r[0] for r in rows] == ["loop again", *wavefront_check.VARIANTS]
    assert all(float(r[1]) < 1e-5 and float(r[2]) < 1e-3 for r in rows), rows


def test_handoff_is_the_identity_for_values_and_gradients() -> None:
    import torch

    from nestlearn.compile.wavefront import _Handoff

    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = _Handoff.apply(x, None)
    assert torch.equal(y, x)
    (y * torch.arange(12.0, dtype=torch.float64).view(3, 4)).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.arange(12.0, dtype=torch.float64).view(3, 4))
