"""What every command shares: the one error handler (every error a user can cause -> one
message on stderr and a non-zero exit, never a traceback) and the parsing of flag values."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import typer


class Fail(Exception):
    """A bad flag value or argument (reported as ``error: ...``, exit 1)."""


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


@contextlib.contextmanager
def errors() -> Iterator[None]:
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
    except (TrainError, TaskError, Fail) as err:
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


def parse_int(flag: str, value: str | None, lo: int = 1, hi: int | None = None) -> int | None:
    from nestlearn.train.config import MAX_COUNT

    if value is None:
        return None
    try:
        n = int(value.replace("_", ""))
    except ValueError:
        raise Fail(f"{flag}: expected a whole number, got {value!r}") from None
    if n < lo:
        raise Fail(f"{flag}: must be at least {lo}, got {n}")
    top = MAX_COUNT if hi is None else hi
    if n > top:  # torch overflows (or spawns threads until it crashes) far beyond any useful value
        raise Fail(f"{flag}: must be at most {top}, got {n}")
    return n


def parse_float(flag: str, value: str | None, lo: float = 0.0, strict: bool = True) -> float | None:
    if value is None:
        return None
    try:
        x = float(value)
    except ValueError:
        raise Fail(f"{flag}: expected a number, got {value!r}") from None
    if not math.isfinite(x) or x < lo or (strict and x == lo):
        raise Fail(f"{flag}: must be a finite number {'>' if strict else '>='} {lo:g}, got {value}")
    return x


def parse_choice(flag: str, value: str | None, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if value not in choices:
        raise Fail(f"{flag}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def parse_task(value: str | None) -> str | None:
    if value is None:
        return None
    from nestlearn.spec.errors import suggest
    from nestlearn.tasks import task_names

    names = task_names()
    if value not in names:
        raise Fail(f"--task: unknown task '{value}'{suggest(value, names, n=2, cutoff=0.6)}; choices: {', '.join(names)}")
    return value


def parse_kv(flag: str, items: list[str] | None) -> dict[str, str]:
    out = {}
    for it in items or []:
        key, eq, val = it.partition("=")
        if not eq or not key.strip():
            raise Fail(f"{flag}: expected KEY=VALUE, got {it!r}")
        out[key.strip()] = val
    return out
