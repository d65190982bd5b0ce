"""The grid runner: every (task, seed, spec) trained through ``Trainer`` into
``<out>/<task>/<spec>/seed<k>/``, one at a time, resumable.

* A finished run (done, or diverged: a result too) is kept in ``<out>/results.json`` with the
  fingerprint of its settings and never retrained; a changed experiment file is refused for
  such runs (``--redo`` retrains them) instead of mixing old and new numbers.
* An interrupted run resumes from its checkpoint (``Trainer(..., resume=True)``), or restarts
  when it has none. Ctrl-C finishes the current step, saves, writes the partial report, exits 130.
* ``isolate``: each run trains in its own ``python -m nestlearn.suite --only KEY`` process, so no
  memory or CUDA state leaks from one run into the next.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from nestlearn.files import atomic_write
from nestlearn.suite.errors import SuiteError
from nestlearn.suite.evaluate import continual_metrics, length_metrics
from nestlearn.suite.experiment import Experiment, Run, fingerprint
from nestlearn.suite.params import ResolvedSpec, resolve_specs
from nestlearn.suite.plots import write_plots
from nestlearn.suite.report import aggregate, fmt_count, results_md, tables
from nestlearn.suite.table import render
from nestlearn.train import DivergedError, TrainConfig, Trainer, TrainError, spec_hash

INTERRUPTED = 130


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode("utf-8"))


class Results:
    """``<out>/results.json``: ``{"experiment": ..., "runs": {key: record}}``, written atomically."""

    def __init__(self, path: Path, experiment: str) -> None:
        self.path = path
        self.experiment = experiment
        self.runs: dict[str, dict[str, Any]] = {}
        self.reload()

    def reload(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            runs = data["runs"]
            if not isinstance(runs, dict):
                raise TypeError("runs is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SuiteError(f"{self.path}: unreadable or not a suite results file ({e}); move it away to "
                             "start over (the run folders next to it are kept and resumed)") from None
        self.runs = runs

    def save(self) -> None:
        payload = {"experiment": self.experiment, "updated": _now(), "runs": self.runs}
        _atomic_write(self.path, json.dumps(payload, indent=2, default=str) + "\n")


def first_line(e: BaseException) -> str:
    """The one line of an error worth recording (torch appends C++ frames to some messages)."""
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    threads = torch.get_num_threads()
    return f"cpu ({platform.machine() or 'unknown'}, {threads} thread{'s' if threads != 1 else ''})"


class Progress:
    """A ``Trainer`` reporter: about ten lines per run, on stderr."""

    def __init__(self, prefix: str, stream: TextIO, quiet: bool = False) -> None:
        self.prefix, self.stream, self.quiet = prefix, stream, quiet
        self.total = 1
        self.every = 1

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def start(self, info: dict[str, Any]) -> None:
        self.total = int(info["total"])
        self.every = max(1, self.total // 10)
        again = f", resuming at step {info['start']}" if info["start"] else ""
        self._say(f"{self.prefix}: {fmt_count(int(info['params']))} params, {self.total} steps on "
                  f"{info['device']}{again}")

    def step(self, rec: dict[str, Any]) -> None:
        s = int(rec["step"])
        if s % self.every == 0 or s == self.total:
            acc = f" acc {rec['accuracy']:.3f}" if "accuracy" in rec else ""
            tps = f" {rec['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in rec else ""
            self._say(f"    step {s}/{self.total} loss {rec['loss']:.4f}{acc}{tps}")

    def eval(self, rec: dict[str, Any]) -> None:
        if rec.get("split") == "phase":
            self._say(f"    phase {rec['phase']} ({rec['domain']}) done at step {rec['step']}")

    def message(self, text: str) -> None:
        self._say(f"    {text}")

    def end(self, summary: dict[str, Any]) -> None:
        pass


class SuiteRunner:
    def __init__(self, exp: Experiment, *, command: str, device: str | None = None, quiet: bool = False,
                 isolate: bool = False, redo: bool = False, child_args: list[str] | None = None,
                 err: TextIO | None = None) -> None:
        self.exp, self.command, self.quiet, self.isolate, self.redo = exp, command, quiet, isolate, redo
        self.device = device or exp.budget.device
        self.child_args = child_args or []
        self.err = err or sys.stderr
        self.results = Results(exp.out / "results.json", exp.name)
        self.specs: dict[str, ResolvedSpec] = {}

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.err, flush=True)

    def resolve(self) -> dict[str, int]:
        self.specs = resolve_specs(self.exp)
        return {label: rs.params for label, rs in self.specs.items()}

    def run_dir(self, run: Run) -> Path:
        return self.exp.out / run.task.label / run.spec.label / f"seed{run.seed}"

    def fingerprint(self, run: Run) -> str:
        rs = self.specs[run.spec.label]
        return fingerprint(run, self.exp, spec_hash(rs.spec))

    def config(self, run: Run) -> TrainConfig:
        b = self.exp.budget
        fields: dict[str, Any] = dict(
            task=run.task.name, task_options=dict(run.task.options), steps=run.task.steps, batch=b.batch,
            seq_len=run.task.seq_len, lr=b.lr, warmup=b.warmup, min_lr_ratio=b.min_lr_ratio, clip=b.clip,
            eval_batches=b.eval_batches, device=self.device, precision=b.precision,
            cuda_graph=b.cuda_graph and self.on_cuda(), compile=b.compile, wavefront=b.wavefront,
            threads=b.threads, seed=run.seed, carry_state=b.carry_state)
        return TrainConfig(**fields)  # TrainConfig checks every value (the device's name included)

    def on_cuda(self) -> bool:
        """Whether the runs train on a GPU. The budget's ``cuda_graph`` is a speed setting (not in a
        run's fingerprint), so an experiment file written for a GPU also runs on a CPU without it.
        (``cuda`` without a GPU keeps it: the trainer then says what is wrong.)"""
        from nestlearn.train.build import resolve_device

        return self.device == "cuda" or resolve_device(self.device).type == "cuda"

    # ------------------------------------------------------------ one run
    def finished(self, run: Run) -> bool:
        """Is there a kept result for ``run``? (SuiteError when it was made with other settings.)"""
        rec = self.results.runs.get(run.key)
        if rec is None or rec.get("status") not in ("done", "diverged"):
            return False
        if rec.get("fingerprint") == self.fingerprint(run):
            # lengths added to the file since: evaluated from the checkpoint (train() resumes a
            # complete run without a step)
            return rec["status"] != "done" or all(str(f) in rec.get("lengths", {}) for f in run.task.eval_lengths)
        if not self.redo:
            raise SuiteError(f"{self.results.path}: the result of {run.key} was made with other settings (the "
                             "experiment file or a spec changed since); add --redo to retrain such runs, or "
                             "give another --out")
        return False

    def _prepare_dir(self, run: Run) -> bool:
        """Resume (True) or start fresh (False); a folder from other settings: refused or, with
        --redo, cleared."""
        d = self.run_dir(run)
        mark = d / "suite-run.json"
        fp = self.fingerprint(run)
        has_ckpt = (d / "checkpoints" / "last.safetensors").exists()
        if has_ckpt and mark.exists():
            try:
                old = json.loads(mark.read_text(encoding="utf-8")).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                old = None
            if old != fp:
                if not self.redo:
                    raise SuiteError(f"{d}: holds a run made with other settings; add --redo to retrain it, "
                                     "or give another --out")
                shutil.rmtree(d)
                has_ckpt = False
        elif d.exists() and not has_ckpt:
            shutil.rmtree(d)  # started but never checkpointed: nothing to keep
        _atomic_write(mark, json.dumps({"key": run.key, "fingerprint": fp}) + "\n")
        return has_ckpt

    def train(self, run: Run, prefix: str) -> dict[str, Any]:
        """Train (or resume) one run and evaluate it; returns its record (status done, diverged,
        interrupted or failed)."""
        rs = self.specs[run.spec.label]
        cfg = self.config(run)
        resume = self._prepare_dir(run)
        d = self.run_dir(run)
        trainer = Trainer(rs.spec, cfg, d, resume=resume, reporter=Progress(prefix, self.err, self.quiet))
        t0 = time.perf_counter()
        rec: dict[str, Any] = {
            "key": run.key, "task": run.task.label, "task_name": run.task.name, "task_options": run.task.options,
            "spec": run.spec.label, "spec_path": str(run.spec.path), "spec_name": rs.spec.name,
            "overrides": list(rs.overrides), "seed": run.seed, "params": rs.params, "metric": run.task.metric,
            "fingerprint": self.fingerprint(run), "run_dir": str(d), "command": self.command,
            "torch": torch.__version__, "date": _now(),
        }
        try:
            summary = trainer.fit()
        except DivergedError as e:
            summary = trainer.run.summary()
            rec.update(status="diverged", diverged_step=e.step, diverged_level=e.level, error=str(e))
        except TrainError as e:
            rec.update(status="failed", error=str(e))
            summary = {}
        except Exception as e:  # noqa: BLE001 - one broken run must not stop the grid or print a traceback
            rec.update(status="failed", error=f"{type(e).__name__}: {first_line(e)}")
            summary = {}
        else:
            rec["status"] = "done" if summary.get("status") == "done" else summary.get("status", "failed")
        rec.update(device=device_name(str(summary.get("device", self.device))),
                   steps=summary.get("step"), tokens=summary.get("tokens"), val=summary.get("val", {}),
                   eval_state=trainer.eval_state)
        if summary.get("dead_since") is not None:  # trained to the end with a zero gradient from here
            rec["dead_since"] = summary["dead_since"]
        if rec["status"] == "done":
            val = rec["val"]
            if run.task.kind == "continual":
                cont = continual_metrics(d, len(getattr(trainer.task, "phases", [])))
                rec["continual"] = cont
                rec["forgetting"] = cont.get("forgetting", {})
                rec["value"] = None
            else:
                rec["value"] = val.get(run.task.metric)
                errors: dict[str, str] = {}
                rec["lengths"] = length_metrics(trainer, run.task, errors) if run.task.eval_lengths else {}
                if errors:
                    rec["length_errors"] = errors
        rec["wall_s"] = time.perf_counter() - t0
        return rec

    def _train_isolated(self, run: Run) -> int:
        cmd = [sys.executable, "-m", "nestlearn.suite", str(self.exp.file), "--only", run.key,
               "--out", str(self.exp.out), "--record-command", self.command, *self.child_args]
        proc = subprocess.Popen(cmd)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # the child got the same Ctrl-C: let it save and stop
                continue

    # ------------------------------------------------------------ the grid
    def run(self, only: str | None = None, max_runs: int | None = None) -> int:
        grid = self.exp.grid()
        if only is not None:
            grid = [r for r in grid if r.key == only]
            if not grid:
                raise SuiteError(f"--only {only}: no such run in {self.exp.file} (runs are TASK/SPEC/seedK)")
        n = len(self.exp.grid())
        keys = [r.key for r in self.exp.grid()]
        trained = 0
        status = 0
        for run in grid:
            i = keys.index(run.key) + 1
            prefix = f"[{i}/{n}] {run.spec.label} {run.task.label} seed{run.seed}"
            if self.finished(run):
                self.say(f"{prefix}: kept ({self.results.runs[run.key]['status']}, in results.json)")
                continue
            if max_runs is not None and trained >= max_runs:
                self.say(f"stopping after {trained} run(s) (--max-runs); the same command resumes")
                break
            trained += 1
            if self.isolate and only is None:
                code = self._train_isolated(run)
                self.results.reload()
                if code == INTERRUPTED:
                    return INTERRUPTED
                if code != 0:
                    status = 1
                continue
            rec = self.train(run, prefix)
            if rec["status"] == "interrupted":
                self.say(f"{prefix}: interrupted at step {rec.get('steps')}; its checkpoint is kept and the same "
                         "command resumes it")
                return INTERRUPTED
            self.results.reload()  # another process (a child of --isolate) may have written meanwhile
            self.results.runs[run.key] = rec
            self.results.save()
            self.say(f"{prefix}: {_outcome(rec)} ({rec['wall_s']:.0f} s)")
            if rec["status"] == "failed":
                status = 1
        if only is None:
            self.say(self.tally())
        return status

    def tally(self) -> str:
        """``12/60 runs finished (1 diverged), 1 failed, 47 to go`` for the experiment's grid."""
        recs = [self.results.runs.get(r.key) or {} for r in self.exp.grid()]
        count = {s: sum(1 for r in recs if r.get("status") == s) for s in ("done", "diverged", "failed")}
        done = count["done"] + count["diverged"]
        text = f"{done}/{len(recs)} runs finished"
        text += f" ({count['diverged']} diverged)" if count["diverged"] else ""
        text += f", {count['failed']} failed (see results.json; rerun to retry)" if count["failed"] else ""
        return text + (f", {len(recs) - done - count['failed']} to go" if done + count["failed"] < len(recs) else "")

    # ------------------------------------------------------------ the report
    def report(self, counts: dict[str, int], fmt: str | None, out: TextIO | None = None,
               write: bool = True) -> list[dict[str, Any]]:
        agg = aggregate(self.exp, self.results.runs, counts)
        if write:
            plots = write_plots(agg, self.exp.out / "plots")
            _atomic_write(self.exp.out / "results.md", results_md(self.exp, agg, self.results.runs, plots))
        data = {"experiment": self.exp.name, "file": str(self.exp.file), "out": str(self.exp.out), "tasks": agg}
        render(tables(self.exp, agg), fmt, file=out, data=data)
        return agg


def _outcome(rec: dict[str, Any]) -> str:
    if rec["status"] == "diverged":
        return f"diverged at step {rec.get('diverged_step')}"
    if rec["status"] != "done":
        return f"{rec['status']}: {rec.get('error', '')}"
    if rec.get("forgetting"):
        return "forgetting " + ", ".join(f"{d} {v:.1f}%" if v is not None else f"{d} -"
                                         for d, v in rec["forgetting"].items())
    v = rec.get("value")
    text = f"{rec['metric']} {v:.4f}" if isinstance(v, (int, float)) else f"{rec['metric']} -"
    for f, m in rec.get("lengths", {}).items():
        if f != "1" and rec["metric"] in m:
            text += f", {f}L {m[rec['metric']]:.4f}"
    for f, err in rec.get("length_errors", {}).items():
        text += f"; the evaluation at {f}L failed ({err}), tried again next time"
    return text
