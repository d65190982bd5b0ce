"""``nestlearn run``, ``eval``, ``generate``, ``plot`` and ``compare``: train and use models.

    nestlearn run models/hope.yaml                       # byte-level LM on the stdlib's sources
    nestlearn run specs/titans.yaml model.dim=64 --task mqar --steps 500 --out runs/t
    nestlearn run runs/t --resume                        # continue an interrupted run
    nestlearn eval runs/t ; nestlearn generate runs/t --prompt "def "
    nestlearn plot runs/a runs/b -o curves.png ; nestlearn compare a.yaml b.yaml --steps 200

Every error a user can cause ends in one message on stderr and exit code 1 (Ctrl-C: 130).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

__all__ = ["register", "run_cmd", "eval_cmd", "generate_cmd", "plot_cmd", "compare_cmd"]

SLOW_HINT_MINUTES = 10.0  # a run with default steps projected longer than this gets a hint
BIG_FOR_CPU = 8_000_000  # parameters: a default run of a bigger spec on CPU gets a hint at once


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)
    app.command("eval")(eval_cmd)
    app.command("generate")(generate_cmd)
    app.command("plot")(plot_cmd)
    app.command("compare")(compare_cmd)


# ----------------------------------------------------------------------------- errors & flag parsing


class _Fail(Exception):
    """A bad flag value or argument (reported as ``error: ...``, exit 1)."""


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Every error a user can cause -> its message on stderr and exit code 1, no traceback."""
    from nestlearn.spec.errors import SpecError
    from nestlearn.tasks import TaskError
    from nestlearn.train.errors import TrainError, plain_message

    pre = _rank_prefix()
    try:
        yield
    except SpecError as err:
        typer.echo(f"{pre}{err}" if str(err) else f"{pre}error: invalid spec", err=True)
        raise typer.Exit(1) from None
    except (TrainError, TaskError, _Fail) as err:
        typer.echo(f"{pre}error: {plain_message(str(err))}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(f"{pre}aborted; nothing more was saved (a checkpoint already on disk is kept)", err=True)
        raise typer.Exit(130) from None
    except OSError as err:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        typer.echo(f"{pre}error: {err.strerror or err}{where}", err=True)
        raise typer.Exit(1) from None
    except typer.Exit:
        raise
    except Exception as err:  # noqa: BLE001 - a bug, still no traceback unless asked for
        if os.environ.get("NESTLEARN_DEBUG"):
            raise
        typer.echo(f"{pre}internal error: {type(err).__name__}: {plain_message(str(err))}\n"
                   "  (set NESTLEARN_DEBUG=1 to see the traceback, and please report it)", err=True)
        raise typer.Exit(1) from None


def _int(flag: str, value: str | None, lo: int = 1, hi: int | None = None) -> int | None:
    from nestlearn.train.config import MAX_COUNT

    if value is None:
        return None
    try:
        n = int(value.replace("_", ""))
    except ValueError:
        raise _Fail(f"{flag}: expected a whole number, got {value!r}") from None
    if n < lo:
        raise _Fail(f"{flag}: must be at least {lo}, got {n}")
    top = MAX_COUNT if hi is None else hi
    if n > top:  # torch overflows (or spawns threads until it crashes) far beyond any useful value
        raise _Fail(f"{flag}: must be at most {top}, got {n}")
    return n


def _float(flag: str, value: str | None, lo: float = 0.0, strict: bool = True) -> float | None:
    if value is None:
        return None
    try:
        x = float(value)
    except ValueError:
        raise _Fail(f"{flag}: expected a number, got {value!r}") from None
    if not math.isfinite(x) or x < lo or (strict and x == lo):
        raise _Fail(f"{flag}: must be a finite number {'>' if strict else '>='} {lo:g}, got {value}")
    return x


def _choice(flag: str, value: str | None, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if value not in choices:
        raise _Fail(f"{flag}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _task_choice(value: str | None) -> str | None:
    if value is None:
        return None
    from nestlearn.spec.errors import suggest
    from nestlearn.tasks import task_names

    names = task_names()
    if value not in names:
        raise _Fail(f"--task: unknown task '{value}'{suggest(value, names, n=2, cutoff=0.6)}; choices: {', '.join(names)}")
    return value


def _kv(flag: str, items: list[str] | None) -> dict[str, str]:
    out = {}
    for it in items or []:
        key, eq, val = it.partition("=")
        if not eq or not key.strip():
            raise _Fail(f"{flag}: expected KEY=VALUE, got {it!r}")
        out[key.strip()] = val
    return out


# ----------------------------------------------------------------------------- progress


def _fmt_rate(x: float | None) -> str:
    if not x:
        return "-"
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}K" if x >= 1e3 else f"{x:.0f}"


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class RichReporter:
    """A live bar (step, loss, tokens/s, ETA) on a terminal; plain lines otherwise."""

    def __init__(self, console: Console, quiet: bool = False, hint: str | None = None):
        self.console, self.quiet, self.hint = console, quiet, hint
        self.progress: Progress | None = None
        self.task_id: TaskID | None = None
        self.t0 = time.perf_counter()
        self.start_step = 0
        self.total = 0
        self.tokens_per_step = 0
        self.last_print = 0.0
        self.loss_ema: float | None = None

    def start(self, info: dict[str, Any]) -> None:
        self.start_step, self.total = info["start"], info["total"]
        self.tokens_per_step = info["tokens_per_step"]
        if self.quiet:
            return
        levels = ", ".join(f"{r['name']}({r['period']})" for r in info.get("levels", []))
        self.console.print(
            f"[bold]{info['spec']}[/bold]: {info['params']:,} parameters; levels {levels}\n"
            f"task {info['task']}\n"
            f"device {info['device']} ({info['precision']}"
            + (f", {info['world']} processes" if info["world"] > 1 else "") + f"); run directory {info['run_dir']}"
        )
        if info["start"]:
            self.console.print(f"resuming at step {info['start']} of {info['total']}")
        if self.hint and info["device"].startswith("cpu") and info["params"] > BIG_FOR_CPU:
            self.message(f"this spec has {info['params'] / 1e6:.1f}M parameters: large for a CPU, where a step "
                         f"may take minutes. {self.hint}")
            self.hint = None
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]} (smoothed)"), TextColumn("{task.fields[rate]} tok/s"),
                TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(),
                console=self.console, transient=False,
            )
            self.progress.start()
            self.task_id = self.progress.add_task("train", total=self.total, completed=self.start_step,
                                                  loss="-", rate="-")
        self.t0 = time.perf_counter()

    def step(self, rec: dict[str, Any]) -> None:
        loss = rec["loss"]
        self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        done = rec["step"] - self.start_step
        elapsed = time.perf_counter() - self.t0
        rate = rec.get("tokens_per_s")  # wall-clock: this session's tokens over its time, as in metrics.jsonl
        if done in (1, 3) and self.hint and elapsed > 0:
            eta = elapsed / done * (self.total - rec["step"]) / 60
            if eta > SLOW_HINT_MINUTES:
                self.message(f"at {elapsed / done:.1f} s per step this run will take about {eta:.0f} more minutes "
                             f"here. {self.hint}")
                self.hint = None
        if self.quiet:
            return
        if self.progress is not None and self.task_id is not None:
            self.progress.update(self.task_id, completed=rec["step"], loss=f"{self.loss_ema:.3f}",
                                 rate=_fmt_rate(rate))
            return
        now = time.perf_counter()
        if now - self.last_print >= 10 or rec["step"] in (self.start_step + 1, self.total):
            self.last_print = now
            extra = f" acc {rec['accuracy']:.3f}" if "accuracy" in rec else ""
            self.console.print(f"step {rec['step']}/{self.total}  loss {self.loss_ema:.4f} (smoothed){extra}  "
                               f"{_fmt_rate(rate)} tok/s  lr {rec['lr']:.2e}  elapsed {_fmt_time(elapsed)}")

    def eval(self, rec: dict[str, Any]) -> None:
        if self.quiet:
            return
        if rec["split"] == "phase":
            parts = ", ".join(f"{d} {m['loss']:.3f}" for d, m in rec["domains"].items())
            self.console.print(f"step {rec['step']}: after phase {rec['phase'] + 1} ({rec['domain']}): {parts}")
            return
        main = (f"bits/byte {rec['bits_per_byte']:.3f}  ppl {rec['perplexity']:.2f}" if "bits_per_byte" in rec
                else f"accuracy {rec.get('accuracy', float('nan')):.3f}")
        self.console.print(f"step {rec['step']}: validation loss {rec['loss']:.4f}  {main}")

    def message(self, text: str) -> None:
        self.console.print(f"[yellow]{text}[/yellow]")

    def end(self, summary: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _fmt_num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x) if x is not None else "-"


def summary_table(summary: dict[str, Any], title: str = "summary") -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    tr, val = summary.get("train", {}), summary.get("val", {})
    t.add_row("spec", str(summary.get("spec")))
    t.add_row("task", str(summary.get("task")))
    t.add_row("parameters", f"{summary.get('params', 0):,}")
    t.add_row("device", f"{summary.get('device')}" + (f" x{summary['world']}" if summary.get("world", 1) > 1 else ""))
    t.add_row("steps", f"{summary.get('step')}/{summary.get('steps')} ({summary.get('status')})")
    t.add_row("time", f"{_fmt_time(summary.get('time_s') or 0)} ({_fmt_rate(summary.get('tokens_per_s'))} tokens/s)")
    if summary.get("first_loss") is not None and tr.get("loss") is not None:
        t.add_row("train loss", f"{summary['first_loss']:.4f} -> {tr['loss']:.4f}")
    if val:
        t.add_row("validation loss", f"{val['loss']:.4f} (step {val.get('step')})")
        if "bits_per_byte" in val:
            t.add_row("bits/byte", f"{val['bits_per_byte']:.4f}")
            t.add_row("perplexity", f"{val['perplexity']:.3f}")
        if "accuracy" in val:
            t.add_row("accuracy", f"{val['accuracy']:.4f} (sequences {val.get('sequence_accuracy', 0):.4f})")
    for name, v in tr.get("levels", {}).items():
        t.add_row(f"level {name}", f"inner loss {_fmt_num(v.get('inner_loss'))}, "
                                   f"update norm {_fmt_num(v.get('update_norm'))}")
    if "forgetting" in summary:
        t.add_row("forgetting", ", ".join(f"{k} {v:+.4f}" for k, v in summary["forgetting"].items()))
    t.add_row("run directory", str(summary.get("run_dir")))
    return t


# ----------------------------------------------------------------------------- run


def _choose_profile(src: Path, flag: str | None, device: str, recorded: str | None = None) -> tuple[str, str]:
    """(profile to apply or "none", why) for the spec file ``src``: ``--profile`` if given; else
    the one a resumed run was trained with (``recorded``); else ``cpu`` when training on a CPU
    and the spec defines it."""
    from nestlearn.spec import NO_PROFILE, profile_names
    from nestlearn.train.build import resolve_device

    if flag is not None:
        return flag, "(--profile)"
    if recorded is not None:
        return recorded, "as when the run started"
    names = profile_names(src)  # validates the spec (and every profile) first
    if "cpu" in names and resolve_device(device).type == "cpu":
        return "cpu", "because training runs on the CPU"
    return NO_PROFILE, ""


def _profile_line(spec_path: Path, name: str, why: str) -> str:
    from nestlearn.spec import load_spec, profile_overrides

    sets = " ".join(profile_overrides(load_spec(spec_path), name))
    undo = "" if why.startswith("as when") else "; --profile none trains the spec as written"
    return f"profile '{name}' applied {why}: {sets}{undo}"


def _resolve_config(
    spec_arg: str, overrides: list[str], resume: bool, out: str | None, flags: dict[str, Any],
    profile: str | None = None,
) -> tuple[Any, Any, Path, bool, str | None]:
    """(spec, TrainConfig, run dir, steps defaulted?, a line saying which profile was applied)
    from the arguments; a run directory as SPEC (or ``--resume``) starts from the run's saved
    settings, flags given now win."""
    from nestlearn import load_spec
    from nestlearn.spec import NO_PROFILE
    from nestlearn.train import RunDir, TrainConfig, default_run_dir

    src = Path(spec_arg)
    if not src.exists():
        raise _Fail(f"{spec_arg}: no such spec file or run directory")
    base = TrainConfig()
    run_path: Path | None = Path(out) if out else None
    note: str | None = None
    if src.is_dir():
        run = RunDir.open(src)
        if run_path is not None and run_path.resolve() != src.resolve():
            raise _Fail(f"SPEC is the run directory {src} but --out is {out}; give one of them")
        if profile is not None:
            raise _Fail(f"--profile: {src} is a run directory, whose spec.yaml already has the sizes it was "
                        "trained with; a profile applies to a spec file")
        run_path = src
        spec = load_spec(run.spec_path, overrides)
        if not resume:
            raise _Fail(f"{src} is a run directory: add --resume to continue it, or pass a spec file "
                        f"(for example {run.spec_path}) with a new --out")
    if resume:
        if run_path is None:
            raise _Fail("--resume needs the run directory: nestlearn run RUN_DIR --resume, or --out RUN_DIR")
        run = RunDir(run_path)
        if run.config_path.exists():
            base = run.config()
            base.stop_at = None
    if not src.is_dir():
        recorded = (base.profile or NO_PROFILE) if resume and RunDir(run_path or src).config_path.exists() else None
        chosen, why = _choose_profile(src, profile, flags.get("device") or base.device, recorded)
        spec = load_spec(src, overrides, profile=chosen)
        base.profile = None if chosen == NO_PROFILE else chosen
        if base.profile is not None:
            note = _profile_line(src, chosen, why)
    steps_defaulted = flags.get("steps") is None and base.steps is None
    for k, v in flags.items():
        if v is not None:
            setattr(base, k, v)
    if run_path is None:
        run_path = default_run_dir(spec.name)
    return spec, base, run_path, steps_defaulted, note


def _warn_no_outer_grad(spec: Any) -> None:
    """One warning (stderr) naming the parameters the spec's first_order / stop levels keep
    from ever receiving an outer gradient (``compile/gradcheck.py``)."""
    from nestlearn.compile.gradcheck import cutting_levels, describe, no_outer_grad

    modes = cutting_levels(spec)
    if not modes:
        return
    try:
        names = no_outer_grad(spec)
    except Exception:  # noqa: BLE001 - advice only: the training itself reports its own errors
        return
    if names:
        typer.echo(f"warning: {describe(names, modes)}", err=True)


def run_cmd(
    spec: str = typer.Argument(..., metavar="SPEC", help="A spec YAML file, or a run directory with --resume."),
    overrides: Optional[list[str]] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                                    help="Spec overrides, e.g. model.dim=64."),
    task: Optional[str] = typer.Option(None, "--task", metavar="NAME",
                                       help="lm (default), mqar, niah, parity, aa_star, abab_star, anbn, anbncn, continual."),
    task_opt: Optional[list[str]] = typer.Option(None, "--task-opt", metavar="KEY=VALUE",
                                                 help="A task option, e.g. n_pairs=16 or phases=code,prose (repeat)."),
    data: Optional[str] = typer.Option(None, "--data", metavar="PATH",
                                       help="lm: a text file, a folder, or hf:NAME[:CONFIG] (default: the stdlib's sources)."),
    steps: Optional[str] = typer.Option(None, "--steps", metavar="N", help="Optimizer steps (default 300)."),
    batch: Optional[str] = typer.Option(None, "--batch", metavar="B", help="Global batch, in sequences (default 16)."),
    seq_len: Optional[str] = typer.Option(None, "--seq-len", metavar="T", help="Sequence length in bytes (default 128)."),
    lr: Optional[str] = typer.Option(None, "--lr", metavar="LR", help="Peak learning rate (default: the outer rule's lr)."),
    warmup: Optional[str] = typer.Option(None, "--warmup", metavar="N", help="Warm-up steps (default 5%, at most 100)."),
    clip: Optional[str] = typer.Option(None, "--clip", metavar="X", help="Gradient-norm clipping (default 1; 0 = off)."),
    accum: Optional[str] = typer.Option(None, "--accum", metavar="N", help="Gradient accumulation micro-batches."),
    device: Optional[str] = typer.Option(None, "--device", metavar="auto|cpu|cuda", help="Where to train (default auto)."),
    precision: Optional[str] = typer.Option(None, "--precision", metavar="auto|fp32|bf16|fp16",
                                            help="Autocast on CUDA (auto: bf16 there, fp32 on CPU)."),
    compile_: Optional[bool] = typer.Option(
        None, "--compile/--no-compile",
        help="torch.compile all but the inner loops (they stay eager); no faster on a CPU."),
    cuda_graph: Optional[bool] = typer.Option(
        None, "--cuda-graph/--no-cuda-graph",
        help="CUDA only: capture each step's forward + backward in a CUDA graph and replay it "
             "(far fewer kernel launches; evaluation runs eagerly)."),
    seed: Optional[str] = typer.Option(None, "--seed", metavar="N", help="Seed of the weights and the data (default 0)."),
    threads: Optional[str] = typer.Option(None, "--threads", metavar="N", help="CPU threads for torch."),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic", help="Deterministic algorithms only."),
    carry_state: Optional[bool] = typer.Option(None, "--carry-state",
                                               help="Carry the in-context state from each batch to the next."),
    eval_every: Optional[str] = typer.Option(None, "--eval-every", metavar="N", help="Validate every N steps."),
    eval_batches: Optional[str] = typer.Option(None, "--eval-batches", metavar="N", help="Validation batches (default 4)."),
    ckpt_every: Optional[str] = typer.Option(None, "--ckpt-every", metavar="N", help="Checkpoint every N steps."),
    log_every: Optional[str] = typer.Option(None, "--log-every", metavar="N", help="Metrics line every N steps (default 1)."),
    profile: Optional[str] = typer.Option(
        None, "--profile", metavar="NAME|none",
        help="Apply the spec's profile NAME (its `profiles:` section: named overrides); `none` trains the spec "
             "as written. Default: `cpu` when training on a CPU and the spec defines it."),
    stop_at: Optional[str] = typer.Option(None, "--stop-at", metavar="N", hidden=True,
                                          help="Stop (with a checkpoint) after N steps of the schedule."),
    tensorboard: Optional[str] = typer.Option(
        None, "--tensorboard", metavar="DIR",
        help="Also log the metrics to TensorBoard in DIR (per-level inner losses and update norms as their own "
             "scalars); needs tensorboard: pip install 'nestlearn[loggers]'."),
    wandb: Optional[bool] = typer.Option(
        None, "--wandb/--no-wandb",
        help="Also log the metrics to Weights & Biases (offline, no network needed, without an API key or with "
             "WANDB_MODE=offline; project $WANDB_PROJECT or nestlearn); needs wandb: pip install 'nestlearn[loggers]'."),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="RUN_DIR",
                                      help="Run directory (default runs/<spec name>-<time>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (or SPEC = RUN_DIR) from its checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Train a spec: the outer level by torch.optim, every faster level inside the forward pass."""
    from nestlearn.train.config import MAX_SEED, MAX_THREADS

    console = Console()
    with _errors():
        flags = {
            "task": _task_choice(task),
            "task_options": _kv("--task-opt", task_opt) or None,
            "data": data,
            "steps": _int("--steps", steps), "batch": _int("--batch", batch),
            "seq_len": _int("--seq-len", seq_len), "lr": _float("--lr", lr),
            "warmup": _int("--warmup", warmup, lo=0), "clip": _float("--clip", clip, strict=False),
            "accum": _int("--accum", accum),
            "device": _choice("--device", device, ("auto", "cpu", "cuda")),
            "precision": _choice("--precision", precision, ("auto", "fp32", "bf16", "fp16")),
            "compile": compile_, "cuda_graph": cuda_graph,
            "seed": _int("--seed", seed, lo=0, hi=MAX_SEED), "deterministic": deterministic,
            "threads": _int("--threads", threads, hi=MAX_THREADS),
            "carry_state": carry_state, "eval_every": _int("--eval-every", eval_every),
            "eval_batches": _int("--eval-batches", eval_batches), "ckpt_every": _int("--ckpt-every", ckpt_every),
            "log_every": _int("--log-every", log_every), "stop_at": _int("--stop-at", stop_at),
            "tensorboard": tensorboard, "wandb": wandb,
        }
        if tensorboard is not None and not tensorboard.strip():
            raise _Fail("--tensorboard: the directory is empty; give the directory to write TensorBoard logs to")
        if data is not None and not data.strip():
            raise _Fail("--data: the path is empty; give a text file or folder (or leave --data out "
                        "to train on the Python standard library's sources)")
        if profile is not None and not profile.strip():
            raise _Fail("--profile: the name is empty; give a profile of the spec, or none")
        the_spec, config, run_path, defaulted, note = _resolve_config(
            spec, list(overrides or []), resume, out, flags, profile.strip() if profile is not None else None)
        main = os.environ.get("RANK", "0") == "0"
        if note and main and not quiet:
            console.print(note, highlight=False, soft_wrap=True)
        if main:
            _warn_no_outer_grad(the_spec)
            from nestlearn.stability import spec_warnings

            for issue in spec_warnings(the_spec):  # the chunk-step bound (docs/training-health.md)
                typer.echo(f"warning: {issue.format()}", err=True)
        hint = None
        if defaulted:
            hint = (f"For a quick look, train a smaller model on shorter sequences, e.g.\n  nestlearn run {spec} "
                    "model.dim=64 model.depth=2 --seq-len 64   (about 3 minutes on 2 CPU cores)")
        reporter = RichReporter(console, quiet=quiet or not main, hint=hint)
        from nestlearn.train import Trainer

        trainer = Trainer(the_spec, config, run_path, resume=resume, reporter=reporter)
        try:
            summary = trainer.fit()
        finally:
            reporter.end({})
        if not main:
            return
        if not quiet:
            console.print(summary_table(summary))
        status = summary["status"]
        if status in ("interrupted", "stopped"):
            how = f"nestlearn run {run_path} --resume"
            word = "interrupted" if status == "interrupted" else "stopped"
            typer.echo(f"{word} at step {summary['step']} of {summary['steps']}; checkpoint saved to "
                       f"{summary['checkpoint']}\nresume with: {how}", err=status == "interrupted")
            if status == "interrupted":
                raise typer.Exit(130)


# ----------------------------------------------------------------------------- eval


def eval_cmd(
    run_dir: str = typer.Argument(..., metavar="RUN_DIR", help="A run directory written by nestlearn run."),
    batches: Optional[str] = typer.Option(None, "--batches", metavar="N", help="Validation batches (default: the run's)."),
    batch: Optional[str] = typer.Option(None, "--batch", metavar="B", help="Batch size (default: the run's)."),
    seq_len: Optional[str] = typer.Option(None, "--seq-len", metavar="T", help="Sequence length (default: the run's)."),
    lengths: Optional[str] = typer.Option(None, "--lengths", metavar="N,N,...",
                                          help="niah: the haystack lengths (default T/2, T, 2T, 4T)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="auto|cpu|cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Validation loss, bits per byte and perplexity (accuracy for synthetic tasks; NIAH accuracy
    by length; every domain of a continual run). Also written to RUN_DIR/eval.json."""
    console = Console()
    with _errors():
        lens = None
        if lengths is not None:
            lens = [v for v in (_int("--lengths", x.strip()) for x in lengths.split(",") if x.strip()) if v]
            if not lens:
                raise _Fail(f"--lengths: expected numbers like 128,256, got {lengths!r}")
        n, b, t = _int("--batches", batches), _int("--batch", batch), _int("--seq-len", seq_len)
        dev = _choice("--device", device, ("auto", "cpu", "cuda")) or "auto"
        from nestlearn.train.checkpoint import atomic_write
        from nestlearn.train.evaluate import evaluate_run, load_run

        loaded = load_run(run_dir, dev)
        res = evaluate_run(loaded, n, b, t, lens)
        atomic_write(loaded.run.path / "eval.json", (json.dumps(res, indent=2) + "\n").encode())
        if as_json:
            typer.echo(json.dumps(res, indent=2))
            return
        table = Table(title=f"{loaded.spec.name} at step {res['step']}: {res['task']}", title_justify="left")
        table.add_column("metric")
        table.add_column("value", justify="right")
        if "val" in res:
            for k, v in res["val"].items():
                table.add_row(k.replace("_", " "), f"{v:.4f}")
        for d, m in res.get("domains", {}).items():
            for k, v in m.items():
                table.add_row(f"{d}: {k.replace('_', ' ')}", f"{v:.4f}")
        for k, v in res.get("forgetting", {}).items():
            table.add_row(f"forgetting: {k}", f"{v:+.4f}")
        for length, acc in res.get("accuracy_by_length", {}).items():
            table.add_row(f"passkey accuracy at {length} bytes", f"{acc:.3f}")
        console.print(table)


# ----------------------------------------------------------------------------- generate


def generate_cmd(
    run_dir: str = typer.Argument(..., metavar="RUN_DIR"),
    prompt: str = typer.Option("\n", "--prompt", "-p", metavar="TEXT", help="The text to continue."),
    tokens: Optional[str] = typer.Option(None, "--tokens", "-n", metavar="N", help="Bytes to generate (default 200)."),
    temperature: Optional[str] = typer.Option(None, "--temperature", "-t", metavar="X",
                                              help="Sampling temperature (default 0.8; 0 = greedy)."),
    top_k: Optional[str] = typer.Option(None, "--top-k", metavar="K", help="Sample among the K likeliest bytes."),
    seed: Optional[str] = typer.Option(None, "--seed", metavar="N"),
    device: Optional[str] = typer.Option(None, "--device", metavar="auto|cpu|cuda"),
) -> None:
    """Sample text while the memories keep learning (the state is carried byte after byte)."""
    from nestlearn.train.config import MAX_SEED

    with _errors():
        n = _int("--tokens", tokens) or 200
        temp = _float("--temperature", temperature, strict=False)
        k = _int("--top-k", top_k, lo=0) or 0
        s = _int("--seed", seed, lo=0, hi=MAX_SEED) or 0
        dev = _choice("--device", device, ("auto", "cpu", "cuda")) or "auto"
        from nestlearn.train.evaluate import Utf8Stream, generate, load_run

        loaded = load_run(run_dir, dev)
        vocab = loaded.spec.model.vocab
        data = prompt.encode("utf-8")
        if vocab < 256 and any(b >= vocab for b in data):
            raise _Fail(f"--prompt: this model's vocabulary has {vocab} symbols, the prompt has bytes beyond it")
        out = Utf8Stream()
        sys.stdout.write(prompt)
        for b in generate(loaded.model, data, n, 0.8 if temp is None else temp, k, s, loaded.device):
            sys.stdout.write(out.feed(b))
            sys.stdout.flush()
        sys.stdout.write(out.close() + "\n")


# ----------------------------------------------------------------------------- plot


def plot_cmd(
    run_dirs: list[str] = typer.Argument(..., metavar="RUN_DIR...", help="One or more run directories."),
    output: str = typer.Option("curves.png", "--output", "-o", metavar="FILE.png", help="Where to write the figure."),
    smooth: Optional[str] = typer.Option(None, "--smooth", metavar="N", help="Moving average of N steps (default: auto)."),
) -> None:
    """Training and validation curves of several runs side by side (needs matplotlib)."""
    with _errors():
        from nestlearn.train import RunDir

        window = _int("--smooth", smooth)
        runs = [(Path(r).name or str(r), RunDir.open(r).metrics()) for r in run_dirs]
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise _Fail("nestlearn plot needs matplotlib (part of the default install): pip install matplotlib") from None
        if not any(recs for _, recs in runs):
            raise _Fail("no metrics to plot: the run directories have no metrics.jsonl records yet")
        fig = curves_figure(plt, runs, window)
        fig.tight_layout()
        target = Path(output)
        if target.is_dir():
            raise _Fail(f"-o {output}: is a directory; give a file name such as {target / 'curves.png'}")
        if not target.suffix:  # matplotlib would write FILE.png: say so, and write exactly that
            target = target.with_name(target.name + ".png")
        if target.parent and not target.parent.exists():
            raise _Fail(f"-o {output}: the directory {target.parent} does not exist")
        try:
            fig.savefig(target, dpi=110)
        except ValueError as e:
            raise _Fail(f"-o {output}: {e}") from None
        finally:
            plt.close(fig)
        typer.echo(f"wrote {target}")


def curves_figure(plt: Any, runs: list[tuple[str, list[dict[str, Any]]]], window: int | None) -> Any:
    """The figure of ``nestlearn plot``: training loss (a moving average), validation, and the
    in-context update norm per level where recorded. Language-modelling runs show training and
    validation both in bits per byte (the loss in nats / ln 2) on one y scale; other tasks show
    their loss in nats and validation accuracy. Every axis says its unit."""
    has_levels = any(isinstance(r.get("levels"), dict) for _, recs in runs for r in recs)
    bits = all("bits_per_byte" in r for _, recs in runs for r in recs if r.get("split") in ("train", "val"))
    ncols = 3 if has_levels else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4))
    if bits:
        axes[0].sharey(axes[1])
    unit = "bits/byte" if bits else "nats"
    w = 1
    for name, recs in runs:
        # a record damaged by hand or on disk is left out, not a crash of the whole plot
        train = [r for r in recs if r.get("split") == "train" and _num(r.get("loss"))]
        val = [r for r in recs if r.get("split") == "val"]
        ys = [float(r["loss"]) / (math.log(2) if bits else 1.0) for r in train]
        w = window or max(1, len(ys) // 50)
        axes[0].plot([r["step"] for r in train], _moving_average(ys, w), label=name)
        key = "bits_per_byte" if bits else "accuracy"
        if val:
            axes[1].plot([r["step"] for r in val], [float(r[key]) if _num(r.get(key)) else math.nan for r in val],
                         marker="o", label=name)
        if has_levels:
            _plot_update_norms(axes[2], name, train, w)
    axes[0].set_title(f"training loss ({unit}, moving average of {w} steps)" if w > 1 else f"training loss ({unit})")
    axes[0].set_ylabel(f"loss ({unit})")
    axes[1].set_title("validation loss (bits/byte)" if bits else "validation accuracy")
    axes[1].set_ylabel("loss (bits/byte)" if bits else "accuracy")
    if has_levels:
        axes[2].set_title("in-context update norm per level")
        axes[2].set_ylabel("update norm")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def _plot_update_norms(ax: Any, name: str, train: list[dict[str, Any]], w: int) -> None:
    for lv in sorted({str(k) for r in train if isinstance(r.get("levels"), dict) for k in r["levels"]}):
        pts = [(r["step"], r["levels"][lv]["update_norm"]) for r in train
               if isinstance(r.get("levels"), dict) and isinstance(r["levels"].get(lv), dict)
               and _num(r["levels"][lv].get("update_norm"))]
        ax.plot([p[0] for p in pts], _moving_average([p[1] for p in pts], w), label=f"{name}: {lv}")


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _moving_average(ys: list[float], w: int) -> list[float]:
    if w <= 1:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= w:
            acc -= ys[i - w]
        out.append(acc / min(i + 1, w))
    return out


# ----------------------------------------------------------------------------- compare


def compare_cmd(
    specs: list[str] = typer.Argument(..., metavar="SPEC...", help="The spec files to compare (one gives its row alone)."),
    task: Optional[str] = typer.Option(None, "--task", metavar="NAME", help="The task all specs train on (default lm)."),
    task_opt: Optional[list[str]] = typer.Option(None, "--task-opt", metavar="KEY=VALUE"),
    data: Optional[str] = typer.Option(None, "--data", metavar="PATH"),
    steps: Optional[str] = typer.Option(None, "--steps", metavar="N"),
    batch: Optional[str] = typer.Option(None, "--batch", metavar="B"),
    seq_len: Optional[str] = typer.Option(None, "--seq-len", metavar="T"),
    lr: Optional[str] = typer.Option(None, "--lr", metavar="LR"),
    device: Optional[str] = typer.Option(None, "--device", metavar="auto|cpu|cuda"),
    seed: Optional[str] = typer.Option(None, "--seed", metavar="N"),
    set_: Optional[list[str]] = typer.Option(None, "--set", metavar="KEY=VALUE",
                                             help="A spec override applied to every spec (repeat)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="DIR",
                                      help="Where the runs go (default runs/compare-<time>)."),
    profile: Optional[str] = typer.Option(None, "--profile", metavar="NAME|none",
                                          help="Each spec's profile NAME (as for run; default: cpu on a CPU)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train several specs on the same task with the same settings; print one table."""
    from nestlearn.train.config import MAX_SEED

    console = Console()
    with _errors():
        from nestlearn import load_spec
        from nestlearn.train import TrainConfig, Trainer, default_run_dir

        cfg_flags = {
            "task": _task_choice(task), "task_options": _kv("--task-opt", task_opt) or None, "data": data,
            "steps": _int("--steps", steps), "batch": _int("--batch", batch), "seq_len": _int("--seq-len", seq_len),
            "lr": _float("--lr", lr), "device": _choice("--device", device, ("auto", "cpu", "cuda")),
            "seed": _int("--seed", seed, lo=0, hi=MAX_SEED),
        }
        if data is not None and not data.strip():
            raise _Fail("--data: the path is empty")
        from nestlearn.spec import NO_PROFILE

        loaded, chosen = [], []
        for spec_file in specs:  # every spec checked before any training
            if not Path(spec_file).is_file():
                raise _Fail(f"{spec_file}: no such spec file")
            name, why = _choose_profile(Path(spec_file), profile, str(cfg_flags["device"] or "auto"))
            loaded.append(load_spec(spec_file, list(set_ or []), profile=name))
            chosen.append(None if name == NO_PROFILE else name)
            if name != NO_PROFILE and not quiet:
                console.print(f"{spec_file}: " + _profile_line(Path(spec_file), name, why), highlight=False,
                              soft_wrap=True)
        root = Path(out) if out else default_run_dir("compare")
        if root.exists() and any(root.iterdir()):
            raise _Fail(f"--out {root} is not empty; choose a new directory")
        rows = []
        for i, spec in enumerate(loaded):
            config = TrainConfig(profile=chosen[i])
            for k, v in cfg_flags.items():
                if v is not None:
                    setattr(config, k, v)
            run_path = root / f"{i + 1}-{spec.name}"
            if not quiet:
                console.rule(f"[bold]{i + 1}/{len(loaded)}: {spec.name}[/bold] ({specs[i]})")
            reporter = RichReporter(console, quiet=quiet)
            try:
                summary = Trainer(spec, config, run_path, reporter=reporter).fit()
            finally:
                reporter.end({})
            rows.append((specs[i], summary))
            if summary["status"] == "interrupted":
                break
        table = Table(title="comparison", title_justify="left")
        for col in ("spec", "params", "train loss", "val loss", "bits/byte | acc", "tokens/s", "time", "status"):
            table.add_column(col, justify="left" if col in ("spec", "status") else "right")
        for path, s in rows:
            val = s.get("val", {})
            main = (f"{val['bits_per_byte']:.4f}" if "bits_per_byte" in val
                    else f"{val['accuracy']:.4f}" if "accuracy" in val else "-")
            table.add_row(
                f"{s['spec']} ({path})", f"{s['params']:,}",
                f"{s['first_loss']:.3f} -> {s['train'].get('loss', float('nan')):.3f}" if s.get("first_loss") else "-",
                f"{val['loss']:.4f}" if val else "-", main, _fmt_rate(s.get("tokens_per_s")),
                _fmt_time(s.get("time_s") or 0), s["status"],
            )
        console.print(table)
        from nestlearn.train.checkpoint import atomic_write

        atomic_write(root / "compare.json", (json.dumps([s for _, s in rows], indent=2, default=str) + "\n").encode())
        typer.echo(f"runs in {root}")
        if rows and rows[-1][1]["status"] == "interrupted":
            raise typer.Exit(130)
