"""``nestlearn suite``: train an experiment's grid of specs x tasks x seeds (``experiments/*.yaml``),
resuming where it stopped, and write results.json, results.md and plots (``nestlearn/suite``)."""

from __future__ import annotations

import shlex
import sys
from typing import Optional

import typer

from nestlearn.cli.common import errors

ORDER = 4


def register(app: typer.Typer) -> None:
    app.command("suite")(suite_cmd)


def suite_cmd(
    experiment: str = typer.Argument(..., metavar="EXPERIMENT", help="The experiment file, e.g. experiments/formal.yaml."),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="DIR",
                                      help="Output folder (default: the file's 'out', else runs/suite/NAME)."),
    data: Optional[str] = typer.Option(None, "--data", metavar="PATH",
                                       help="A text file or folder for every 'lm' task (default: the stdlib corpus)."),
    fmt: Optional[str] = typer.Option(None, "--format", metavar="md|json|table",
                                      help="How to print the tables (default: a table on a terminal, markdown otherwise)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="auto|cpu|cuda", help="Override the budget's device."),
    steps: Optional[int] = typer.Option(None, "--steps", metavar="N", min=1,
                                        help="Override every task's steps (e.g. a smoke test)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", metavar="N", min=1, help="Override the seeds: 0 .. N-1."),
    max_runs: Optional[int] = typer.Option(None, "--max-runs", metavar="N", min=0,
                                           help="Train at most N runs, then stop (resumable)."),
    only: Optional[str] = typer.Option(None, "--only", metavar="TASK/SPEC/seedK", help="Train just this run (no report)."),
    report: bool = typer.Option(False, "--report", help="Train nothing: print and write the report."),
    check: bool = typer.Option(False, "--check", help="Validate, build every spec, print parameter counts."),
    redo: bool = typer.Option(False, "--redo", help="Retrain runs made with other settings."),
    isolate: bool = typer.Option(False, "--isolate", help="Train each run in its own process."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines on stderr."),
    record_command: Optional[str] = typer.Option(None, "--record-command", hidden=True),
) -> None:
    """Train a grid of specs x tasks x seeds from an experiment file, resuming where it stopped."""
    from nestlearn.suite.cli import run_suite
    from nestlearn.suite.table import FORMATS

    with errors():
        if fmt is not None and fmt not in FORMATS:
            from nestlearn.cli.common import Fail

            raise Fail(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        if device is not None and device not in ("auto", "cpu", "cuda"):
            from nestlearn.cli.common import Fail

            raise Fail(f"--device: expected one of auto, cpu, cuda, got {device!r}")
        # what results.json records as the command (an --isolate child records its parent's)
        command = record_command or shlex.join([_program(), *sys.argv[1:]])
        status = run_suite(experiment, out=out, data=data, fmt=fmt, device=device, steps=steps, seeds=seeds,
                           max_runs=max_runs, only=only, report_only=report, check=check, redo=redo,
                           isolate=isolate, quiet=quiet, command=command)
    raise typer.Exit(status)


def _program() -> str:
    return "python -m nestlearn.suite" if sys.argv and sys.argv[0].endswith("__main__.py") else "nestlearn suite"


def main() -> None:
    """``python -m nestlearn.suite``: the same command on its own."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    app(prog_name="python -m nestlearn.suite")
