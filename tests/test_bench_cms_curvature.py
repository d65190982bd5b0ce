"""``python -m bench.cms_curvature``: the chunk gain of HOPE's fast CMS level grows with the square
of its initial first-layer weights, and passes the stability bound once they double
(docs/training-health.md, section 7)."""

from __future__ import annotations

import re

import pytest

from bench import cms_curvature


def test_hope_fast_level_passes_the_bound_when_w0_doubles(capsys: pytest.CaptureFixture[str]) -> None:
    assert cms_curvature.main(["--scales", "1", "2", "3"]) == 0
    out = capsys.readouterr().out
    found = re.findall(r"^\s+([\d.]+)\s+[\d.]+\s+([\d.]+)\s+([\d.]+)", out, re.M)
    rows = {float(m[0]): (float(m[1]), float(m[2])) for m in found}
    assert set(rows) == {1.0, 2.0, 3.0}, out
    assert rows[1.0][1] < 0.5 < 1 < rows[2.0][1], out  # stable at initialisation, past the bound at 2x
    assert rows[3.0][0] / rows[1.0][0] > 8, out  # about the square of the scale (gelu bends it up)


def test_a_node_that_is_not_an_in_context_mlp_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cms_curvature.main(["--node", "n1"]) == 2
    assert "no in-context mlp node 'n1'" in capsys.readouterr().err
