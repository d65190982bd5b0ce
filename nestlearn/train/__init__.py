"""Training: the outer loop, checkpoints, metrics, run directories and data parallelism.

    from nestlearn.train import TrainConfig, train
    summary = train(spec, TrainConfig(task="lm", steps=200), out="runs/mine")
"""

from nestlearn.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, spec_hash
from nestlearn.train.config import TrainConfig
from nestlearn.train.errors import CheckpointError, DivergedError, TrainError
from nestlearn.train.loop import Trainer, train
from nestlearn.train.metrics import MetricsLog, read_metrics
from nestlearn.train.reporting import Reporter
from nestlearn.train.rundir import RunDir, default_run_dir

__all__ = [
    "TrainConfig", "Trainer", "train", "Reporter", "TrainError", "CheckpointError", "DivergedError",
    "Checkpoint", "load_checkpoint", "save_checkpoint", "spec_hash", "MetricsLog", "read_metrics",
    "RunDir", "default_run_dir",
]
