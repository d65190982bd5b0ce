"""A bad-input sweep of the CLI: each input here once gave a traceback-like message, an exit 0,
an "internal error" or lost data; each must now end in one clear message and a non-zero exit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.cli_run import nl

TINY = Path(__file__).parent / "data" / "tiny_run.yaml"
FAST = ["--batch", "2", "--seq-len", "16", "--steps", "2", "--threads", "1", "-q"]
HUGE = "99999999999999999999999"


def _spec(tmp_path: Path, old: str, new: str) -> Path:
    text = TINY.read_text()
    assert old in text
    path = tmp_path / "spec.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize(("old", "new", "where"), [
    ("lr: 3.0e-3", "lr: .nan", "levels.outer.rule.lr: expected a finite number, got nan"),
    ("lr: 3.0e-3", "lr: .inf", "levels.outer.rule.lr: expected a finite number, got inf"),
    ("beta: 0.9", "beta: -.inf", "levels.memory.rule.beta: expected a finite number, got -inf"),
    ("dim: 32", "dim: true", "model.dim: expected an integer, got true"),
    ("window: 64", "window: true", "block.1.window: expected an integer, got true"),
    ("period: 8", "period: true", "levels.memory.period: expected 'outer' or an integer > 0, got true"),
    ("beta: 0.9", "beta: false", "levels.memory.rule.beta: expected a number"),
])
def test_non_finite_and_boolean_numbers_are_spec_errors(tmp_path: Path, old: str, new: str, where: str) -> None:
    spec = _spec(tmp_path, old, new)
    code, out = nl("validate", spec)
    assert code == 1 and re.search(r"spec\.yaml:\d+:\d+: ", out) and where in out, out


def test_non_finite_override_is_a_spec_error() -> None:
    code, out = nl("validate", TINY, "levels.memory.rule.beta=.nan")
    assert code == 1 and "levels.memory.rule.beta: expected a finite number, got nan" in out, out


def test_a_size_beyond_int64_is_one_line_without_torch_frames(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "dim: 32", "dim: 99999999999999999999999998")
    for args in (("compile", spec), ("run", spec, *FAST, "--out", tmp_path / "r")):
        code, out = nl(*args)
        assert code == 1 and "Overflow" in out, out
        assert "frame #" not in out and "Exception raised from" not in out, out
        assert len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- numeric flags


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--batch", HUGE, "--batch: must be at most 2147483647"),
    ("--eval-batches", HUGE, "--eval-batches: must be at most 2147483647"),
    ("--seed", HUGE, "--seed: must be at most 9223372036854775807"),
    ("--threads", "100000", "--threads: must be at most 1024"),  # torch segfaulted
])
def test_huge_whole_number_flags(tmp_path: Path, flag: str, value: str, message: str) -> None:
    code, out = nl("run", TINY, *FAST, flag, value, "--out", tmp_path / "r")
    assert code == 1 and message in out and "internal error" not in out, out
    assert not (tmp_path / "r").exists()


def test_huge_seed_of_generate() -> None:
    code, out = nl("generate", TINY.parent, "--seed", HUGE)
    assert code == 1 and "--seed: must be at most" in out, out
