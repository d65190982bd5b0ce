"""Invoke the ``nestlearn`` CLI in-process for tests: exit code and all output, never a traceback."""

from __future__ import annotations

from typer.testing import CliRunner

from nestlearn.cli import app

runner = CliRunner()


def nl(*args: object) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    out = res.output + (res.stderr if res.stderr_bytes is not None and res.stderr not in res.output else "")
    assert "Traceback" not in out, out
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, out
