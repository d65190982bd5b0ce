"""``nestlearn plot`` and ``compare``: runs side by side.

    nestlearn plot runs/a runs/b -o curves.png ; nestlearn compare a.yaml b.yaml --steps 200
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from nestlearn.cli.common import Fail, errors, parse_float, parse_int, parse_kv, parse_task
from nestlearn.cli.progress import RichReporter, fmt_rate, fmt_time
from nestlearn.cli.run_cmds import choose_profile, profile_line

__all__ = ["register", "plot_cmd", "compare_cmd", "curves_figure"]

ORDER = 3


def register(app: typer.Typer) -> None:
    app.command("plot")(plot_cmd)
    app.command("compare")(compare_cmd)


def plot_cmd(
    run_dirs: list[str] = typer.Argument(..., metavar="RUN_DIR...", help="One or more run directories."),
    output: str = typer.Option("curves.png", "--output", "-o", metavar="FILE.png", help="Where to write the figure."),
    smooth: Optional[str] = typer.Option(None, "--smooth", metavar="N", help="Moving average of N steps (default: auto)."),
) -> None:
    """Training and validation curves of several runs side by side (needs matplotlib)."""
    with errors():
        from nestlearn.train import RunDir
        from nestlearn.train.config import Count, check_flag

        window = parse_int("--smooth", smooth)
        if window is not None:
            check_flag("--smooth", window, Count)
        runs = [(Path(r).name or str(r), RunDir.open(r).metrics()) for r in run_dirs]
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise Fail("nestlearn plot needs matplotlib (part of the default install): pip install matplotlib") from None
        if not any(recs for _, recs in runs):
            raise Fail("no metrics to plot: the run directories have no metrics.jsonl records yet")
        fig = curves_figure(plt, runs, window)
        fig.tight_layout()
        target = Path(output)
        if target.is_dir():
            raise Fail(f"-o {output}: is a directory; give a file name such as {target / 'curves.png'}")
        if not target.suffix:  # matplotlib would write FILE.png: say so, and write exactly that
            target = target.with_name(target.name + ".png")
        if target.parent and not target.parent.exists():
            raise Fail(f"-o {output}: the directory {target.parent} does not exist")
        try:
            fig.savefig(target, dpi=110)
        except ValueError as e:
            raise Fail(f"-o {output}: {e}") from None
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
    fmt: Optional[str] = typer.Option(None, "--format", metavar="md|json|table",
                                      help="How to print the table (default: a table on a terminal, markdown otherwise)."),
) -> None:
    """Train several specs on the same task with the same settings; print one table."""
    from nestlearn.suite.table import FORMATS

    console = Console(stderr=fmt == "json")  # with --format json, stdout holds the JSON alone
    with errors():
        if fmt is not None and fmt not in FORMATS:
            raise Fail(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        from nestlearn import load_spec
        from nestlearn.train import TrainConfig, Trainer, default_run_dir

        cfg_flags = {
            "task": parse_task(task), "task_options": parse_kv("--task-opt", task_opt) or None, "data": data,
            "steps": parse_int("--steps", steps), "batch": parse_int("--batch", batch),
            "seq_len": parse_int("--seq-len", seq_len),
            "lr": parse_float("--lr", lr), "device": device, "seed": parse_int("--seed", seed),
        }
        TrainConfig.check_values(cfg_flags)
        from nestlearn.spec import NO_PROFILE

        loaded, chosen = [], []
        for spec_file in specs:  # every spec checked before any training
            if not Path(spec_file).is_file():
                raise Fail(f"{spec_file}: no such spec file")
            name, why = choose_profile(Path(spec_file), profile, str(cfg_flags["device"] or "auto"))
            loaded.append(load_spec(spec_file, list(set_ or []), profile=name))
            chosen.append(None if name == NO_PROFILE else name)
            if name != NO_PROFILE and not quiet:
                console.print(f"{spec_file}: " + profile_line(Path(spec_file), name, why), highlight=False,
                              soft_wrap=True)
        root = Path(out) if out else default_run_dir("compare")
        if root.exists() and any(root.iterdir()):
            raise Fail(f"--out {root} is not empty; choose a new directory")
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
        from nestlearn.suite.table import Table, render

        table_rows = []
        kinds = set()  # what the main column holds: bits/byte (lm), accuracy (synthetic tasks) or both
        for path, s in rows:
            val = s.get("val", {})
            metric = "bits_per_byte" if "bits_per_byte" in val else "accuracy" if "accuracy" in val else None
            main = f"{val[metric]:.4f}" if metric else "-"
            if metric:
                kinds.add("bits/byte" if metric == "bits_per_byte" else "acc")
            table_rows.append([
                f"{s['spec']} ({path})", f"{s['params']:,}",
                f"{s['first_loss']:.3f} -> {s['train'].get('loss', float('nan')):.3f}" if s.get("first_loss") else "-",
                f"{val['loss']:.4f}" if val else "-", main, fmt_rate(s.get("tokens_per_s")),
                fmt_time(s.get("time_s") or 0), s["status"],
            ])
        main_col = "bits/byte or acc" if len(kinds) > 1 else next(iter(kinds), "bits/byte")
        columns = ["spec", "params", "train loss", "val loss", main_col, "tokens/s", "time", "status"]
        render([Table("comparison", columns, table_rows, list("lrrrrrrl"))], fmt,
               data=[s for _, s in rows] if fmt == "json" else None)
        from nestlearn.files import atomic_write

        atomic_write(root / "compare.json", (json.dumps([s for _, s in rows], indent=2, default=str) + "\n").encode())
        typer.echo(f"runs in {root}", err=fmt == "json")
        if rows and rows[-1][1]["status"] == "interrupted":
            raise typer.Exit(130)
