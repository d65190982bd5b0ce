"""Using a finished (or interrupted) run: reload it, evaluate it, sample from it.

A run trained with ``--carry-state`` is evaluated from the state its checkpoint stores, as the
trainer evaluates it (``carry.py``), unless asked to start from the initial state.

Generation keeps the in-context levels learning: the prompt is fed once, then one byte at a time
with the carried ``state``, so every memory keeps updating at its own period while it writes.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nestlearn.tasks import Task
from nestlearn.train.build import build_model, build_task, resolve_device
from nestlearn.train.carry import carried_rows, evaluation_fn, has_state, joined
from nestlearn.train.checkpoint import Checkpoint, load_checkpoint, restore_model, tree_to
from nestlearn.train.config import TrainConfig
from nestlearn.train.errors import CheckpointError, TrainError
from nestlearn.train.rundir import RunDir


@dataclass
class LoadedRun:
    run: RunDir
    spec: Any
    config: TrainConfig
    model: nn.Module
    checkpoint: Checkpoint
    device: torch.device


def load_run(path: str | Path, device: str = "auto") -> LoadedRun:
    """The run directory's spec, settings and model at its last checkpoint (clear errors if any
    piece is missing, corrupt or from another spec)."""
    run = RunDir.open(path)
    spec = run.spec()
    config = run.config()
    if not run.last_checkpoint.exists():
        raise TrainError(f"{run.path} has no checkpoint yet ({run.last_checkpoint}); train it first "
                         f"(nestlearn run {run.path} --resume continues an interrupted run)")
    ck = load_checkpoint(run.last_checkpoint, spec)
    dev = resolve_device(device)
    model = build_model(spec)
    restore_model(model, ck)
    model.to(dev).eval()
    return LoadedRun(run, spec, config, model, ck, dev)


def stored_state(lr: LoadedRun) -> Any | None:
    """The state the training stream carried at the checkpoint (a ``--carry-state`` run's,
    micro-batches joined: ``carry.py``), on the run's device; None where it carried none."""
    carry = lr.checkpoint.carry
    if not isinstance(carry, list) or not has_state(carry):
        return None
    try:
        state = joined(tree_to(carry, lr.device))
        carried_rows(state)
    except TrainError as e:
        raise CheckpointError(f"checkpoint {lr.checkpoint.path}: its carried state cannot be evaluated from ({e}); "
                              "--from-initial-state evaluates the run without it") from None
    return state


def niah_lengths(seq_len: int, task: Any) -> list[int]:
    floor = int(task.min_length()) if hasattr(task, "min_length") else 1
    lengths = sorted({max(floor, n) for n in (seq_len // 2, seq_len, 2 * seq_len, 4 * seq_len)})
    return lengths


def evaluate_run(lr: LoadedRun, batches: int | None = None, batch: int | None = None,
                 seq_len: int | None = None, lengths: list[int] | None = None,
                 task: Task | None = None, from_initial: bool = False) -> dict[str, Any]:
    """Validation metrics of the run's task (bits per byte and perplexity for text, accuracy for
    synthetic tasks); NIAH accuracy by length; every domain and the forgetting of a continual run.

    A run that carried state (``--carry-state``) is evaluated from the state its checkpoint
    stores, as the trainer evaluates it; ``from_initial`` starts every row from the model's
    initial state instead. ``eval_state`` in the result says which."""
    cfg = lr.config
    task = task or build_task(cfg)
    b, t, n = batch or cfg.batch, seq_len or cfg.seq_len, batches or cfg.eval_batches
    state = None if from_initial else stored_state(lr)
    fn = evaluation_fn(lr.model, state)
    out: dict[str, Any] = {"step": lr.checkpoint.step, "task": task.describe(), "batch": b, "seq_len": t,
                           "batches": n, "eval_state": "initial" if state is None else "carried"}
    if hasattr(task, "evaluate_domains"):
        out["domains"] = task.evaluate_domains(fn, b, t, n, cfg.seed, lr.device)
        summary = lr.run.summary()
        for key in ("forgetting", "loss_increase"):  # of the training run, as its summary says
            if key in summary:
                out[key] = summary[key]
    else:
        out["val"] = task.evaluate(fn, task.eval_batches(b, t, n, cfg.seed), lr.device)
    if hasattr(task, "accuracy_by_length"):
        lens = lengths or niah_lengths(t, task)
        out["accuracy_by_length"] = task.accuracy_by_length(fn, lens, b, n, cfg.seed, lr.device)
    return out


@torch.no_grad()
def generate(model: nn.Module, prompt: bytes, tokens: int, temperature: float = 0.8, top_k: int = 0,
             seed: int = 0, device: torch.device | str = "cpu") -> Iterator[bytes]:
    """Sample ``tokens`` bytes after ``prompt``, yielding each as it comes. The state (every
    memory's fast weights and the attention caches) is carried, so the memories keep learning
    from the prompt and from what the model writes."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor([list(prompt or b"\n")], dtype=torch.long, device=device)
    logits, state = model(ids)
    for _ in range(tokens):
        last = logits[0, -1].float().cpu()
        if temperature <= 0:
            nxt = int(last.argmax())
        else:
            last = last / temperature
            if top_k > 0:
                kth = torch.topk(last, min(top_k, last.numel())).values[-1]
                last = last.masked_fill(last < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(last, -1), 1, generator=g))
        yield bytes([nxt])
        logits, state = model(torch.tensor([[nxt]], dtype=torch.long, device=device), state)


class Utf8Stream:
    """Bytes -> text as they come (a character split across bytes waits for its last byte)."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, b: bytes) -> str:
        return self._dec.decode(b)

    def close(self) -> str:
        return self._dec.decode(b"", final=True)
