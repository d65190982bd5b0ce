"""``python -m nestlearn.suite EXPERIMENT``: argument parsing and the one place errors become
messages and exit codes (0 ok, 1 bad input or a failed run, 2 bad flags, 130 interrupted).

``run_suite`` is what ``nestlearn suite`` calls (the CLI hook lands after the CLI restructure)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TextIO

from nestlearn.suite.errors import SuiteError
from nestlearn.suite.experiment import load_experiment
from nestlearn.suite.params import param_flags
from nestlearn.suite.report import fmt_count
from nestlearn.suite.runner import INTERRUPTED, SuiteRunner
from nestlearn.suite.table import FORMATS, Table, render


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nestlearn.suite",
        description="Train a grid of specs x tasks x seeds from an experiment file (experiments/*.yaml), "
                    "resuming where it stopped, and write results.json, results.md and plots.")
    p.add_argument("experiment", help="the experiment file, e.g. experiments/formal.yaml")
    p.add_argument("--out", help="output folder (default: the file's 'out', else runs/suite/NAME)")
    p.add_argument("--data", help="a text file or folder for every 'lm' task (default: the stdlib corpus)")
    p.add_argument("--format", dest="fmt", choices=FORMATS,
                   help="how to print the tables (default: a table on a terminal, markdown otherwise)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the budget's device")
    p.add_argument("--steps", type=int, metavar="N", help="override every task's steps (e.g. a smoke test)")
    p.add_argument("--seeds", type=int, metavar="N", help="override the seeds: 0 .. N-1")
    p.add_argument("--max-runs", type=int, metavar="N", help="train at most N runs, then stop (resumable)")
    p.add_argument("--only", metavar="TASK/SPEC/seedK", help="train just this run (no report)")
    p.add_argument("--report", action="store_true", help="train nothing: print and write the report")
    p.add_argument("--check", action="store_true", help="validate, build every spec, print parameter counts")
    p.add_argument("--redo", action="store_true", help="retrain runs made with other settings")
    p.add_argument("--isolate", action="store_true", help="train each run in its own process")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--record-command", help=argparse.SUPPRESS)  # --isolate's children record the user's command
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for flag, value, low in (("--max-runs", args.max_runs, 0), ("--steps", args.steps, 1), ("--seeds", args.seeds, 1)):
        if value is not None and value < low:
            print(f"error: {flag}: must be {low} or more, got {value}", file=sys.stderr)
            return 2
    from nestlearn.tasks import TaskError
    from nestlearn.train import TrainError

    argv = sys.argv[1:] if argv is None else argv
    command = args.record_command or shlex.join(["python", "-m", "nestlearn.suite", *argv])
    try:
        return run_suite(args.experiment, out=args.out, data=args.data, fmt=args.fmt, device=args.device,
                         steps=args.steps, seeds=args.seeds,
                         max_runs=args.max_runs, only=args.only, report_only=args.report, check=args.check,
                         redo=args.redo, isolate=args.isolate, quiet=args.quiet, command=command)
    except (SuiteError, TrainError, TaskError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return INTERRUPTED
