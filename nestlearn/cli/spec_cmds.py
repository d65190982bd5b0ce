"""``nestlearn compile``, ``validate`` and ``schema``: check a spec and show what it builds."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from nestlearn.cli.common import Fail, errors, plain_message, warn_spec, write_text
from nestlearn.graph import LevelGraph, build_graph
from nestlearn.spec import load_spec, spec_json_schema
from nestlearn.spec.errors import SpecError
from nestlearn.spec.schema import Spec, hyper_text
from nestlearn.units import bytes_text, count_text

__all__ = ["register", "compile_cmd", "validate_cmd", "schema_cmd"]

ORDER = 0


class Format(str, Enum):
    text = "text"
    json = "json"


GRAPH_FORMATS = {".dot": "dot", ".gv": "dot", ".mmd": "mermaid", ".mermaid": "mermaid"}
MAX_SCHEDULE_ROWS = 24
MAX_TOKENS = 10_000_000  # the schedule is built token by token: far beyond this it exhausts memory


def register(app: typer.Typer) -> None:
    app.command("compile")(compile_cmd)
    app.command("validate")(validate_cmd)
    app.command("schema")(schema_cmd)


def _load(spec_path: str, overrides: list[str] | None) -> tuple[Spec, LevelGraph]:
    spec = load_spec(spec_path, overrides or ())
    graph = _graph_without_imports(spec)
    warn_spec(spec)
    return spec, graph


def _graph_without_imports(spec: Spec) -> LevelGraph:
    """``build_graph(spec)`` with every user objective (``package.module:function``) checked by
    ``objectives.check_name`` instead of imported: the graph is built for a stand-in with the
    built-in ``l2`` there (nothing else depends on it) and then given the real names back."""
    from nestlearn.objectives import check_name
    from nestlearn.spec import attach_source, issue_at

    issues = [issue_at(spec, ("levels", n, "objective"), msg) for n, lv in spec.levels.items()
              if not lv.is_outer and (msg := check_name(lv.objective)) is not None]
    custom = {n for n, lv in spec.levels.items() if lv.objective not in ("l2", "dot")}
    stand_in = spec
    if custom:
        stand_in = spec.model_copy(update={"levels": {
            n: lv.model_copy(update={"objective": "l2"}) if n in custom else lv for n, lv in spec.levels.items()}})
        attach_source(stand_in, spec)
    try:
        graph = build_graph(stand_in)
    except SpecError as err:
        issues += err.issues
    if issues:
        raise SpecError(sorted(issues, key=lambda i: (i.line or 0, i.col or 0, i.message)))
    graph.spec = spec
    for n in custom:
        graph.levels.nodes[n]["objective"] = spec.levels[n].objective
    return graph


# ----------------------------------------------------------------------------- compile


def _compile_model(spec: LevelGraph) -> tuple[Any, str | None]:
    """Build the module if the compiler is there: ``(model or None, note)``.

    The module is built on the ``meta`` device when possible (no memory for the weights: only
    their counts are shown); any failure there falls back to a normal build.
    """
    try:
        from nestlearn.compile import compile_spec
    except Exception as exc:  # noqa: BLE001 - the compiler is optional for this command
        return None, f"module not built: the compiler is unavailable ({type(exc).__name__}: {exc})"
    try:
        import torch

        with torch.device("meta"):
            return compile_spec(spec), None
    except SpecError:
        raise
    except Exception:  # noqa: BLE001 - retry without the meta device
        pass
    try:
        return compile_spec(spec), None
    except SpecError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Fail(f"the compiler failed on this spec: {type(exc).__name__}: {plain_message(str(exc))}") from None


def _rule_name(rule: Any) -> str:
    return f"torchopt.{rule.fn}" if rule.name == "torchopt" else str(rule.name)


def _rule_text(rule: Any) -> str:
    if rule.name == "torchopt":
        args = ", ".join(f"{k}={v}" for k, v in rule.args.items())
        return f"torchopt.{rule.fn}({args})"
    # the hyper-parameters the spec sets (the defaults are in the docs and the JSON schema)
    given = [k for k in type(rule).model_fields if k != "name" and k in rule.model_fields_set]
    inner = ", ".join(f"{k}={hyper_text(getattr(rule, k))}" for k in given)
    return f"{rule.name}({inner})"


def _node_details(node: Any) -> str:
    parts = []
    for key in ("dim", "window", "heads", "width", "fn", "expand", "persistent", "conv"):
        v = getattr(node, key, None)
        if v not in (None, 0, False) and key in type(node).model_fields:
            parts.append(f"{key}={hyper_text(v)}")
    mem = getattr(node, "memory", None)
    if mem is not None and node.op in ("memory", "selfmod", "mac"):
        parts.append(f"memory={mem.type}" + (f"×{mem.expand:g}" if mem.type == "mlp" else ""))
    for role in ("query", "key", "value"):
        v = getattr(node, role, None)
        if v not in (None, "proj"):
            parts.append(f"{role}={v}")
    init = getattr(node, "init", None)
    if init is not None and node.op in ("memory", "selfmod", "mlp", "mac"):
        parts.append(f"init={init}")
    return ", ".join(parts)


def _report(spec: Spec, graph: LevelGraph, model: Any, note: str | None, tokens: int) -> dict[str, Any]:
    """Everything ``compile`` shows, as one JSON-able document."""
    summary: dict[str, dict[str, Any]] = {}
    if model is not None:
        for row in model.level_summary():
            summary[str(row["name"])] = row
    desc = graph.describe()
    levels = []
    for row in desc["levels"]:
        name = row["name"]
        lv = spec.levels[name]
        s = summary.get(name, {})
        levels.append({
            "name": name,
            "period": lv.period,
            "rule": _rule_text(lv.rule),
            "rule_name": _rule_name(lv.rule),
            "objective": None if lv.is_outer else lv.objective,
            "grad": None if lv.is_outer else lv.grad,
            "params": s.get("params"),
            "state": s.get("state"),
            "kept_per_token": s.get("kept_per_token"),
            "nodes": row["nodes"],
        })
    by_id = {n.id: n for n in spec.block}
    block = []
    for row in desc["nodes"]:
        block.append({**row, "details": _node_details(by_id[row["id"]]), "output": row["id"] == graph.output})
    params = None
    if model is not None:
        params = int(model.num_parameters()) if hasattr(model, "num_parameters") else None
    return {
        "name": spec.name,
        "description": spec.description,
        "model": spec.model.model_dump(),
        "parameters": params,
        "compiled": model is not None,
        "note": note,
        "levels": levels,
        "level_order": graph.level_order,
        "block": block,
        "output": graph.output,
        "edges": desc["edges"],
        "schedule": {"tokens": tokens, "steps": [s.as_dict() for s in graph.schedule(tokens)]},
        "no_outer_grad": _no_outer_grad(spec) if model is not None else None,
    }


def _no_outer_grad(spec: Spec) -> dict[str, Any] | None:
    """The parameters the spec's ``first_order`` / ``stop`` levels cut from the outer gradient
    (``compile/gradcheck.py``): ``{"modes": {level: mode}, "params": [...]}``, None if no level
    has such a mode."""
    from nestlearn.compile.gradcheck import cutting_levels, no_outer_grad

    modes = cutting_levels(spec)
    if not modes:
        return None
    try:
        return {"modes": modes, "params": no_outer_grad(spec)}
    except Exception as exc:  # noqa: BLE001 - the check is advice; the spec itself compiled
        return {"modes": modes, "params": None, "error": f"{type(exc).__name__}: {exc}"}


def _count(n: Any) -> str:
    return "-" if n is None else count_text(int(n))


def _bytes(n: float | None) -> str:
    return "-" if n is None else bytes_text(n)


def _print_text(report: dict[str, Any], console: Console) -> None:
    m = report["model"]
    title = Text(report["name"], style="bold")
    if report["description"]:
        title.append(f" — {report['description']}", style="dim")
    console.print(title)
    line = (f"vocab {m['vocab']} · dim {m['dim']} · depth {m['depth']} · heads {m['heads']} · "
            f"parameters {_count(report['parameters'])}")
    console.print(line, highlight=False)
    if report["note"]:
        console.print(Text(report["note"], style="yellow"))

    t = Table(title="levels (fast to slow)", title_justify="left", show_lines=False)
    # "obj": the objective (l2, dot or a function's name); short, so the row fits 80 columns
    for col in ("level", "period", "rule", "obj", "grad", "params", "state", "kept/token"):
        t.add_column(col, justify="right" if col in ("period", "params", "state", "kept/token") else "left")
    for lv in report["levels"]:
        # the rule's name here, its hyper-parameters below the table: in one cell they wrap the
        # table past reading at 80 columns
        t.add_row(lv["name"], str(lv["period"]), lv["rule_name"], lv["objective"] or "-",
                  lv["grad"] or "-", _count(lv["params"]), _count(lv["state"]), _bytes(lv.get("kept_per_token")))
    console.print(t)
    for lv in report["levels"]:
        if lv["rule"] != f"{lv['rule_name']}()":  # the hyper-parameters the spec sets
            console.print(Text.assemble((f"  {lv['name']}: ", "bold"), lv["rule"]), highlight=False)
    if any(lv.get("kept_per_token") for lv in report["levels"]):
        console.print(Text("kept/token: the fast state alone that the backward keeps per token of each sequence "
                           "(fp32 weights and rule state at every chunk start; `remat: N` divides it by N), a lower "
                           "bound on the level's memory per token: its activations come on top; none for period 1, "
                           "where it depends on the executor; training on CUDA through the CMS kernel, an `mlp` level "
                           "under `sgd` keeps its chunks' error signals and every 16th weights instead, about 8x "
                           "less at HOPE's shape", style="dim"))
    _print_no_outer_grad(report.get("no_outer_grad"), console)

    b = Table(title=f"block (a DAG, stacked {m['depth']}×; output {report['output']})", title_justify="left")
    for col in ("id", "op", "in", "level", "width", "details"):
        b.add_column(col, justify="right" if col == "width" else "left")
    b.add_row("x", "input", "", "", str(m["dim"]), "", style="dim")
    for node in report["block"]:
        b.add_row(node["id"] + (" →" if node["output"] else ""), node["op"], ", ".join(node["in"]),
                  node["level"] or "-", str(node["width"]), node["details"])
    console.print(b)

    if report["edges"]:
        e = Table(title="level edges", title_justify="left")
        for col in ("type", "from", "to", "via"):
            e.add_column(col)
        for edge in report["edges"]:
            via = ", ".join(edge.get("via") or [])
            if edge.get("mode"):
                via = f"mode {edge['mode']}" + (f"; {via}" if via else "")
            e.add_row(edge["type"], edge["from"], edge["to"], via)
        console.print(e)

    sched = report["schedule"]
    s = Table(title=f"schedule over {sched['tokens']} tokens", title_justify="left")
    for col in ("chunks", "tokens", "after each chunk, update", "every token"):
        s.add_column(col)
    rows = _schedule_rows(sched["steps"])
    shown: list[tuple[str, ...] | None] = list(rows)
    if len(rows) > MAX_SCHEDULE_ROWS:
        shown = [*rows[: MAX_SCHEDULE_ROWS - 2], None, rows[-1]]
    for row in shown:
        if row is None:
            s.add_row("…", f"{len(rows) - MAX_SCHEDULE_ROWS + 1} more rows", "", "")
        else:
            s.add_row(*row)
    console.print(s)


def _print_no_outer_grad(found: dict[str, Any] | None, console: Console) -> None:
    if found is None:
        return
    from nestlearn.compile.gradcheck import describe

    if found["params"] is None:
        console.print(Text(f"could not check which parameters the grad modes cut off: {found['error']}", style="yellow"))
    elif found["params"]:
        console.print(Text(describe(found["params"], found["modes"]), style="yellow"))


def _schedule_rows(steps: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """Runs of consecutive chunks of one length with the same updates, one row each."""
    rows: list[tuple[str, str, str, str]] = []
    k = 0
    while k < len(steps):
        first = steps[k]
        size = first["end"] - first["start"]
        n = k + 1
        while (n < len(steps) and steps[n]["updates"] == first["updates"]
               and steps[n]["end"] - steps[n]["start"] == size):
            n += 1
        last = steps[n - 1]
        chunks = str(k) if n - k == 1 else f"{k}–{n - 1}"
        tokens = f"{first['start']}–{last['end'] - 1}" + (f" ({n - k} × {size})" if n - k > 1 else "")
        rows.append((chunks, tokens, ", ".join(first["updates"]) or "-", ", ".join(first["every_token"]) or "-"))
        k = n
    return rows


def _graph_format(path: str) -> str:
    fmt = GRAPH_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise Fail(f"--graph {path}: unknown graph format {Path(path).suffix or '(no suffix)'!r}; "
                    "use a .dot (Graphviz) or .mmd (Mermaid) file")
    return fmt


def compile_cmd(
    spec: str = typer.Argument(..., metavar="SPEC", help="The spec file (YAML).", show_default=False),
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                          help="Overrides, e.g. model.dim=64 levels.memory.rule.lr=0.01"),
    format: Format = typer.Option(Format.text, "--format", "-f", help="Output format."),
    graph: str = typer.Option(None, "--graph", "-g", metavar="FILE",
                              help="Also write the graph: FILE.dot (Graphviz) or FILE.mmd (Mermaid)."),
    tokens: int = typer.Option(None, "--tokens", "-t", min=1, max=MAX_TOKENS,
                               help="Stream length for the schedule [default: twice the slowest period]"),
    build: bool = typer.Option(True, "--build/--no-build",
                               help="Build the module (parameter counts); --no-build shows the graph only."),
) -> None:
    """Validate SPEC, build its level graph and module; show levels, block graph and schedule."""
    with errors():
        fmt = _graph_format(graph) if graph else None
        spec_obj, g = _load(spec, overrides)
        model, note = _compile_model(g) if build else (None, "module not built (--no-build)")
        report = _report(spec_obj, g, model, note, tokens or g.default_tokens())
        if fmt is not None:
            write_text(Path(graph), g.to_dot() if fmt == "dot" else g.to_mermaid())
        if format == Format.json:
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        else:
            _print_text(report, Console(highlight=False))
            if fmt is not None:
                typer.echo(f"graph written to {graph} ({fmt})")


# ----------------------------------------------------------------------------- validate, schema


def validate_cmd(
    spec: str = typer.Argument(..., metavar="SPEC", help="The spec file (YAML).", show_default=False),
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                          help="Overrides, e.g. model.dim=64"),
) -> None:
    """Check SPEC (schema and level graph): print its errors and exit 1, or 'ok: NAME'."""
    with errors():
        spec_obj, _ = _load(spec, overrides)
        typer.echo(f"ok: {spec_obj.name}")


def schema_cmd(
    output: str = typer.Option(None, "--output", "-o", metavar="FILE",
                               help="Write to FILE instead of stdout."),
) -> None:
    """Print the JSON Schema of a spec (for editor completion and validation)."""
    with errors():
        text = json.dumps(spec_json_schema(), indent=2) + "\n"
        if output:
            write_text(Path(output), text)
            typer.echo(f"schema written to {output}", err=True)
        else:
            sys.stdout.write(text)
