"""Optional loggers: ``--tensorboard DIR`` and ``--wandb`` (offline: no network) get every
metrics record, the per-level inner losses and update norms as their own scalars."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nestlearn.train import RunDir
from nestlearn.train.loggers import scalars
from tests.cli_run import nl

TINY = str(Path(__file__).parent / "data" / "tiny_run.yaml")
ARGS = ["--steps", "3", "--eval-every", "3", "--eval-batches", "1", "--batch", "2", "--seq-len", "16",
        "--threads", "1", "-q"]


def test_scalars_flatten_a_record() -> None:
    rec = {"step": 3, "split": "train", "loss": 2.0, "lr": 1e-3, "levels": {"memory": {"inner_loss": 0.5,
                                                                                      "update_norm": 0.1}}}
    assert scalars(rec) == {"train/loss": 2.0, "train/lr": 1e-3, "levels/memory/inner_loss": 0.5,
                            "levels/memory/update_norm": 0.1}
    assert scalars({"step": 3, "split": "val", "loss": 1.5, "bits_per_byte": 2.1}) == {"val/loss": 1.5,
                                                                                       "val/bits_per_byte": 2.1}


def test_tensorboard_gets_every_record(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, out = nl("run", TINY, *ARGS, "--tensorboard", tmp_path / "tb", "--out", tmp_path / "r")
    assert code == 0, out
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/bits_per_byte", "train/tokens_per_s", "val/loss", "val/bits_per_byte",
            "levels/memory/inner_loss", "levels/memory/update_norm"} <= tags
    train = [r for r in RunDir(tmp_path / "r").metrics() if r["split"] == "train"]
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [r["step"] for r in train]
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in train], rel=1e-6)


def test_wandb_offline_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    code, out = nl("run", TINY, *ARGS, "--wandb", "--out", tmp_path / "r")
    assert code == 0, out
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), out


@pytest.mark.parametrize(("flag", "module"), [("--tensorboard", "torch.utils.tensorboard"), ("--wandb", "wandb")])
def test_a_missing_logger_package_is_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       flag: str, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    args = [flag, str(tmp_path / "tb")] if flag == "--tensorboard" else [flag]
    code, out = nl("run", TINY, *ARGS, *args, "--out", tmp_path / "r")
    assert code == 1 and "pip install 'nestlearn[loggers]'" in out, out
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_empty_tensorboard_dir_is_refused(tmp_path: Path) -> None:
    code, out = nl("run", TINY, *ARGS, "--tensorboard", " ", "--out", tmp_path / "r")
    assert code == 1 and "--tensorboard: the directory is empty" in out
