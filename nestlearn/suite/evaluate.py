"""What the suite measures on a trained run beyond ``Trainer.fit()``'s summary.

* Length generalisation: the final model on the task's held-out batches at a multiple ``f`` of
  the training length. The public API evaluates a run only at its own length, so the suite builds
  the longer task itself (``task_at_length``) and calls ``Task.evaluate`` with the trainer's model.
* Continual learning: ``Trainer`` already evaluates every domain after each phase (its ``phase``
  records in metrics.jsonl); the suite turns them into forgetting in % (``stats.forgetting_percent``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nestlearn.suite.experiment import TaskRow
from nestlearn.suite.stats import domain_perf, forgetting_percent
from nestlearn.tasks import LANGUAGES, Task, get_task, task_options
from nestlearn.train import Trainer, read_metrics


def task_at_length(row: TaskRow, factor: int) -> tuple[Task, int]:
    """The task and sequence length for an evaluation at ``factor`` x the training length.

    Formal languages: at f > 1 the strings are the unseen lengths ``(f/2 L, f L]`` where ``L`` is
    the trained ``max_len`` (2L: L+1 .. 2L, 4L: 2L+1 .. 4L), in rows f times as long; at f = 1 the
    training distribution. NIAH with a fixed ``length``: that length x f. Everything else: the
    same options in rows f times as long (MQAR's default n_pairs grows with the row)."""
    options = dict(row.options)
    seq_len = row.seq_len * factor
    if row.name in LANGUAGES and factor > 1:
        defaults = task_options(row.name)
        max_len = int(options.get("max_len", defaults["max_len"]))
        options["min_len"] = max_len * factor // 2 + 1
        options["max_len"] = max_len * factor
    if row.name == "niah" and options.get("length"):
        options["length"] = int(options["length"]) * factor
        seq_len = options["length"]
    return get_task(row.name, **options), seq_len


def length_metrics(trainer: Trainer, row: TaskRow, errors: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """``{"2": metrics, ...}``: the final model at every ``eval_lengths`` factor, on as many
    batches as its validation, each ``f`` times shorter (at least one row): the same tokens per
    batch, so a long evaluation fits wherever training fit (attention's memory still grows).
    A length that fails (out of memory, ...) is left out and its error put in ``errors``: the
    next invocation evaluates it again from the checkpoint."""
    cfg = trainer.config
    out: dict[str, dict[str, float]] = {}
    trainer.model.eval()
    for f in row.eval_lengths:
        try:
            task, seq_len = task_at_length(row, f)
            batches = task.eval_batches(max(1, cfg.batch // f), seq_len, cfg.eval_batches, cfg.seed)
            out[str(f)] = task.evaluate(trainer.model_fn(), batches, trainer.device)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at 8x: keep the others, retried next time
            if errors is not None:
                lines = str(e).strip().splitlines()
                errors[str(f)] = f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
    trainer.model.train()
    return out


def continual_metrics(run_dir: Path, n_phases: int) -> dict[str, Any]:
    """Per-phase domain metrics from the run's ``phase`` records, and forgetting in % (empty
    unless all ``n_phases`` phases were evaluated)."""
    path = Path(run_dir) / "metrics.jsonl"
    recs = [r for r in read_metrics(path) if r.get("split") == "phase"] if path.exists() else []
    by_phase: dict[int, dict[str, Any]] = {}
    for r in recs:  # a resumed run may log a phase twice: the later record wins
        by_phase[int(r["phase"])] = r
    phases = [by_phase[p]["domain"] for p in sorted(by_phase)]
    if len(phases) != n_phases or sorted(by_phase) != list(range(n_phases)):
        return {"phases": phases, "forgetting": {}}
    domains = list(by_phase[0]["domains"])
    perf = [[domain_perf(by_phase[p]["domains"][d]) for d in domains] for p in sorted(by_phase)]
    # domains in order of first appearance in the phases (what forgetting_percent expects)
    order = list(dict.fromkeys(phases))
    if set(order) != set(domains):
        return {"phases": phases, "forgetting": {}}
    perf = [[row[domains.index(d)] for d in order] for row in perf]
    return {"phases": phases, "perf": perf, "domains": order,
            "final": by_phase[len(phases) - 1]["domains"],
            "forgetting": forgetting_percent(perf, phases)}
