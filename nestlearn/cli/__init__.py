"""The ``nestlearn`` command line.

Commands live in ``nestlearn/cli/<topic>_cmds.py`` modules, each exposing ``register(app)``
(and ``ORDER``, its place in ``--help``); every such module is found and registered here, so
adding a command group needs no edit to this file. What the commands share is in ``common``
(the one error handler: every error a user can cause is one clear message with a non-zero exit;
flag parsing) and ``progress`` (the training display).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

app = typer.Typer(
    name="nestlearn",
    help="Declarative nested optimization for PyTorch: specs of levels, periods, objectives and rules.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"nestlearn {version('nestlearn')}")
        except PackageNotFoundError:
            typer.echo("nestlearn (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Declarative nested optimization for PyTorch."""


def _register_all() -> None:
    modules = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.endswith("_cmds"):
            continue
        try:
            modules.append(importlib.import_module(f"{__name__}.{info.name}"))
        except Exception as exc:  # noqa: BLE001 - one broken command module must not break the others
            print(f"nestlearn: the commands of {info.name} are unavailable ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__)):
        register = getattr(module, "register", None)
        if callable(register):
            register(app)


_register_all()


def main() -> None:
    """Entry point of the ``nestlearn`` console script and ``python -m nestlearn``."""
    app(prog_name="nestlearn")
