"""What every command shares: the one error handler (every error a user can cause -> one
message on stderr and a non-zero exit, never a traceback) and the parsing of flag values."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import typer

from nestlearn.spec.errors import SpecError


class Fail(Exception):
    """A user error outside the spec itself: a bad flag value or argument, an unwritable path
    (reported as ``error: ...``, exit 1)."""


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Every error a user can cause -> its message on stderr and exit code 1 (Ctrl-C: 130), no
    traceback; a bug of ours -> one ``internal error`` line (the traceback with NESTLEARN_DEBUG=1).
    Importing nothing up front: the spec commands run without torch."""
    pre = _rank_prefix()
    try:
        yield
    except SpecError as err:
        typer.echo(f"{pre}{err}" if str(err) else f"{pre}error: invalid spec", err=True)
        raise typer.Exit(1) from None
    except Fail as err:
        typer.echo(f"{pre}error: {plain_message(str(err))}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(f"{pre}aborted; nothing more was saved (a checkpoint already on disk is kept)", err=True)
        raise typer.Exit(130) from None
    except (typer.Exit, click.exceptions.Exit, click.exceptions.Abort, click.exceptions.ClickException):
        raise
    except Exception as err:
        if _is_training_error(err):
            typer.echo(f"{pre}error: {plain_message(str(err))}", err=True)
        elif isinstance(err, OSError):
            where = f" ({err.filename})" if getattr(err, "filename", None) else ""
            typer.echo(f"{pre}error: {err.strerror or err}{where}", err=True)
        elif os.environ.get("NESTLEARN_DEBUG"):
            raise
        else:  # a bug of ours: still one line for the user
            typer.echo(f"{pre}internal error: {type(err).__name__}: {plain_message(str(err))} (this is a bug in "
                       "nestlearn; set NESTLEARN_DEBUG=1 to see the traceback)", err=True)
        raise typer.Exit(1) from None


def _is_training_error(err: Exception) -> bool:
    """A ``TrainError``, ``TaskError`` or ``SuiteError``: a user's error (bad data, run directory,
    checkpoint, experiment file)."""
    from nestlearn.suite.errors import SuiteError
    from nestlearn.tasks import TaskError
    from nestlearn.train.errors import TrainError

    return isinstance(err, (TrainError, TaskError, SuiteError))


def plain_message(text: str) -> str:
    """``text`` without the C++ backtrace torch appends to some errors (``Exception raised
    from ...`` and dozens of ``frame #N`` lines): the user gets the one line that says what failed."""
    cut = text.find("\nException raised from ")
    if cut < 0:
        return text
    head = text[:cut].rstrip()
    # torch quotes the inner message ("... with error \"Overflow ...") and closes it after the frames
    return head + '"' if head.count('"') % 2 else head


def warn_spec(spec: Any) -> None:
    """One ``warning:`` line on stderr per problem of a valid spec that is likely to diverge at
    long sequences (the chunk-step bound, ``nestlearn.stability``, docs/training-health.md)."""
    from nestlearn.stability import spec_warnings

    for issue in spec_warnings(spec):
        typer.echo(f"warning: {issue.format()}", err=True)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to the file ``path`` a user named (atomically); ``Fail`` if it cannot be."""
    from nestlearn.files import atomic_write

    target = path.expanduser()
    if target.is_dir():
        raise Fail(f"{path}: is a directory")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise Fail(f"{path}: the directory {parent} does not exist")
    try:
        atomic_write(target, text.encode("utf-8"))
    except OSError as exc:
        raise Fail(f"{path}: cannot write ({exc.strerror or exc})") from None


def parse_int(flag: str, value: str | None) -> int | None:
    """The whole number a flag's text gives (``1_000`` too); its bounds are the setting's own
    (``TrainConfig``, ``train.config.check_flag``)."""
    if value is None:
        return None
    try:
        return int(value.replace("_", ""))
    except ValueError:
        raise Fail(f"{flag}: expected a whole number, got {value!r}") from None


def parse_float(flag: str, value: str | None) -> float | None:
    """The number a flag's text gives; its bounds are the setting's own, as for ``parse_int``."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise Fail(f"{flag}: expected a number, got {value!r}") from None


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
