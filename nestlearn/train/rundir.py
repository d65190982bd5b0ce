"""The run directory: everything a user needs to inspect, resume, evaluate and compare a run.

    RUN/
      spec.yaml          the resolved spec (profile and overrides applied): `nestlearn run RUN/spec.yaml`
                         rebuilds it
      config.json        the training settings (task, steps, batch, ...)
      metrics.jsonl      one JSON record per line (see nestlearn.train.metrics)
      checkpoints/last.safetensors
      summary.json       written at the end (or on Ctrl-C / divergence)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from nestlearn.files import atomic_write
from nestlearn.train.config import TrainConfig
from nestlearn.train.errors import TrainError


def default_run_dir(spec_name: str, root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in spec_name) or "run"
    path = Path(root) / f"{safe}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{safe}-{stamp}-{n}"
    return path


def spec_yaml(spec: Any, profile: str | None = None) -> str:
    from nestlearn.train.checkpoint import spec_data

    how = f"profile '{profile}' and overrides applied" if profile else "overrides applied"
    return f"# resolved by nestlearn ({how})\n" + yaml.safe_dump(spec_data(spec), sort_keys=False)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def spec_path(self) -> Path:
        return self.path / "spec.yaml"

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def ckpt_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.ckpt_dir / "last.safetensors"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    # -------------------------------------------------------------- creating / resuming
    def prepare(self, spec: Any, config: TrainConfig, resume: bool, write: bool = True,
                task: str | None = None) -> None:
        """Check the directory fits the request (``--resume`` or a fresh run) and write the
        resolved spec and settings (rank 0 only: ``write``); ``task``: the data stream's
        description, which a resume must match too."""
        if self.path.exists() and not self.path.is_dir():
            raise TrainError(f"--out {self.path}: exists and is not a directory")
        has_ckpt = self.last_checkpoint.exists()
        if resume and not has_ckpt:
            where = "does not exist" if not self.path.exists() else f"has no checkpoint ({self.last_checkpoint})"
            raise TrainError(f"--resume: the run directory {self.path} {where}; "
                             "start without --resume, or give the run's --out")
        if not resume and has_ckpt:
            raise TrainError(f"--out {self.path} already holds a run (with a checkpoint); add --resume to "
                             "continue it, or choose another --out")
        if not write:
            return
        if resume:  # a refused resume must not first overwrite the spec.yaml / config.json it needs
            from nestlearn.train.checkpoint import check_resumable

            settings: dict[str, Any] = {"seed": config.seed, "batch": config.batch, "seq_len": config.seq_len}
            if task is not None:
                settings["task"] = task
            check_resumable(self.last_checkpoint, spec, settings, config.steps)
        try:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.spec_path, spec_yaml(spec, config.profile).encode())
            atomic_write(self.config_path, (json.dumps(config.to_dict(), indent=2) + "\n").encode())
            if not resume and self.metrics_path.exists():
                self.metrics_path.unlink()
        except OSError as e:
            raise TrainError(f"--out {self.path}: cannot write the run directory ({e.strerror or e})") from None

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(self.summary_path, (json.dumps(summary, indent=2, default=str) + "\n").encode())

    # -------------------------------------------------------------- reading
    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory (for eval / generate / plot), or a clear ``TrainError``."""
        run = cls(path)
        if not run.path.exists():
            raise TrainError(f"run directory {run.path} does not exist")
        if not run.path.is_dir():
            raise TrainError(f"{run.path} is not a run directory (it is a file)")
        if not run.spec_path.exists() or not run.config_path.exists():
            raise TrainError(f"{run.path} is not a nestlearn run directory (no spec.yaml / config.json); "
                             "create one with `nestlearn run SPEC --out DIR`")
        return run

    def config(self) -> TrainConfig:
        try:
            return TrainConfig.from_dict(json.loads(self.config_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise TrainError(f"{self.config_path} is unreadable or corrupt ({e})") from None

    def spec(self) -> Any:
        from nestlearn import load_spec

        return load_spec(self.spec_path)

    def summary(self) -> dict[str, Any]:
        if not self.summary_path.exists():
            return {}
        try:
            data = json.loads(self.summary_path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def metrics(self) -> list[dict[str, Any]]:
        from nestlearn.train.metrics import read_metrics

        return read_metrics(self.metrics_path) if self.metrics_path.exists() else []
