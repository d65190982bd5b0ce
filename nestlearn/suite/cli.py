"""``run_suite``: what ``nestlearn suite`` (``nestlearn/cli/suite_cmds.py``) calls. It returns the
exit code (0 ok, 1 a failed run, 130 interrupted) and raises ``SuiteError`` / ``TrainError`` /
``TaskError`` for bad input, which the CLI's one error handler turns into messages."""

from __future__ import annotations

import shlex
import sys
from typing import TextIO

from nestlearn.suite.experiment import load_experiment
from nestlearn.suite.params import param_flags
from nestlearn.suite.report import fmt_count
from nestlearn.suite.runner import INTERRUPTED, SuiteRunner
from nestlearn.suite.table import Table, render


def run_suite(experiment: str, *, out: str | None = None, data: str | None = None, fmt: str | None = None,
              steps: int | None = None, seeds: int | None = None,
              device: str | None = None, max_runs: int | None = None, only: str | None = None,
              report_only: bool = False, check: bool = False, redo: bool = False, isolate: bool = False,
              quiet: bool = False, command: str | None = None, stdout: TextIO | None = None,
              stderr: TextIO | None = None) -> int:
    """Train the experiment's grid (resuming), write results.json / results.md / plots and print
    the tables. Raises ``SuiteError`` (and ``TrainError``/``TaskError``) for bad input."""
    err = stderr or sys.stderr
    exp = load_experiment(experiment, data=data, out=out, steps=steps, seeds=seeds)
    child = [*(["--data", data] if data else []), *(["--steps", str(steps)] if steps else []),
             *(["--seeds", str(seeds)] if seeds else []), *(["--device", device] if device else []),
             *(["--quiet"] if quiet else []), *(["--redo"] if redo else [])]
    runner = SuiteRunner(exp, command=command or _command(experiment, out, data), device=device, quiet=quiet,
                         isolate=isolate, redo=redo, child_args=child, err=err)
    counts = runner.resolve()
    grid = exp.grid()
    if not quiet and only is None:
        print(f"{exp.name}: {len(exp.specs)} specs x {len(exp.tasks)} tasks x {len(exp.seeds)} seeds = "
              f"{len(grid)} runs -> {exp.out}", file=err)
    if check:
        flags = param_flags(counts, exp.params)
        rows = [[rs.row.label, fmt_count(rs.params), str(rs.params), str(rs.spec.model.dim), str(rs.spec.model.depth),
                 rs.row.path.name, flags.get(rs.row.label, "")] for rs in runner.specs.values()]
        cols = ["spec", "params", "exact", "dim", "depth", "file", "flag"]
        notes = [f"{len(grid)} runs; overrides of every spec are recorded in results.json"]
        render([Table(f"{exp.name}: specs", cols, rows, list("lrrrrll"), notes)], fmt, file=stdout)
        return 0
    status = 0
    if not report_only:
        status = runner.run(only=only, max_runs=max_runs)
    if only is None or status == INTERRUPTED:
        runner.report(counts, fmt, out=stdout, write=True)
    if status == INTERRUPTED and not quiet:
        print("interrupted: the finished runs are in results.json; run the same command again to resume",
              file=err)
    return status


def _command(experiment: str, out: str | None, data: str | None) -> str:
    parts = ["python", "-m", "nestlearn.suite", experiment]
    parts += ["--out", out] if out else []
    parts += ["--data", data] if data else []
    return shlex.join(parts)
