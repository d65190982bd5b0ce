"""``nestlearn run``: train a spec (or resume a run directory).

    nestlearn run models/hope.yaml                       # byte-level LM on the stdlib's sources
    nestlearn run specs/titans.yaml model.dim=64 --task mqar --steps 500 --out runs/t
    nestlearn run runs/t --resume                        # continue an interrupted run

Every error a user can cause ends in one message on stderr and exit code 1 (Ctrl-C: 130).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from nestlearn.cli.common import Fail, errors, parse_float, parse_int, parse_kv, parse_task, warn_spec
from nestlearn.cli.progress import RichReporter, summary_table

__all__ = ["register", "run_cmd", "choose_profile", "profile_line"]

ORDER = 1


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)


def choose_profile(src: Path, flag: str | None, device: str, recorded: str | None = None) -> tuple[str, str]:
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


def profile_line(spec_path: Path, name: str, why: str) -> str:
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
        raise Fail(f"{spec_arg}: no such spec file or run directory")
    base = TrainConfig()
    run_path: Path | None = Path(out) if out else None
    note: str | None = None
    if src.is_dir():
        run = RunDir.open(src)
        if run_path is not None and run_path.resolve() != src.resolve():
            raise Fail(f"SPEC is the run directory {src} but --out is {out}; give one of them")
        if profile is not None:
            raise Fail(f"--profile: {src} is a run directory, whose spec.yaml already has the sizes it was "
                        "trained with; a profile applies to a spec file")
        run_path = src
        spec = load_spec(run.spec_path, overrides)
        if not resume:
            raise Fail(f"{src} is a run directory: add --resume to continue it, or pass a spec file "
                        f"(for example {run.spec_path}) with a new --out")
    if resume:
        if run_path is None:
            raise Fail("--resume needs the run directory: nestlearn run RUN_DIR --resume, or --out RUN_DIR")
        run = RunDir(run_path)
        if run.config_path.exists():
            base = run.config()
            base.stop_at = None
            base.time_limit = None  # a limit is the invocation's, not the run's
    if not src.is_dir():
        recorded = (base.profile or NO_PROFILE) if resume and RunDir(run_path or src).config_path.exists() else None
        chosen, why = choose_profile(src, profile, flags.get("device") or base.device, recorded)
        spec = load_spec(src, overrides, profile=chosen)
        base.profile = None if chosen == NO_PROFILE else chosen
        if base.profile is not None:
            note = profile_line(src, chosen, why)
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
                                            help="Autocast (auto: bf16 on CUDA, fp32 on CPU; bf16 on a CPU when asked)."),
    compile_: Optional[bool] = typer.Option(
        None, "--compile/--no-compile",
        help="torch.compile all but the inner loops (they stay eager); no faster on a CPU."),
    tf32: Optional[bool] = typer.Option(
        None, "--tf32/--no-tf32",
        help="CUDA only: fp32 matrix products on TF32 tensor cores, the in-context levels' kernels included "
             "(faster; about 1e-3 relative error per product). Default off."),
    cuda_graph: Optional[bool] = typer.Option(
        None, "--cuda-graph/--no-cuda-graph",
        help="CUDA only: capture each step's forward + backward in a CUDA graph and replay it "
             "(far fewer kernel launches; evaluation runs eagerly)."),
    wavefront: Optional[str] = typer.Option(
        None, "--wavefront", metavar="TOKENS",
        help="Run the blocks as a wavefront over segments of TOKENS (e.g. 512): block b+1 starts a segment once "
             "block b has finished it. Same results. On CUDA each block runs on its own stream "
             "(NESTLEARN_WAVEFRONT_STREAMS=0: one stream). Its one full-size GPU training run "
             "diverged where the block loop did not (docs/training-health.md, section 7); docs/execution.md."),
    seed: Optional[str] = typer.Option(None, "--seed", metavar="N", help="Seed of the weights and the data (default 0)."),
    threads: Optional[str] = typer.Option(None, "--threads", metavar="N", help="CPU threads for torch."),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic", help="Deterministic algorithms only."),
    carry_state: Optional[bool] = typer.Option(None, "--carry-state",
                                               help="Carry the in-context state from each batch to the next; evaluation then "
                                                    "starts every held-out row from the carried state (row i from "
                                                    "carried row i mod batch) without advancing it."),
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
    time_limit: Optional[str] = typer.Option(
        None, "--time-limit", metavar="SECONDS",
        help="Stop at the first step that ends after SECONDS of training, with an evaluation and a checkpoint; "
             "the schedule stays that of --steps, and --resume continues it (for device leases and job limits)."),
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
    console = Console()
    with errors():
        from nestlearn.train.config import TrainConfig

        flags = {
            "task": parse_task(task),
            "task_options": parse_kv("--task-opt", task_opt) or None,
            "data": data,
            "steps": parse_int("--steps", steps), "batch": parse_int("--batch", batch),
            "seq_len": parse_int("--seq-len", seq_len), "lr": parse_float("--lr", lr),
            "warmup": parse_int("--warmup", warmup), "clip": parse_float("--clip", clip),
            "accum": parse_int("--accum", accum), "device": device, "precision": precision,
            "tf32": tf32, "compile": compile_, "cuda_graph": cuda_graph, "wavefront": parse_int("--wavefront", wavefront),
            "seed": parse_int("--seed", seed), "deterministic": deterministic,
            "threads": parse_int("--threads", threads),
            "carry_state": carry_state, "eval_every": parse_int("--eval-every", eval_every),
            "eval_batches": parse_int("--eval-batches", eval_batches), "ckpt_every": parse_int("--ckpt-every", ckpt_every),
            "log_every": parse_int("--log-every", log_every), "stop_at": parse_int("--stop-at", stop_at),
            "time_limit": parse_float("--time-limit", time_limit),
            "tensorboard": tensorboard, "wandb": wandb,
        }
        if profile is not None and not profile.strip():
            raise Fail("--profile: the name is empty; give a profile of the spec, or none")
        TrainConfig.check_values(flags)  # the bounds (and empty paths), before the spec is read
        the_spec, config, run_path, defaulted, note = _resolve_config(
            spec, list(overrides or []), resume, out, flags, profile.strip() if profile is not None else None)
        main = os.environ.get("RANK", "0") == "0"
        if note and main and not quiet:
            console.print(note, highlight=False, soft_wrap=True)
        if main:
            _warn_no_outer_grad(the_spec)
            warn_spec(the_spec)
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
