"""What ``nestlearn run`` and ``compare`` show while training: a live bar (or plain lines) and
the summary table at the end."""

from __future__ import annotations

import time
from typing import Any

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

SLOW_HINT_MINUTES = 10.0  # a run with default steps projected longer than this gets a hint
BIG_FOR_CPU = 8_000_000  # parameters: a default run of a bigger spec on CPU gets a hint at once


def _percent(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}%"


def forgetting_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """A continual run's forgetting (in %, as the paper and the suite report it) and its loss
    increase (nats) as table rows: one number per earlier domain."""
    rows = []
    if result.get("forgetting"):
        rows.append(("forgetting", ", ".join(f"{d} {_percent(v)}" for d, v in result["forgetting"].items())))
    if result.get("loss_increase"):
        rows.append(("loss increase", ", ".join(f"{d} {v:+.4f} nats" for d, v in result["loss_increase"].items())))
    return rows


def fmt_rate(x: float | None) -> str:
    if not x:
        return "-"
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}K" if x >= 1e3 else f"{x:.0f}"


def fmt_time(s: float) -> str:
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
                                 rate=fmt_rate(rate))
            return
        now = time.perf_counter()
        if now - self.last_print >= 10 or rec["step"] in (self.start_step + 1, self.total):
            self.last_print = now
            extra = f" acc {rec['accuracy']:.3f}" if "accuracy" in rec else ""
            self.console.print(f"step {rec['step']}/{self.total}  loss {self.loss_ema:.4f} (smoothed){extra}  "
                               f"{fmt_rate(rate)} tok/s  lr {rec['lr']:.2e}  elapsed {fmt_time(elapsed)}")

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
    t.add_row("time", f"{fmt_time(summary.get('time_s') or 0)} ({fmt_rate(summary.get('tokens_per_s'))} tokens/s)")
    if summary.get("first_loss") is not None and tr.get("loss") is not None:
        t.add_row("train loss", f"{summary['first_loss']:.4f} -> {tr['loss']:.4f}")
    if val:
        carried = ", from the carried state" if val.get("eval_state") == "carried" else ""
        t.add_row("validation loss", f"{val['loss']:.4f} (step {val.get('step')}{carried})")
        if "bits_per_byte" in val:
            t.add_row("bits/byte", f"{val['bits_per_byte']:.4f}")
            t.add_row("perplexity", f"{val['perplexity']:.3f}")
        if "accuracy" in val:
            t.add_row("accuracy", f"{val['accuracy']:.4f} (sequences {val.get('sequence_accuracy', 0):.4f})")
    for name, v in tr.get("levels", {}).items():
        gain = f", chunk gain {_fmt_num(v['chunk_gain'])}" if v.get("chunk_gain") is not None else ""
        gain += f", peak gain {_fmt_num(v['peak_gain'])}" if v.get("peak_gain") is not None else ""
        t.add_row(f"level {name}", f"inner loss {_fmt_num(v.get('inner_loss'))}, "
                                   f"update norm {_fmt_num(v.get('update_norm'))}{gain}")
    for label, text in forgetting_rows(summary):
        t.add_row(label, text)
    t.add_row("run directory", str(summary.get("run_dir")))
    return t
