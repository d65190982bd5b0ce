"""The suite runner (nestlearn/suite): experiment files, the grid, resuming, results and tables.

Tiny models (dim 16, depth 1, a few steps) so that the whole file runs in seconds on one core."""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nestlearn.suite import SuiteError, load_experiment, run_suite
from nestlearn.suite.evaluate import task_at_length
from nestlearn.suite.params import resolve_specs
from nestlearn.suite.runner import SuiteRunner
from nestlearn.suite.stats import forgetting_percent, mean_std
from nestlearn.suite.table import Table, render, render_plain, render_rich
from nestlearn.tasks import LANGUAGES
from nestlearn.train import Trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = """\
name: tiny
seeds: 2
budget: {steps: 3, batch: 2, seq_len: 32, eval_batches: 1, device: cpu, threads: 1}
model: {dim: 16, depth: 1, heads: 2}
specs:
  - {path: specs/transformer.yaml, label: gpt}
  - {path: specs/deltanet.yaml, label: delta}
tasks:
  - {name: parity, options: {max_len: 8}, eval_lengths: [1, 2]}
"""


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def suite(path: Path, out: Path, **kw: object) -> tuple[int, str, str]:
    o, e = io.StringIO(), io.StringIO()
    code = run_suite(str(path), out=str(out), fmt="table", stdout=o, stderr=e, **kw)  # type: ignore[arg-type]
    return code, o.getvalue(), e.getvalue()


def test_grid_expands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    text = TINY.replace("  - {name: parity", "  - {name: mqar, label: mq, options: {n_pairs: 4}}\n  - {name: parity")
    exp = load_experiment(write(tmp_path, text), out=tmp_path / "o")
    grid = exp.grid()
    assert len(grid) == 2 * 2 * 2
    assert [r.key for r in grid[:4]] == ["mq/gpt/seed0", "mq/delta/seed0", "mq/gpt/seed1", "mq/delta/seed1"]
    assert len({r.key for r in grid}) == 8
    assert exp.seeds == [0, 1] and exp.tasks[1].eval_lengths == (1, 2)
    assert exp.specs[0].overrides[:3] == ("model.dim=16", "model.depth=1", "model.heads=2")
    assert {r.task.seq_len for r in grid} == {32} and {r.task.steps for r in grid} == {3}


def test_run_writes_results_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    exp, out = write(tmp_path, TINY), tmp_path / "out"
    code, table, log = suite(exp, out)
    assert code == 0, log
    data = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(data) == sorted(f"parity/{s}/seed{k}" for s in ("gpt", "delta") for k in (0, 1))
    for rec in data.values():
        assert rec["status"] == "done" and rec["tokens"] == 3 * 2 * 32 and rec["params"] > 0
        assert 0.0 <= rec["value"] <= 1.0 and set(rec["lengths"]) == {"1", "2"}
        assert rec["device"].startswith("cpu") and rec["torch"] and rec["date"] and rec["command"]
    # the evaluation at 1 x L is the validation itself (same batches, same model)
    assert math.isclose(data["parity/gpt/seed0"]["lengths"]["1"]["accuracy"], data["parity/gpt/seed0"]["value"])
    md = (out / "results.md").read_text()
    assert "| gpt |" in md and "acc@2L" in md and "plots/parity.png" in md
    assert (out / "plots" / "parity.png").exists() and (out / "plots" / "parity-lengths.png").exists()
    assert "gpt" in table and all(len(line) <= 80 for line in table.splitlines())
    summaries = sorted(out.glob("parity/*/seed*/summary.json"))
    assert len(summaries) == 4
    stamps = [p.stat().st_mtime_ns for p in summaries]

    code, _, log = suite(exp, out)  # a second invocation trains nothing
    assert code == 0 and log.count("kept (done") == 4 and "params, 3 steps" not in log
    assert [p.stat().st_mtime_ns for p in summaries] == stamps

    # a new evaluation length: evaluated from the kept checkpoints, nothing retrained
    code, _, log = suite(write(tmp_path, TINY.replace("[1, 2]", "[1, 2, 4]")), out)
    assert code == 0 and "resuming at step 3" in log, log
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    data = json.loads((out / "results.json").read_text())["runs"]
    assert all(set(r["lengths"]) == {"1", "2", "4"} for r in data.values())


def test_interrupted_grid_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    path, out = write(tmp_path, TINY), tmp_path / "out"
    code, _, log = suite(path, out, max_runs=1)  # stops after one run, like an interruption between runs
    assert code == 0 and "--max-runs" in log
    assert list(json.loads((out / "results.json").read_text())["runs"]) == ["parity/gpt/seed0"]
    # the second run interrupted mid-way: a checkpoint at step 2 of 3
    exp = load_experiment(path, out=out)
    runner = SuiteRunner(exp, command="test", quiet=True)
    runner.resolve()
    run = exp.grid()[1]
    cfg = runner.config(run)
    cfg.stop_at = 2
    runner._prepare_dir(run)
    assert Trainer(runner.specs[run.spec.label].spec, cfg, runner.run_dir(run)).fit()["status"] == "stopped"

    code, _, log = suite(path, out)
    assert code == 0
    assert "[1/4] gpt parity seed0: kept" in log and "resuming at step 2" in log
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 4 and all(r["status"] == "done" for r in runs.values())
    summary = json.loads((runner.run_dir(run) / "summary.json").read_text())
    assert summary["step"] == 3 and summary["steps_this_session"] == 1


def test_ctrl_c_saves_and_the_same_command_resumes(tmp_path: Path) -> None:
    """Ctrl-C mid-run: the step finishes, a checkpoint is saved, exit 130; rerun resumes there."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    path = write(tmp_path, TINY.replace("steps: 3", "steps: 2000").replace("seeds: 2", "seeds: 1"))
    cmd = [sys.executable, "-m", "nestlearn.suite", str(path), "--out", str(tmp_path / "out"), "--format", "md"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    for line in p.stderr:  # progress lines come every 200 steps
        if "step 200/2000" in line:
            p.send_signal(signal.SIGINT)
            break
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "interrupted at step" in err and "run the same command again" in err
    run_dir = tmp_path / "out" / "parity" / "gpt" / "seed0"
    assert (run_dir / "checkpoints" / "last.safetensors").exists()
    results = tmp_path / "out" / "results.json"
    assert not results.exists() or not json.loads(results.read_text())["runs"]  # nothing finished
    done = subprocess.run([*cmd, "--max-runs", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--max-runs" in done.stderr  # nothing trained, report written
    step = json.loads((run_dir / "summary.json").read_text())["step"]
    assert 200 <= step < 2000


def test_failed_length_evaluation_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nestlearn.suite.evaluate as ev

    monkeypatch.chdir(ROOT)
    text = TINY.replace("seeds: 2", "seeds: 1").replace("  - {path: specs/deltanet.yaml, label: delta}\n", "")
    path, out = write(tmp_path, text), tmp_path / "out"
    real = ev.task_at_length

    def broken(row, factor):  # type: ignore[no-untyped-def]
        if factor == 2:
            raise RuntimeError("out of memory (pretend)")
        return real(row, factor)

    monkeypatch.setattr(ev, "task_at_length", broken)
    code, _, log = suite(path, out)
    rec = json.loads((out / "results.json").read_text())["runs"]["parity/gpt/seed0"]
    assert code == 0 and set(rec["lengths"]) == {"1"} and "out of memory" in rec["length_errors"]["2"]
    assert "evaluation at 2L failed" in log
    monkeypatch.setattr(ev, "task_at_length", real)
    code, _, log = suite(path, out)
    rec = json.loads((out / "results.json").read_text())["runs"]["parity/gpt/seed0"]
    assert code == 0 and set(rec["lengths"]) == {"1", "2"} and "length_errors" not in rec
    assert "resuming at step 3" in log  # evaluated from the checkpoint, not retrained


def test_diverged_run_is_recorded_and_the_grid_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    text = TINY.replace("seeds: 2", "seeds: 1").replace("threads: 1}", "threads: 1, lr: 1.0e+30}")
    code, table, log = suite(write(tmp_path, text), tmp_path / "out")
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert len(runs) == 2
    diverged = [r for r in runs.values() if r["status"] == "diverged"]
    assert diverged and all(isinstance(r["diverged_step"], int) for r in diverged), log
    assert "diverged" in table and code == 0


BAD = [
    ("name: x\nspecs: [specs/transformer.yaml]\ntasks: [parity]\nbudget: {stepz: 3}\n",
     "exp.yaml:4:10: budget.stepz: unknown field"),
    ("name: x\nspecs: [specs/nope.yaml]\ntasks: [parity]\n", "exp.yaml:2:9: specs.0.path: no such spec file"),
    ("name: x\nspecs: [specs/transformer.yaml]\ntasks: [parityy]\n", "unknown task 'parityy' (did you mean"),
    ("name: x\nspecs: [specs/transformer.yaml]\ntasks: [{name: mqar, options: {pairs: 3}}]\n",
     "tasks.0.options: task 'mqar' has no option 'pairs'"),
    ("name: x\nspecs: [specs/transformer.yaml, specs/transformer.yaml]\ntasks: [parity]\n",
     "specs.1: the label 'transformer' is used twice"),
    ("name: x\nspecs: [specs/transformer.yaml]\ntasks: [{name: lm, metric: accuracy}]\n",
     "tasks.0.metric: 'accuracy' is not a metric of task 'lm'"),
    ("name: x\nspecs: [{path: specs/transformer.yaml, overrides: [model.dimm=3]}]\ntasks: [parity]\n",
     "spec 'transformer' does not build"),
    ("name: x\nspecs: [specs/transformer.yaml\n", "exp.yaml:3:1: invalid YAML"),
    ("- a list\n", "an experiment file is a mapping"),
    ("specs: [specs/transformer.yaml]\ntasks: [parity]\n", "name: this field is required"),
]


@pytest.mark.parametrize(("text", "expect"), BAD)
def test_bad_experiment_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expect: str) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(SuiteError) as err:
        exp = load_experiment(write(tmp_path, text))
        resolve_specs(exp)
    assert expect in str(err.value)


def test_data_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    corpus = tmp_path / "my corpus.txt"
    corpus.write_text("hello world, " * 400)
    exp = load_experiment(ROOT / "experiments" / "lm.yaml", data=str(corpus))
    assert exp.out.name == "lm-my-corpus" and exp.tasks[0].options["data"] == str(corpus)
    with pytest.raises(SuiteError, match="--data: .*does not exist"):
        load_experiment(ROOT / "experiments" / "lm.yaml", data=str(tmp_path / "nope"))
    with pytest.raises(SuiteError, match="has no 'lm' task"):
        load_experiment(ROOT / "experiments" / "formal.yaml", data=str(corpus))


def test_bad_input_exits_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    bad = write(tmp_path, "name: x\nspecs: [specs/transformer.yaml]\ntasks: [{name: parity, seq_len: -1}]\n")
    for args in ([str(bad)], [str(tmp_path / "missing.yaml")]):
        p = subprocess.run([sys.executable, "-m", "nestlearn.suite", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    assert "exp.yaml:3:" in p.stderr or "missing.yaml: no such experiment file" in p.stderr


def test_stale_results_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    text = TINY.replace("seeds: 2", "seeds: 1").replace("  - {path: specs/deltanet.yaml, label: delta}\n", "")
    out = tmp_path / "out"
    assert suite(write(tmp_path, text), out)[0] == 0
    with pytest.raises(SuiteError, match="other settings"):
        suite(write(tmp_path, text.replace("steps: 3", "steps: 4")), out)


def test_mean_std_matches_plain_computation() -> None:
    xs = [0.91, 0.87, 0.95, 0.5]
    m, s = mean_std(xs)  # type: ignore[misc]
    assert math.isclose(m, statistics.mean(xs)) and math.isclose(s, statistics.stdev(xs))
    assert mean_std([0.3]) == (0.3, 0.0) and mean_std([]) is None
    assert mean_std([1.0, float("nan"), 3.0]) == (2.0, math.sqrt(2.0))


def test_forgetting_by_hand() -> None:
    phases = ["code", "prose", "anbn"]
    # perf right after each phase (rows) on code, prose, anbn (columns)
    perf = [[4.0, 1.0, 0.5],
            [3.0, 5.0, 0.5],
            [1.0, 4.0, 0.9]]
    got = forgetting_percent(perf, phases)
    assert set(got) == {"code", "prose"}
    assert math.isclose(got["code"], 100 * (4.0 - 1.0) / 4.0)  # best right after learning it: 4.0
    assert math.isclose(got["prose"], 100 * (5.0 - 4.0) / 5.0)
    # a domain learned twice: its best is over every phase up to its last one
    got2 = forgetting_percent([[2.0, 0.1], [1.0, 1.0], [3.0, 1.0], [1.5, 2.0]], ["a", "b", "a", "b"])
    assert math.isclose(got2["a"], 50.0) and "b" not in got2
    assert forgetting_percent([[0.0, 1.0], [0.0, 2.0]], ["a", "b"]) == {"a": None}


@pytest.mark.parametrize("lang", ["parity", "abab_star", "anbncn"])
def test_longer_formal_strings_are_valid(lang: str) -> None:
    from nestlearn.suite.experiment import TaskRow

    row = TaskRow(lang, lang, {"max_len": 12}, 48, 3, "accuracy", (2, 4), "synthetic", 0)
    for f in (2, 4):
        task, seq_len = task_at_length(row, f)
        assert seq_len == 48 * f
        (b,) = task.eval_batches(4, seq_len, 1)
        seen = 0
        for r in range(4):
            text = bytes([b.inputs[r, 0].item()] + b.targets[r].tolist()).decode()
            for ex in text.split("\n")[:-1]:
                s, label = ex.split("=")
                assert 12 * f // 2 < len(s) <= 12 * f
                assert LANGUAGES[lang].accepts(s) == (label == "1")
                seen += 1
        assert seen > 0


def test_param_matching_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    text = TINY.replace("specs:", "params: {tolerance: 0.01}\nspecs:").replace(
        "{path: specs/deltanet.yaml, label: delta}", "{path: specs/titans-mal.yaml, label: titans}")
    exp = load_experiment(write(tmp_path, text))
    counts = {k: v.params for k, v in resolve_specs(exp).items()}
    from nestlearn.suite.params import param_flags

    assert set(param_flags(counts, exp.params)) == {"gpt", "titans"}  # far apart: both off the median
    exp = load_experiment(write(tmp_path, text.replace("{tolerance: 0.01}", "{tolerance: 0.10, match: dim}")))
    matched = resolve_specs(exp)
    assert matched["titans"].overrides[-1].startswith("model.dim=")
    assert abs(matched["titans"].params - matched["gpt"].params) / matched["gpt"].params < 0.25
    assert abs(matched["titans"].params - matched["gpt"].params) < abs(counts["titans"] - counts["gpt"])


def test_table_fits_80_columns() -> None:
    cols = ["spec", "params", "acc", "acc@2L", "acc@4L", "acc@8L", "flag"]
    rows = [["hope-no-selfmod", "207.3K", *["0.987±0.012"] * 4, "+14% params, 1 diverged@3"],
            ["transformer", "212.8K", *["0.500±0.001"] * 4, ""]]
    t = Table("parity (accuracy, higher is better)", cols, rows, notes=["mean ± sample std " * 8])
    text = render_plain([t], 80)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "hope-no-selfmod" in text and "+14% params" in text
    buf = io.StringIO()
    render_rich([t], buf, width=80)  # what a terminal shows
    assert all(len(line) <= 80 for line in buf.getvalue().splitlines()) and "0.987±0.012" in buf.getvalue()
    assert "hope-no-selfmod" in buf.getvalue()
    buf = io.StringIO()
    render([t], "md", file=buf)
    assert buf.getvalue().startswith("### parity") and "| hope-no-selfmod | 207.3K |" in buf.getvalue()
    buf = io.StringIO()
    render([t], "json", file=buf)
    assert json.loads(buf.getvalue())[0]["columns"] == cols
    buf = io.StringIO()
    render([t], None, file=buf)  # not a terminal: markdown by default
    assert buf.getvalue().startswith("### ")


def test_markdown_table_escapes_pipes_in_headings_and_cells() -> None:
    """A ``|`` in a heading or a cell stays inside its column: every line of the table has as
    many column separators as the heading (``nestlearn compare`` once printed a 9-column heading
    over 8-column rows)."""
    t = Table("t", ["spec", "bits/byte | acc"], [["a|b", "1.0"], ["c", "2.0"]])
    buf = io.StringIO()
    render([t], "md", file=buf)
    lines = [x for x in buf.getvalue().splitlines() if x.startswith("|")]
    seps = [len(re.findall(r"(?<!\\)\|", x)) for x in lines]
    assert len(lines) == 4 and set(seps) == {3}, lines


@pytest.mark.parametrize("name", ["formal", "recall", "niah", "continual", "lm", "ablations"])
def test_shipped_experiments_build(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    exp = load_experiment(ROOT / "experiments" / f"{name}.yaml")
    assert len(exp.seeds) >= 3 and exp.grid()
    exp.params.match = None  # building each spec once is the check; width matching: test above
    specs = resolve_specs(exp)
    assert set(specs) == {s.label for s in exp.specs} and all(s.params > 0 for s in specs.values())


def test_ablation_specs_train_every_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The HOPE ablations shipped for experiments/ablations.yaml run forward and backward, and
    every parameter gets a gradient (nothing left dangling by the edits)."""
    import torch

    import nestlearn

    monkeypatch.chdir(ROOT)
    for name in ("hope-no-selfmod", "hope-no-cms", "hope-one-cms"):
        spec = nestlearn.load_spec(f"experiments/specs/{name}.yaml", ["model.dim=16", "model.depth=1",
                                                                      "model.heads=2"], profile="none")
        model = nestlearn.compile(spec)
        logits, _ = model(torch.randint(0, 256, (2, 40)))
        logits.float().square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert logits.shape == (2, 40, 256) and not missing, (name, missing)


def _with_budget(tmp_path: Path, setting: str) -> tuple[Any, Any, SuiteRunner]:
    """TINY as it is, TINY with one more budget ``setting``, and a resolved runner of the latter."""
    off = load_experiment(write(tmp_path, TINY), out=tmp_path / "o")
    on = load_experiment(write(tmp_path, TINY.replace("threads: 1}", f"threads: 1, {setting}}}"), "on.yaml"),
                         out=tmp_path / "o")
    runner = SuiteRunner(on, command="test", quiet=True)
    runner.resolve()
    return off, on, runner


def test_carry_state_reaches_the_trainer_and_leaves_old_fingerprints_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``budget.carry_state`` is passed to every run's TrainConfig; off (the default), a run's
    fingerprint is what it was before the option existed, on it differs."""
    from nestlearn.suite.experiment import fingerprint

    monkeypatch.chdir(ROOT)
    off, on, runner = _with_budget(tmp_path, "carry_state: true")
    run_on, run_off = on.grid()[0], off.grid()[0]
    assert runner.config(run_on).carry_state
    assert fingerprint(run_off, off, "h") != fingerprint(run_on, on, "h")
    # the formal grid's results, recorded before the option existed, still match their runs
    stored = json.loads((ROOT / "bench/results/cpu_2026-12-06_suite/formal_results.json").read_text())["runs"]
    formal = load_experiment(ROOT / "experiments/formal.yaml", out=tmp_path / "f")
    fr = SuiteRunner(formal, command="test", quiet=True)
    fr.resolve()
    run = next(r for r in formal.grid() if r.key == "parity/transformer/seed0")
    assert fr.fingerprint(run) == stored["parity/transformer/seed0"]["fingerprint"]


def test_wavefront_reaches_the_trainer_and_leaves_the_fingerprint_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``budget.wavefront`` is execution only: passed to TrainConfig, the run's fingerprint the same."""
    from nestlearn.suite.experiment import fingerprint

    monkeypatch.chdir(ROOT)
    off, on, runner = _with_budget(tmp_path, "wavefront: 16")
    assert runner.config(on.grid()[0]).wavefront == 16
    assert fingerprint(off.grid()[0], off, "h") == fingerprint(on.grid()[0], on, "h")


def test_cuda_graph_budget_is_dropped_off_the_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``budget.cuda_graph`` is a speed setting: a GPU experiment file also runs on a CPU."""
    monkeypatch.chdir(ROOT)
    _, on, _ = _with_budget(tmp_path, "cuda_graph: true")
    assert SuiteRunner(on, command="test", device="cpu", quiet=True).config(on.grid()[0]).cuda_graph is False
    assert SuiteRunner(on, command="test", device="cuda", quiet=True).config(on.grid()[0]).cuda_graph is True


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_experiment_file_resolves(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each experiments/*.yaml validates, its specs build with their overrides and its sizes
    resolve (dims matched to the parameter policy): what `nestlearn suite --check` does."""
    monkeypatch.chdir(ROOT)
    exp = load_experiment(path, out=tmp_path / path.stem)
    runner = SuiteRunner(exp, command="test", quiet=True)
    runner.resolve()
    assert exp.grid()


def test_a_dead_seed_is_flagged_in_its_row() -> None:
    """A run that finished with its gradient at zero (DeadRunWatch) keeps its value but its row
    says so, as a diverged one does: a mean over a dead seed is not a model's result."""
    from nestlearn.suite.report import _flags

    row = {"seeds": 3, "done": 3, "diverged": 0, "diverged_at": [], "dead_at": [21, 19]}
    assert _flags(row, None) == ["2 dead@21,19"]
    assert _flags({**row, "dead_at": []}, "+14% params") == ["+14% params"]
