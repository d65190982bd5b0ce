"""Optional experiment loggers next to ``metrics.jsonl``: TensorBoard and Weights & Biases.

Every record the run writes to ``metrics.jsonl`` also goes to each logger as flat scalars at its
step: ``train/loss``, ``train/bits_per_byte``, ``train/lr``, ``train/grad_norm``,
``train/tokens_per_s``, ..., the per-level statistics as their own scalars
``levels/<name>/inner_loss``, ``levels/<name>/update_norm``, ``levels/<name>/chunk_gain`` and
``levels/<name>/peak_gain``, validation as ``val/...`` and a continual run's phases as
``phase/<domain>/...``. Rank 0 only. Neither package is required:
``pip install 'nestlearn[loggers]'`` installs both.
"""

from __future__ import annotations

import hashlib
import netrc
import os
from pathlib import Path
from typing import Any, Protocol

from nestlearn.train.errors import TrainError

INSTALL = "pip install 'nestlearn[loggers]'"


class Logger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record as ``{"split/name": value}`` (levels: ``levels/<name>/<stat>``; a
    continual run's phase record: ``phase/<domain>/<stat>``); numbers only."""
    split = str(record.get("split", "train"))
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    for key, value in record.items():
        if key in ("step", "split", "phase", "domain"):
            continue
        if key == "levels":
            walk("levels", value)
        elif key == "domains":
            walk("phase", value)
        else:
            walk(f"{split}/{key}", value)
    return out


class TensorBoardLogger:
    """``torch.utils.tensorboard.SummaryWriter`` into ``log_dir`` (``--tensorboard DIR``)."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainError(f"--tensorboard needs the tensorboard package: {INSTALL} (or pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=int(record["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run (``--wandb``) under the run directory, one per run directory
    (a resumed run continues it). Without an API key (``WANDB_API_KEY`` or ``wandb login``) or
    with ``WANDB_MODE=offline`` it logs offline, needing no network (``wandb sync`` uploads it
    later). The project is ``$WANDB_PROJECT``, else ``nestlearn``."""

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise TrainError(f"--wandb needs the wandb package: {INSTALL} (or pip install wandb)") from None
        self.mode = os.environ.get("WANDB_MODE") or ("online" if _has_wandb_key() else "offline")
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nestlearn"), name=name, id=run_id,
                              resume="allow", dir=str(run_dir), mode=self.mode,  # type: ignore[arg-type]
                              config=config)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_available(tensorboard: str | None, wandb: bool) -> None:
    """Fail before training starts when a requested logger's package is missing."""
    if tensorboard is not None:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise TrainError(f"--tensorboard needs the tensorboard package: {INSTALL} (or pip install tensorboard)") from None
    if wandb:
        try:
            import wandb as _wandb  # noqa: F401
        except ImportError:
            raise TrainError(f"--wandb needs the wandb package: {INSTALL} (or pip install wandb)") from None


def build(tensorboard: str | None, wandb: bool, run_dir: Path, name: str, config: dict[str, Any]) -> list[Logger]:
    loggers: list[Logger] = []
    if tensorboard is not None:
        loggers.append(TensorBoardLogger(tensorboard))
    if wandb:
        loggers.append(WandbLogger(run_dir, name, config))
    return loggers
