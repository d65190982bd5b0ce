"""What a run reports: wall-clock tokens/s that agree across metrics.jsonl, the progress line,
the summary and a stopwatch; the summary's train loss from step 1 after a resume; a labelled
smoothed loss; the plot in one unit; a warm-up longer than the run refused."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from nestlearn.train import RunDir
from tests.cli_run import nl

TINY = str(Path(__file__).parent / "data" / "tiny_run.yaml")
FAST = ["--batch", "2", "--seq-len", "16", "--threads", "1"]
PER_STEP = 2 * 16


def train_records(run: Path) -> list[dict]:
    return [r for r in RunDir(run).metrics() if r.get("split") == "train"]


def test_tokens_per_s_is_wall_clock_everywhere(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    code, out = nl("run", TINY, "--steps", "6", "--eval-every", "1", "--eval-batches", "2", *FAST, "-q",
                   "--out", tmp_path / "r")
    stopwatch = time.perf_counter() - t0
    assert code == 0, out
    recs = train_records(tmp_path / "r")
    assert [r["step"] for r in recs] == list(range(1, 7))
    for r in recs:  # the rate is the record's own tokens over its own time (evaluations included)
        assert r["tokens"] == r["step"] * PER_STEP
        assert math.isclose(r["tokens_per_s"] * r["time"], r["tokens"], rel_tol=1e-9)
    assert all(a["time"] < b["time"] for a, b in zip(recs, recs[1:]))
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert math.isclose(s["tokens_per_s"] * s["time_s"], 6 * PER_STEP, rel_tol=1e-9)
    assert recs[-1]["time"] <= s["time_s"] <= stopwatch
    assert s["tokens_per_s"] >= 6 * PER_STEP / stopwatch


def test_resume_keeps_step_one_loss_and_counts_its_own_tokens(tmp_path: Path) -> None:
    args = ["--steps", "6", *FAST, "-q", "--ckpt-every", "2"]
    assert nl("run", TINY, *args, "--out", tmp_path / "full")[0] == 0
    assert nl("run", TINY, *args, "--stop-at", "3", "--out", tmp_path / "part")[0] == 0
    code, out = nl("run", tmp_path / "part", "--resume", "-q")
    assert code == 0, out
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    part = json.loads((tmp_path / "part" / "summary.json").read_text())
    step1 = train_records(tmp_path / "full")[0]
    assert step1["step"] == 1 and part["first_loss"] == full["first_loss"] == step1["loss"]
    later = [r for r in train_records(tmp_path / "part") if r["step"] > 3]
    for r in later:  # tokens: the whole run's; the rate: this session's tokens over its time
        assert r["tokens"] == r["step"] * PER_STEP
        assert math.isclose(r["tokens_per_s"] * r["time"], r["tokens"] - 3 * PER_STEP, rel_tol=1e-9)


def test_progress_line_says_its_loss_is_smoothed(tmp_path: Path) -> None:
    code, out = nl("run", TINY, "--steps", "2", *FAST, "--out", tmp_path / "r")
    assert code == 0, out
    assert "(smoothed)" in out


@pytest.mark.parametrize(("warmup", "ok"), [("7", False), ("6", True)])
def test_warmup_longer_than_the_run_is_refused(tmp_path: Path, warmup: str, ok: bool) -> None:
    code, out = nl("run", TINY, "--steps", "6", "--warmup", warmup, *FAST, "-q", "--out", tmp_path / "r")
    if ok:
        assert code == 0, out
        return
    assert code == 1
    assert "--warmup 7 is longer than the run (--steps 6)" in out and "at most 6 warm-up steps" in out
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_plot_shows_training_and_validation_in_bits_per_byte(tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nestlearn.cli.compare_cmds import curves_figure

    assert nl("run", TINY, "--steps", "4", "--eval-every", "2", *FAST, "-q", "--out", tmp_path / "r")[0] == 0
    recs = RunDir(tmp_path / "r").metrics()
    fig = curves_figure(plt, [("r", recs)], 1)
    train_ax, val_ax = fig.axes[:2]
    assert "bits/byte" in train_ax.get_ylabel() and "bits/byte" in val_ax.get_ylabel()
    assert "bits/byte" in train_ax.get_title() and "bits/byte" in val_ax.get_title()
    train = [r for r in recs if r["split"] == "train"]
    assert list(train_ax.lines[0].get_ydata()) == pytest.approx([r["bits_per_byte"] for r in train])
    val = [r for r in recs if r["split"] == "val"]
    assert list(val_ax.lines[0].get_ydata()) == pytest.approx([r["bits_per_byte"] for r in val])
    plt.close(fig)
