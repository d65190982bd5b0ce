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


# ----------------------------------------------------------------------------- resuming


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("bad") / "run"
    code, out = nl("run", TINY, "--batch", "2", "--seq-len", "16", "--steps", "4", "--threads", "1", "-q",
                   "--stop-at", "2", "--out", run)
    assert code == 0, out
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "copy"))


@pytest.mark.parametrize(("args", "message"), [
    (["--batch", "4"], "data stream has batch=2 but this run has 4"),
    (["--seq-len", "32"], "data stream has seq_len=16 but this run has 32"),
    (["--steps", "1"], "the checkpoint is at step 2, past --steps 1"),
    (["model.dim=64"], "model.dim: 32 -> 64"),
    (["--task", "parity"], "data stream has task="),
])
def test_a_refused_resume_leaves_the_run_directory_as_it_was(stopped: Path, tmp_path: Path, args: list[str],
                                                             message: str) -> None:
    run = _copy(stopped, tmp_path)
    before = {p: (run / p).read_bytes() for p in ("spec.yaml", "config.json", "metrics.jsonl")}
    code, out = nl("run", run, "--resume", *args)
    assert code == 1 and message in out, out
    assert {p: (run / p).read_bytes() for p in before} == before  # was rewritten: the run could never resume
    code, out = nl("run", run, "--resume", "-q")
    assert code == 0, out


def test_damaged_metrics_lines_are_skipped(stopped: Path, tmp_path: Path) -> None:
    run = _copy(stopped, tmp_path)
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(b'\xff\xfe not utf-8\n[1]\n"x"\n{"step": "a"}\n{"step": 1, "split": "train", "loss": "x", "levels": 5}\n')
    pytest.importorskip("matplotlib")
    code, out = nl("plot", run, "-o", tmp_path / "c.png")
    assert code == 0 and (tmp_path / "c.png").exists(), out
    code, out = nl("run", run, "--resume", "-q")  # was an internal UnicodeDecodeError
    assert code == 0, out


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lr", "abc", "--lr: must be a positive finite number, got 'abc'"),
    ("batch", 3.5, "--batch: must be a whole number"),
    ("task_options", [1], "--task-opt: must be KEY=VALUE pairs"),
])
def test_hand_edited_config_json(stopped: Path, tmp_path: Path, key: str, value: object, message: str) -> None:
    import json

    run = _copy(stopped, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    cfg[key] = value
    (run / "config.json").write_text(json.dumps(cfg))
    code, out = nl("run", run, "--resume", "-q")
    assert code == 1 and message in out and "internal error" not in out, out


def test_config_json_not_an_object(stopped: Path, tmp_path: Path) -> None:
    run = _copy(stopped, tmp_path)
    (run / "config.json").write_text("[1, 2]\n")
    code, out = nl("run", run, "--resume", "-q")
    assert code == 1 and "config.json is unreadable or corrupt (expected a JSON object, got list)" in out, out


# ----------------------------------------------------------------------------- compile / plot


def test_compile_tokens_has_a_ceiling() -> None:
    code, out = nl("compile", TINY, "--tokens", HUGE)  # the schedule was built until memory ran out
    assert code == 2 and "10000000" in out, out


def test_plot_output_a_directory_or_without_suffix(stopped: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    code, out = nl("plot", stopped, "-o", tmp_path)
    assert code == 1 and "is a directory" in out, out
    code, out = nl("plot", stopped, "-o", tmp_path / "curves")  # matplotlib wrote curves.png, said "wrote curves"
    assert code == 0 and f"wrote {tmp_path / 'curves.png'}" in out and (tmp_path / "curves.png").is_file(), out
