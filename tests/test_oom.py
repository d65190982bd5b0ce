"""A run that runs out of device memory ends with one message that says what to change, the
in-context levels' ``remat`` among it where that applies (HOPE at 65,536 tokens: its fast CMS
level's saved chunk weights alone are 64 GB, which no batch flag reduces)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import nestlearn
from nestlearn.train import TrainConfig, Trainer, TrainError, oom
from nestlearn.train.build import build_model

ROOT = Path(__file__).resolve().parent.parent
TINY = Path(__file__).parent / "data" / "tiny_run.yaml"


def _model(path: Path, *overrides: str) -> Any:
    return nestlearn.compile(nestlearn.load_spec(path, list(overrides), profile="none"))


def test_hope_is_told_which_levels_to_recompute() -> None:
    hope = _model(ROOT / "models" / "hope.yaml")
    assert oom.remat_candidates(hope.levels)[:2] == ["cms_fast", "selfmod"]  # period 16 first (name order on ties)
    text = oom.message("cuda", 3, 1, 65536, 1, hope)
    assert text.startswith("out of cuda memory at step 3 (batch 1 x 65536 bytes in 1 micro-batch(es))")
    assert "levels.cms_fast.remat=8 levels.selfmod.remat=8" in text and "docs/execution.md" in text
    # the shipped cms_fast keeps 1 MB a token (test_kept_per_token.py): 64 GB at 65,536 tokens
    assert text.endswith("cms_fast alone keeps at least 64.0 GB of fast state per micro-batch of 65536 tokens")
    assert "16.0 GB" in oom.message("cuda", 3, 16, 2048, 2, hope)  # 8 rows per micro-batch
    # a level that recomputes already is not suggested again
    assert "cms_fast" not in oom.remat_candidates(_model(ROOT / "models" / "hope.yaml", "levels.cms_fast.remat=8").levels)


def test_no_remat_advice_where_nothing_learns_in_context() -> None:
    text = oom.message("cuda", 1, 8, 2048, 1, _model(ROOT / "specs" / "transformer.yaml"))
    assert text.endswith("lower --batch or --seq-len, or raise --accum") and "remat" not in text


def test_a_training_run_out_of_memory_ends_with_the_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from nestlearn.train import loop

    calls = {"n": 0}

    def failing(spec: Any) -> torch.nn.Module:
        model = build_model(spec)
        real = model.forward

        def forward(*a: Any, **kw: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
            return real(*a, **kw)

        model.forward = forward  # type: ignore[method-assign]
        return model

    monkeypatch.setattr(loop, "build_model", failing)
    with pytest.raises(TrainError) as e:
        Trainer(nestlearn.load_spec(TINY), TrainConfig(steps=6, batch=2, seq_len=16, threads=1), tmp_path / "r").fit()
    msg = str(e.value)
    assert msg.startswith("out of cpu memory at step ") and "(batch 2 x 16 bytes" in msg, msg
    assert "add levels.memory.remat=8 (docs/execution.md, Recomputation); memory alone keeps at least " in msg, msg
    assert msg.endswith(" KB of fast state per micro-batch of 32 tokens"), msg
