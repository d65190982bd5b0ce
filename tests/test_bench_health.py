"""``python -m bench.health``: one row per spec, also with several runs at once (``--jobs``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def test_two_specs_at_once_give_both_rows(tmp_path: Path) -> None:
    out = tmp_path / "health"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.health", "specs/transformer.yaml", "specs/deltanet.yaml", "--device", "cpu",
         "--threads", "1", "--steps", "3", "--batch", "2", "--seq-len", "32", "--set", "model.dim=16",
         "--set", "model.depth=1", "--set", "model.heads=2", "--eval-batches", "1", "--eval-every", "2",
         "--jobs", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["spec"]: r for r in json.loads((out / "health.json").read_text())["rows"]}
    assert set(rows) == {"transformer", "deltanet"}
    for r in rows.values():
        assert r["steps"] == 3 and r["error"] is None and r["bits_per_byte"] is not None
        assert r["shared_device"] == 2
    evals = [json.loads(x) for x in (out / "transformer" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r.get("split") == "val"] == [2, 3]  # --eval-every 2, and the end
    table = proc.stdout.strip().splitlines()
    assert table[0].startswith("| spec |") and len(table) == 4
    assert "2 runs sharing the device" in table[2]


def test_one_spec_with_jobs_is_not_said_to_share_the_device(tmp_path: Path) -> None:
    """``--jobs 2`` with one spec runs it alone: its tokens/s is not marked as shared."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.health", "specs/transformer.yaml", "--device", "cpu", "--threads", "1",
         "--steps", "1", "--batch", "2", "--seq-len", "32", "--set", "model.dim=16", "--set", "model.depth=1",
         "--set", "model.heads=2", "--eval-batches", "1", "--jobs", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "health.json").read_text())["rows"]
    assert row["error"] is None and "shared_device" not in row
    assert "sharing the device" not in proc.stdout


def test_seconds_stops_a_run_with_its_evaluation(tmp_path: Path) -> None:
    from bench import health

    args = health.parse(["specs/transformer.yaml", "--device", "cpu", "--threads", "1", "--steps", "5", "--batch", "2",
                         "--seq-len", "32", "--set", "model.dim=16", "--set", "model.depth=1", "--set", "model.heads=2",
                         "--eval-batches", "1", "--seconds", "1e-9", "--out", str(tmp_path)])
    row = health.run_one("specs/transformer.yaml", args, tmp_path)
    assert row["steps"] == 1 and row["bits_per_byte"] is not None and row["error"] is None
    assert row["stopped_early"] and "stopped by --seconds at step 1" in health.table([row])
    assert "dead" not in health.table([row])
    assert "dead (zero gradient) from step 21" in health.table([{**row, "dead_since": 21}])


@pytest.mark.parametrize("lost_row", [False, True])
def test_resume_continues_a_row_stopped_by_seconds(tmp_path: Path, lost_row: bool) -> None:
    """A run cut by ``--seconds`` is continued from its checkpoint by ``--resume`` (the next device
    lease): the same run directory, every step once, the row complete afterwards. ``lost_row``:
    the process was killed after the checkpoint, before its row reached ``health.json`` (an outer
    timeout in the final evaluation); the checkpoint alone is enough."""
    from bench import health

    common = ["--device", "cpu", "--threads", "1", "--steps", "4", "--batch", "2", "--seq-len", "32",
              "--set", "model.dim=16", "--set", "model.depth=1", "--set", "model.heads=2", "--eval-batches", "1",
              "--out", str(tmp_path)]
    first = health.run_one("specs/transformer.yaml", health.parse(["specs/transformer.yaml", *common, "--seconds", "1e-9"]),
                           tmp_path)
    assert first["steps"] == 1 and first["stopped_early"]
    if not lost_row:
        (tmp_path / "health.json").write_text(json.dumps({"rows": [first]}))
    proc = subprocess.run([sys.executable, "-m", "bench.health", "specs/transformer.yaml", *common, "--resume"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "health.json").read_text())["rows"]
    assert row["steps"] == 4 and row["error"] is None and not row.get("stopped_early")
    train = [json.loads(x) for x in (tmp_path / "transformer" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r.get("split") == "train"] == [1, 2, 3, 4]
    assert row["tokens"] == 4 * 2 * 32 and row["tokens_per_s"] is not None
    assert "stopped by --seconds" not in proc.stdout


def test_training_column_is_the_mean_of_the_last_steps(tmp_path: Path) -> None:
    """The same-batch column: the mean training bits/byte of the last ``TRAIN_WINDOW`` steps
    (a non-finite step left out), with the steps it covers; evaluations are not part of it."""
    from bench import health

    lines = [{"step": s, "split": "train", "bits_per_byte": float(s), "grad_norm": 1.0, "tokens": 10 * s}
             for s in range(1, 61)]
    lines[-1]["bits_per_byte"] = float("nan")
    lines.append({"step": 60, "split": "val", "bits_per_byte": 0.5})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    row = health.summarise("x", tmp_path, 1.0, None, None, 7)
    assert row["train_window"] == [11, 59]
    assert row["train_bits_per_byte"] == pytest.approx(sum(range(11, 60)) / 49)
    assert row["bits_per_byte"] == 0.5
    assert f"| {row['train_bits_per_byte']:.3f} (11-59) |" in health.table([row])
    assert "| - |" in health.table([{**row, "train_window": None, "train_bits_per_byte": None}])


def test_the_largest_chunk_gain_is_kept_and_flagged_past_one(tmp_path: Path) -> None:
    """Each row keeps the largest per-level chunk gain of the run's recorded steps (with its level
    and step); the table's note flags it only past 1."""
    from bench import health

    lines = [{"step": s, "split": "train", "bits_per_byte": 2.0, "grad_norm": 1.0, "tokens": 10 * s,
              **({"levels": {"fast": {"chunk_gain": 0.1 * s}, "slow": {"chunk_gain": 0.05 * s}}} if s % 5 == 0 else {})}
             for s in range(1, 21)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    row = health.summarise("x", tmp_path, 1.0, None, None, 7)
    assert row["max_chunk_gain"] == {"level": "fast", "gain": pytest.approx(2.0), "step": 20}
    assert "chunk gain 2.00 > 1 at fast (step 20)" in health.table([row])
    calm = {**row, "max_chunk_gain": {"level": "fast", "gain": 0.5, "step": 5}}
    assert "chunk gain" not in health.table([calm])
