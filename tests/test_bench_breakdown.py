"""``python -m bench.breakdown``: a CPU smoke run of the per-op table, and its errors (one line,
exit code 2, no traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

import nestlearn
from bench import breakdown

HOPE = Path(__file__).resolve().parents[1] / "models" / "hope.yaml"
TINY = ["model.dim=32", "model.depth=1", "model.heads=2"]
FAST = ["--seq", "64", "--reps", "1", "--device", "cpu"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = breakdown.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_table_has_a_row_per_op_and_the_sequential_steps(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run([str(HOPE), *FAST, "--set", *TINY], capsys)
    assert code == 0, err
    spec = nestlearn.load_spec(HOPE, TINY)
    head, *lines = out.splitlines()[1:]
    rows = {line.split()[0]: line.split() for line in lines}
    assert [n.id for n in spec.block] == [k for k in rows if k not in ("block", "model", "whole")]
    # selfmod over 64 tokens: 64/16 main-memory chunks + 64/64 generator chunks, timed, no graph on CPU
    (sm,) = [n for n in spec.block if n.op == "selfmod"]
    assert rows[sm.id][1] == "SelfModOp" and rows[sm.id][2] == "4+1"
    assert float(rows[sm.id][3]) > 0 and rows[sm.id][4] == "-"
    assert float(rows[sm.id][6]) > 0  # us per sequential step
    # the CMS levels: period 16 -> 4 steps; 256 and 2048 -> one (partial) chunk each
    assert [rows[n][2] for n in ("c1", "c2", "c3")] == ["4", "1", "1"]
    # every op row fills the header's columns, with or without a graph time
    assert all(len(line) == len(head) for line in lines[:len(spec.block)]), out
    assert rows["n1"][2] == "-" and rows["block"][1] == "sum" and rows["model"][1] == "whole"
    assert out.splitlines()[-1].startswith("whole model:") and "(eager)" in out.splitlines()[-1]


@pytest.mark.parametrize(("argv", "says"), [
    (["/no/such/spec.yaml"], "/no/such/spec.yaml: no such file"),
    ([str(HOPE), "--set", *TINY, "model.input=embeddings"], "needs a token model"),
    ([str(HOPE), "--set", "model.dimm=32"], "unknown field 'dimm'"),
    ([str(HOPE), "--device", "tpu"], "--device: expected cpu, cuda or cuda:N"),
])
def test_bad_input_is_one_error_line(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run([*FAST, *argv], capsys)
    assert code == 2 and out == "", (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and says in err, err


@pytest.mark.parametrize("flag", ["--seq", "--reps", "--batch"])
def test_counts_must_be_positive(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        breakdown.main([str(HOPE), "--device", "cpu", flag, "0"])
    assert e.value.code == 2
    assert f"argument {flag}: expected a positive integer, got '0'" in capsys.readouterr().err
