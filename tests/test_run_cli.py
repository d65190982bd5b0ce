"""``nestlearn run / eval / generate / plot / compare`` end to end, and every bad input a user can
give them: one clear message, exit code 1, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_run import nl

ROOT = Path(__file__).resolve().parents[1]
TINY = str(Path(__file__).parent / "data" / "tiny_run.yaml")
HOPE = ROOT / "models" / "hope.yaml"
FAST = ["--batch", "4", "--seq-len", "32", "--threads", "1", "-q"]




@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    code, out = nl("run", TINY, "--steps", "30", *FAST, "--out", run)
    assert code == 0, out
    return run


# ----------------------------------------------------------------------------- the happy paths


def test_run_trains_and_prints_a_summary(tmp_path: Path) -> None:
    code, out = nl("run", TINY, "--steps", "12", "--batch", "4", "--seq-len", "32", "--threads", "1",
                   "--out", tmp_path / "r")
    assert code == 0, out
    assert "summary" in out and "train loss" in out and "bits/byte" in out and "validation" in out
    assert "level memory" in out and "inner loss" in out and "update norm" in out
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["status"] == "done" and s["train"]["loss"] < s["first_loss"]
    assert set(s["train"]["levels"]["memory"]) == {"inner_loss", "update_norm", "chunk_gain", "peak_gain"}


def test_run_with_compile(tmp_path: Path) -> None:
    code, out = nl("run", TINY, "--steps", "3", "--batch", "4", "--seq-len", "32", "--threads", "1",
                   "--compile", "--out", tmp_path / "c")
    assert code == 0, out
    assert out.count("--compile: the inner loops of level 'memory' run their chunk loop eagerly") == 1, out
    assert "failed" not in out
    s = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert s["status"] == "done" and json.loads((tmp_path / "c" / "config.json").read_text())["compile"] is True


@pytest.mark.skipif(not HOPE.exists(), reason="models/hope.yaml not written yet")
def test_wavefront_trains_as_the_block_loop(tmp_path: Path) -> None:
    """``--wavefront 8`` (the blocks over segments of 8 bytes, depth 2) logs the same losses and
    gradient norms as the plain run: the same math in another order."""
    logs = []
    for name, extra in (("plain", ["-q"]), ("wave", ["--wavefront", "8"])):
        fast = [a for a in FAST if a != "-q"]
        code, out = nl("run", TINY, "model.depth=2", "--steps", "4", *fast, "--out", tmp_path / name, *extra)
        assert code == 0, out
        if name == "wave":  # said once: what it does to this run
            assert "--wavefront 8: 2 blocks over 4 segments of up to 8 tokens, 5 steps instead of 8" in out, out
        recs = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        logs.append([(r["loss"], r["grad_norm"]) for r in recs if r.get("split") == "train"])
    assert len(logs[0]) == 4
    for a, b in zip(*logs, strict=True):
        assert a == pytest.approx(b, rel=1e-4), logs


def test_default_spec_at_a_tiny_override_learns(tmp_path: Path) -> None:
    code, out = nl("run", HOPE, "model.dim=32", "model.depth=1", "--steps", "25", *FAST, "--out", tmp_path / "h")
    assert code == 0, out
    s = json.loads((tmp_path / "h" / "summary.json").read_text())
    assert s["status"] == "done" and s["train"]["loss"] < s["first_loss"] - 0.5, s
    assert set(s["train"]["levels"]) >= {"selfmod", "cms_fast"}


def test_eval_reports_bits_per_byte_and_perplexity(trained: Path) -> None:
    code, out = nl("eval", trained, "--batches", "2")
    assert code == 0, out
    assert "bits per byte" in out and "perplexity" in out
    res = json.loads((trained / "eval.json").read_text())
    assert res["step"] == 30 and res["val"]["perplexity"] > 1
    code, out = nl("eval", trained, "--batches", "1", "--json")
    assert code == 0 and json.loads(out)["val"]["loss"] > 0


def test_eval_niah_accuracy_by_length(tmp_path: Path) -> None:
    run = tmp_path / "niah"
    code, out = nl("run", TINY, "--task", "niah", "--steps", "2", "--batch", "2", "--seq-len", "128",
                   "--threads", "1", "-q", "--out", run)
    assert code == 0, out
    code, out = nl("eval", run, "--batches", "1", "--lengths", "128,160")
    assert code == 0, out
    assert "passkey accuracy at 128 bytes" in out and "passkey accuracy at 160 bytes" in out


def test_generate_carries_the_state(trained: Path) -> None:
    code, out = nl("generate", trained, "--prompt", "def main(", "--tokens", "24", "--seed", "1")
    assert code == 0, out
    assert out.startswith("def main(") and len(out.encode()) >= len("def main(") + 10
    code2, out2 = nl("generate", trained, "--prompt", "def main(", "--tokens", "24", "--seed", "1")
    assert out2 == out  # seeded sampling is reproducible


def test_generate_equals_feeding_the_whole_text(trained: Path) -> None:
    """Byte-at-a-time generation with the carried state == one forward over the text (greedy)."""
    from nestlearn.train.evaluate import generate, load_run

    lr = load_run(trained, "cpu")
    prompt = b"import os\n"
    out = b"".join(generate(lr.model, prompt, 12, temperature=0.0))
    with torch.no_grad():
        full = torch.tensor([list(prompt + out)])
        logits, _ = lr.model(full)
    greedy = logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
    assert greedy == list(out)


def test_plot_writes_a_png(trained: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    code, out = nl("plot", trained, trained, "-o", png)
    assert code == 0, out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_message(trained: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out = nl("plot", trained, "-o", tmp_path / "x.png")
    assert code == 1 and "pip install matplotlib" in out


def test_compare_prints_one_table(tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(Path(TINY).read_text().replace("name: tiny-run", "name: tiny-sgd")
                     .replace("{name: momentum, lr: {gate: token, max: 0.02}, beta: 0.9, decay: 0.01}",
                              "{name: sgd, lr: 0.01}"))
    code, out = nl("compare", TINY, other, "--steps", "3", "--batch", "2", "--seq-len", "16", "-q",
                   "--out", tmp_path / "cmp")
    assert code == 0, out
    assert "comparison" in out and "tiny-run" in out and "tiny-sgd" in out
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["spec"] for r in rows] == ["tiny-run", "tiny-sgd"]


def test_compare_formats_for_pipes(tmp_path: Path) -> None:
    """Not on a terminal: markdown by default, lines within 80 columns with --format table, and
    --format json prints the runs' summaries alone on stdout."""
    args = ["--steps", "1", "--batch", "2", "--seq-len", "16", "-q"]
    code, out = nl("compare", TINY, *args, "--out", tmp_path / "md")
    assert code == 0 and "| spec |" in out and "tiny-run" in out, out
    md = [line for line in out.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in md}) == 1 and "| bits/byte |" in md[0], md  # heading and rows agree
    code, out = nl("compare", TINY, *args, "--format", "table", "--out", tmp_path / "plain")
    table = out[out.index("comparison"):out.index("runs in")]
    assert code == 0 and "tiny-run" in table and max(len(line) for line in table.splitlines()) <= 80, out
    code, out = nl("compare", TINY, *args, "--format", "json", "--out", tmp_path / "json")
    assert code == 0
    from typer.testing import CliRunner

    from nestlearn.cli import app

    res = CliRunner().invoke(app, ["compare", TINY, *args, "--format", "json", "--out", str(tmp_path / "json2")])
    assert res.exit_code == 0 and [r["spec"] for r in json.loads(res.stdout)] == ["tiny-run"]
    code, out = nl("compare", TINY, *args, "--format", "xml", "--out", tmp_path / "bad")
    assert code == 1 and "--format: expected one of md, json, table" in out


def test_resume_through_the_cli_equals_one_run(tmp_path: Path) -> None:
    args = ["--steps", "8", *FAST, "--ckpt-every", "3"]
    assert nl("run", TINY, *args, "--out", tmp_path / "full")[0] == 0
    code, out = nl("run", TINY, *args, "--stop-at", "5", "--out", tmp_path / "part")
    assert code == 0 and "resume with: nestlearn run" in out, out
    code, out = nl("run", tmp_path / "part", "--resume", "-q")  # the run's own settings
    assert code == 0, out
    a = load_file(tmp_path / "full" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "part" / "checkpoints" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng/"))


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    (tmp_path / "emptydir").mkdir()
    return {"empty": empty, "emptydir": tmp_path / "emptydir", "root": tmp_path}


BAD_RUNS = {
    "missing data": (["--data", "{root}/nope.txt"], "does not exist"),
    "empty data file": (["--data", "{empty}"], "is empty"),
    "empty data folder": (["--data", "{emptydir}"], "is empty"),
    "empty data path": (["--data", ""], "the path is empty"),
    "data for a synthetic task": (["--task", "mqar", "--data", "{empty}"], "applies to --task lm"),
    "unknown task": (["--task", "lmm"], "unknown task 'lmm' (did you mean 'lm'?)"),
    "bad task option": (["--task", "mqar", "--task-opt", "n_pair=3"], "did you mean 'n_pairs'"),
    "steps not a number": (["--steps", "ten"], "--steps: expected a whole number"),
    "zero batch": (["--batch", "0"], "--batch: must be at least 1"),
    "negative lr": (["--lr", "-1"], "--lr: must be a finite number > 0"),
    "nan lr": (["--lr", "nan"], "--lr: must be a finite number"),
    "zero time limit": (["--time-limit", "0"], "--time-limit: must be a finite number > 0"),
    "time limit not a number": (["--time-limit", "soon"], "--time-limit: expected a number"),
    "bad device": (["--device", "tpu"], "--device: expected one of auto, cpu, cuda"),
    "zero wavefront": (["--wavefront", "0"], "--wavefront: must be at least 1"),
    "wavefront not a number": (["--wavefront", "half"], "--wavefront: expected a whole number"),
    "bad precision": (["--precision", "fp8"], "--precision: expected one of"),
    "accum not dividing": (["--accum", "3"], "cannot be split into 3"),
    "bad override": (["model.dimm=3"], "dimm"),
    "resume without a run": (["--resume", "--out", "{root}/none"], "does not exist"),
}
if not torch.cuda.is_available():
    BAD_RUNS["cuda without a GPU"] = (["--device", "cuda"], "CUDA is not available")
    BAD_RUNS["fp16 on CPU"] = (["--precision", "fp16"], "fp16 needs a CUDA device")


@pytest.mark.parametrize("name", list(BAD_RUNS))
def test_bad_run_input_exits_1_with_one_message(name: str, files: dict[str, Path]) -> None:
    args, expect = BAD_RUNS[name]
    args = [a.format(**files) for a in args]
    code, out = nl("run", TINY, "--steps", "2", *FAST, *(["--out", files["root"] / "o"] if "--out" not in args else []),
                   *args)
    assert code == 1, out
    assert expect in out, out
    assert not (files["root"] / "o" / "checkpoints" / "last.safetensors").exists()


def test_missing_spec_and_non_run_dirs(tmp_path: Path) -> None:
    code, out = nl("run", tmp_path / "nope.yaml")
    assert code == 1 and "no such spec file" in out
    for cmd in (["eval"], ["generate"], ["plot"]):
        code, out = nl(*cmd, tmp_path / "missing")
        assert code == 1 and "does not exist" in out, out
    (tmp_path / "plain").mkdir()
    code, out = nl("eval", tmp_path / "plain")
    assert code == 1 and "not a nestlearn run directory" in out


def test_existing_run_and_wrong_spec_and_corrupt_checkpoint(trained: Path, tmp_path: Path) -> None:
    code, out = nl("run", TINY, "--steps", "2", *FAST, "--out", trained)
    assert code == 1 and "already holds a run" in out
    code, out = nl("run", TINY, "model.dim=16", "--steps", "40", *FAST, "--out", trained, "--resume")
    assert code == 1 and "another spec" in out and "model.dim: 32 -> 16" in out, out
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(trained), str(broken)], check=True)
    ck = broken / "checkpoints" / "last.safetensors"
    ck.write_bytes(ck.read_bytes()[:500])
    for cmd in (["run", broken, "--resume", "--steps", "40"], ["eval", broken], ["generate", broken]):
        code, out = nl(*cmd)
        assert code == 1 and "is corrupt" in out, out
    assert ck.stat().st_size == 500  # nothing overwrote it


def test_nan_loss_names_step_and_level(tmp_path: Path) -> None:
    code, out = nl("run", TINY, "levels.memory.rule.lr.max=1.0e6", "--steps", "3", *FAST, "--out", tmp_path / "n")
    assert code == 1, out
    # the rate is far over the chunk-step bound: one warning first says so (docs/training-health.md)
    warning, out = out.split("\n", 1)
    assert warning.startswith("warning: ") and "levels.memory.rule.lr: chunk step" in warning
    assert "diverged at step 1" in out and "level 'memory'" in out
    assert out.startswith("error: training diverged") and out.count("error") == 1 and len(out.splitlines()) == 1
    assert "no checkpoint had been written yet" in out
    assert json.loads((tmp_path / "n" / "summary.json").read_text())["status"] == "diverged"
    # a later divergence keeps the checkpoint of the step before it, and says where it is
    code, out = nl("run", TINY, "--lr", "1000", "--clip", "0", "--ckpt-every", "1", "--steps", "30", *FAST,
                   "--out", tmp_path / "late")
    assert code == 1 and len(out.splitlines()) == 1, out
    step = json.loads((tmp_path / "late" / "summary.json").read_text())["step"]
    assert f"diverged at step {step + 1}:" in out
    assert f"the last good checkpoint is kept: {tmp_path / 'late' / 'checkpoints' / 'last.safetensors'} (step {step})" in out
    from nestlearn.train import load_checkpoint

    assert load_checkpoint(tmp_path / "late" / "checkpoints" / "last.safetensors").step == step


def test_bad_generate_and_eval_flags(trained: Path) -> None:
    for args, expect in ((["generate", trained, "--tokens", "x"], "--tokens"),
                         (["generate", trained, "--temperature", "-1"], "--temperature"),
                         (["eval", trained, "--lengths", "a,b"], "--lengths"),
                         (["eval", trained, "--device", "gpu"], "--device")):
        code, out = nl(*args)
        assert code == 1 and expect in out, out


# ----------------------------------------------------------------------------- Ctrl-C


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path: Path) -> None:
    run = tmp_path / "int"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nestlearn", "run", TINY, "--steps", "100000", "--batch", "2", "--seq-len", "16",
         "--threads", "1", "--out", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.stat().st_size < 2000):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err
    assert f"resume with: nestlearn run {run} --resume" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["checkpoint_step"] == summary["step"] > 0
    from nestlearn.train import load_checkpoint

    assert load_checkpoint(run / "checkpoints" / "last.safetensors").step == summary["step"]
