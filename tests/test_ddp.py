"""Data parallelism: ``torchrun --nproc-per-node 2 -m nestlearn run`` on CPU (gloo) trains on the
same global batch as one process, so it reports the same losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from nestlearn.train import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = str(Path(__file__).parent / "data" / "tiny_run.yaml")
ARGS = ["--steps", "4", "--batch", "4", "--seq-len", "32", "--accum", "2", "--threads", "1", "-q"]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
def test_two_cpu_processes_match_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cpu = [*ARGS, "--device", "cpu"]  # gloo on CPU even where a GPU is present
    one = subprocess.run([sys.executable, "-m", "nestlearn", "run", TINY, *cpu, "--out", str(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "nestlearn", "run", TINY, *cpu, "--out", str(tmp_path / "two")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    assert "Traceback" not in two.stderr
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    pa = load_file(tmp_path / "one" / "checkpoints" / "last.safetensors")
    pb = load_file(tmp_path / "two" / "checkpoints" / "last.safetensors")
    for k in pa:
        if k.startswith("model/"):
            assert (pa[k] - pb[k]).abs().max() < 1e-4, k
    import json

    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
                    reason="needs 2 CUDA devices and NCCL")
def test_two_gpus_over_nccl_match_one_gpu(tmp_path: Path) -> None:
    args = [*ARGS, "--device", "cuda", "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NVIDIA_TF32_OVERRIDE": "0"}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, "-m", "nestlearn", "run", TINY, *args, "--out", str(tmp_path / "one")],
                         cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": "0"}, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "nestlearn", "run", TINY, *args, "--out", str(tmp_path / "two")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
