"""``TrainConfig``: every knob of a training run, checked up front with clear messages."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from nestlearn.train.errors import TrainError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Defaults of ``nestlearn run SPEC`` with no other argument: small enough that a few-million
# parameter spec visibly learns in a few minutes on a 2-core laptop CPU.
DEFAULT_STEPS = 300
DEFAULT_BATCH = 16
DEFAULT_SEQ_LEN = 128

# Upper bounds of the whole-number knobs: beyond them torch overflows its int64 arguments (an
# "Overflow when unpacking long long" from deep inside) or spawns threads until it crashes.
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_THREADS = 1024


@dataclass
class TrainConfig:
    """A run's settings. ``steps=None`` means the task's own length (``continual``) or
    ``DEFAULT_STEPS``; ``warmup=None`` means 5% of the steps; ``eval_every=None`` four evaluations
    per run; ``ckpt_every=None`` ten checkpoints per run (and one at the end or on Ctrl-C)."""

    task: str = "lm"
    task_options: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    steps: int | None = None
    batch: int = DEFAULT_BATCH
    seq_len: int = DEFAULT_SEQ_LEN
    lr: float | None = None
    warmup: int | None = None
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    accum: int = 1
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    cuda_graph: bool = False
    """Capture each step's forward + loss + backward in a CUDA graph and replay it (CUDA only)."""
    seed: int = 0
    threads: int | None = None
    """CPU threads for torch (default: torch's choice; 1 is often fastest for tiny models)."""
    deterministic: bool = False
    carry_state: bool = False
    eval_every: int | None = None
    eval_batches: int = 4
    ckpt_every: int | None = None
    log_every: int = 1
    stop_at: int | None = None
    """Stop (with a checkpoint) after this many steps of a ``steps``-long schedule; resume later."""
    profile: str | None = None
    """The spec profile the run's spec was resolved with (a record; the spec already has it)."""
    tensorboard: str | None = None
    """Also log every metrics record to TensorBoard, in this directory (``train/loggers.py``)."""
    wandb: bool = False
    """Also log every metrics record to Weights & Biases (offline without an API key)."""

    def check(self) -> None:
        """Raise ``TrainError`` naming the first bad value."""
        def need(ok: bool, flag: str, value: Any, what: str) -> None:
            if not ok:
                raise TrainError(f"{flag}: {what}, got {value!r}")

        def whole(v: Any, lo: int, hi: int) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

        def number(v: Any) -> bool:  # a config.json edited by hand may hold anything
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name, flag in (("batch", "--batch"), ("seq_len", "--seq-len"), ("accum", "--accum"),
                           ("eval_batches", "--eval-batches"), ("log_every", "--log-every")):
            v = getattr(self, name)
            need(whole(v, 1, MAX_COUNT), flag, v, f"must be a whole number from 1 to {MAX_COUNT}")
        for name, flag in (("steps", "--steps"), ("eval_every", "--eval-every"),
                           ("ckpt_every", "--ckpt-every"), ("stop_at", "--stop-at")):
            v = getattr(self, name)
            need(v is None or whole(v, 1, MAX_COUNT), flag, v, f"must be a whole number from 1 to {MAX_COUNT}")
        need(self.threads is None or whole(self.threads, 1, MAX_THREADS), "--threads", self.threads,
             f"must be a whole number from 1 to {MAX_THREADS}")
        need(whole(self.seed, 0, MAX_SEED), "--seed", self.seed, f"must be a whole number from 0 to {MAX_SEED}")
        need(self.warmup is None or whole(self.warmup, 0, MAX_COUNT), "--warmup", self.warmup,
             f"must be a whole number from 0 to {MAX_COUNT}")
        need(self.lr is None or (number(self.lr) and self.lr > 0), "--lr", self.lr, "must be a positive finite number")
        need(number(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0, "--min-lr-ratio", self.min_lr_ratio,
             "must be in [0, 1]")
        need(number(self.clip) and self.clip >= 0, "--clip", self.clip, "must be >= 0 (0 disables clipping)")
        for name in ("task", "device", "precision"):
            need(isinstance(getattr(self, name), str), f"--{name}", getattr(self, name), "must be a string")
        need(self.data is None or isinstance(self.data, str), "--data", self.data, "must be a path")
        need(self.tensorboard is None or (isinstance(self.tensorboard, str) and bool(self.tensorboard.strip())),
             "--tensorboard", self.tensorboard, "must be a directory")
        need(isinstance(self.wandb, bool), "--wandb", self.wandb, "must be true or false")
        need(isinstance(self.task_options, dict), "--task-opt", self.task_options, "must be KEY=VALUE pairs")
        need(self.device in DEVICES, "--device", self.device, f"must be one of {', '.join(DEVICES)}")
        need(self.precision in PRECISIONS, "--precision", self.precision,
             f"must be one of {', '.join(PRECISIONS)}")
        if self.cuda_graph and self.carry_state:
            raise TrainError("--cuda-graph: cannot be combined with --carry-state (the carried state would be a "
                             "new input of the captured step at every batch); use one of them")
        if self.batch % self.accum:
            raise TrainError(f"--accum: the batch of {self.batch} rows cannot be split into {self.accum} "
                             "equal micro-batches; choose an --accum that divides --batch")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
