"""``nestlearn eval`` and ``generate``: use a trained run directory.

    nestlearn eval runs/t ; nestlearn generate runs/t --prompt "def "
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from nestlearn.cli.common import Fail, errors, parse_float, parse_int
from nestlearn.cli.progress import forgetting_rows

__all__ = ["register", "eval_cmd", "generate_cmd"]

ORDER = 2


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
    app.command("generate")(generate_cmd)


def eval_cmd(
    run_dir: str = typer.Argument(..., metavar="RUN_DIR", help="A run directory written by nestlearn run."),
    batches: Optional[str] = typer.Option(None, "--batches", metavar="N", help="Validation batches (default: the run's)."),
    batch: Optional[str] = typer.Option(None, "--batch", metavar="B", help="Batch size (default: the run's)."),
    seq_len: Optional[str] = typer.Option(None, "--seq-len", metavar="T", help="Sequence length (default: the run's)."),
    lengths: Optional[str] = typer.Option(None, "--lengths", metavar="N,N,...",
                                          help="niah: the haystack lengths (default T/2, T, 2T, 4T)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="auto|cpu|cuda"),
    from_initial: bool = typer.Option(
        False, "--from-initial-state",
        help="A --carry-state run: start every held-out row from the model's initial state, not from the state "
             "its checkpoint carried (the default, as in training)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Validation loss, bits per byte and perplexity of a trained run (written to RUN_DIR/eval.json).

    Synthetic tasks add accuracy, NIAH its accuracy by length, a continual run every domain.

    A --carry-state run is evaluated from the state its checkpoint carried (row i from row i mod B)."""
    console = Console()
    with errors():
        from nestlearn.train.config import Count, TrainConfig, check_flag

        lens = None
        if lengths is not None:
            lens = [check_flag("--lengths", parse_int("--lengths", x.strip()), Count)
                    for x in lengths.split(",") if x.strip()]
            if not lens:
                raise Fail(f"--lengths: expected numbers like 128,256, got {lengths!r}")
        n, b, t = parse_int("--batches", batches), parse_int("--batch", batch), parse_int("--seq-len", seq_len)
        TrainConfig.check_values({"eval_batches": n, "batch": b, "seq_len": t, "device": device},
                                 flags={"eval_batches": "--batches"})
        dev = device or "auto"
        from nestlearn.files import atomic_write
        from nestlearn.train.evaluate import evaluate_run, load_run

        loaded = load_run(run_dir, dev)
        res = evaluate_run(loaded, n, b, t, lens, from_initial=from_initial)
        atomic_write(loaded.run.path / "eval.json", (json.dumps(res, indent=2) + "\n").encode())
        if as_json:
            typer.echo(json.dumps(res, indent=2))
            return
        table = Table(title=f"{loaded.spec.name} at step {res['step']}: {res['task']}", title_justify="left")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("evaluated from", f"the {res['eval_state']} state")
        if "val" in res:
            for k, v in res["val"].items():
                table.add_row(k.replace("_", " "), f"{v:.4f}")
        for d, m in res.get("domains", {}).items():
            for k, v in m.items():
                table.add_row(f"{d}: {k.replace('_', ' ')}", f"{v:.4f}")
        for label, text in forgetting_rows(res):
            table.add_row(label, text)
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
    with errors():
        from nestlearn.train.config import Count, NonNegative, Size, TrainConfig, check_flag

        n, temp, k, s = (parse_int("--tokens", tokens), parse_float("--temperature", temperature),
                         parse_int("--top-k", top_k), parse_int("--seed", seed))
        for flag, value, bounds in (("--tokens", n, Count), ("--temperature", temp, NonNegative), ("--top-k", k, Size)):
            if value is not None:
                check_flag(flag, value, bounds)
        TrainConfig.check_values({"seed": s, "device": device})
        n, k, s, dev = n or 200, k or 0, s or 0, device or "auto"
        from nestlearn.train.evaluate import Utf8Stream, generate, load_run

        loaded = load_run(run_dir, dev)
        vocab = loaded.spec.model.vocab
        data = prompt.encode("utf-8")
        if vocab < 256 and any(b >= vocab for b in data):
            raise Fail(f"--prompt: this model's vocabulary has {vocab} symbols, the prompt has bytes beyond it")
        out = Utf8Stream()
        sys.stdout.write(prompt)
        for b in generate(loaded.model, data, n, 0.8 if temp is None else temp, k, s, loaded.device):
            sys.stdout.write(out.feed(b))
            sys.stdout.flush()
        sys.stdout.write(out.close() + "\n")
