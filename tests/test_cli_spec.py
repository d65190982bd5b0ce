"""``nestlearn compile``, ``validate`` and ``schema``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nestlearn.cli import app

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny.yaml"
runner = CliRunner()


def run(*args: str):  # noqa: ANN201
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for name in ("compile", "validate", "schema"):
        assert name in result.stdout


def test_compile_text() -> None:
    result = run("compile", str(TINY))
    assert result.exit_code == 0, result.output
    out = result.stdout
    for needle in ("tiny", "levels (fast to slow)", "momentum", "adamw", "block", "attention", "window=16",
                   "memory=mlp×2", "schedule over 16 tokens", "0–15 (2 × 8)", "level edges", "init", "kept/token",
                   "memory: momentum(lr=gate(token, max 0.1), beta=0.9)", "outer: adamw(lr=0.0003)"):
        assert needle in out, needle  # the rule's name in the levels table, its hyper-parameters below it
    assert result.stderr == ""


def test_compile_json() -> None:
    result = run("compile", str(TINY), "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["name"] == "tiny"
    assert [lv["name"] for lv in doc["levels"]] == ["memory", "outer"]
    memory = doc["levels"][0]
    assert (memory["period"], memory["objective"], memory["grad"]) == (8, "l2", "unroll")
    assert memory["rule"] == "momentum(lr=gate(token, max 0.1), beta=0.9)"
    assert [n["id"] for n in doc["block"]] == ["n1", "att", "r1", "n2", "mem", "out"]
    assert all(n["width"] == 32 for n in doc["block"])
    assert doc["output"] == "out"
    assert doc["schedule"] == {"tokens": 16, "steps": [
        {"start": 0, "end": 8, "updates": ["memory"], "every_token": []},
        {"start": 8, "end": 16, "updates": ["memory"], "every_token": []},
    ]}
    assert {e["type"] for e in doc["edges"]} == {"init", "condition", "grad"}
    if doc["compiled"]:  # the compiler is there: parameter and state counts come from the module
        assert isinstance(doc["parameters"], int) and doc["parameters"] > 0
        assert all(isinstance(lv["params"], int) and isinstance(lv["state"], int) for lv in doc["levels"])
        assert memory["state"] > 0
        # the fast state its backward keeps per token: weights with momentum, every 8 tokens
        assert memory["kept_per_token"] == memory["state"] * 2 * 4 / 8
    else:
        assert doc["note"]


def test_compile_with_overrides_and_tokens() -> None:
    result = run("compile", str(TINY), "model.dim=64", "levels.memory.period=4", "-f", "json", "--tokens", "10")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["model"]["dim"] == 64 and all(n["width"] == 64 for n in doc["block"])
    assert [(s["start"], s["end"], s["updates"]) for s in doc["schedule"]["steps"]] == [
        (0, 4, ["memory"]), (4, 8, ["memory"]), (8, 10, []),
    ]


def test_compile_without_building() -> None:
    result = run("compile", str(TINY), "--no-build", "-f", "json")
    doc = json.loads(result.stdout)
    assert doc["compiled"] is False and doc["parameters"] is None and "--no-build" in doc["note"]


def test_compile_without_the_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nestlearn.compile", None)  # the import now fails
    result = run("compile", str(TINY))
    assert result.exit_code == 0, result.output
    assert "module not built" in result.stdout and "levels (fast to slow)" in result.stdout
    doc = json.loads(run("compile", str(TINY), "-f", "json").stdout)
    assert doc["compiled"] is False and doc["levels"][0]["params"] is None


@pytest.mark.parametrize(("suffix", "start"), [(".dot", 'digraph "tiny" {'), (".gv", "digraph"),
                                               (".mmd", "flowchart TB")])
def test_compile_writes_the_graph(tmp_path: Path, suffix: str, start: str) -> None:
    target = tmp_path / f"g{suffix}"
    result = run("compile", str(TINY), "--no-build", "--graph", str(target))
    assert result.exit_code == 0, result.output
    assert target.read_text().startswith(start)
    assert f"graph written to {target}" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left behind


def test_compile_graph_with_json_keeps_stdout_json(tmp_path: Path) -> None:
    target = tmp_path / "g.mmd"
    result = run("compile", str(TINY), "--no-build", "-f", "json", "-g", str(target))
    json.loads(result.stdout)
    assert target.exists()


def test_compile_graph_errors(tmp_path: Path) -> None:
    result = run("compile", str(TINY), "--graph", str(tmp_path / "g.png"))
    assert result.exit_code == 1 and "unknown graph format '.png'" in result.stderr
    result = run("compile", str(TINY), "--graph", str(tmp_path / "missing" / "g.dot"))
    assert result.exit_code == 1 and "does not exist" in result.stderr
    result = run("compile", str(TINY), "--graph", str(tmp_path))
    assert result.exit_code == 1


def test_compile_reports_spec_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("op: attention", "op: attn"))
    for fmt in ("text", "json"):
        result = run("compile", str(bad), "-f", fmt)
        assert result.exit_code == 1
        assert result.stdout == ""
        assert result.stderr == f"{bad}:9:19: block.1.op: unknown op 'attn' (did you mean 'attention'?)\n"


def test_validate_ok_and_bad(tmp_path: Path) -> None:
    result = run("validate", str(TINY))
    assert (result.exit_code, result.stdout, result.stderr) == (0, "ok: tiny\n", "")
    result = run("validate", str(TINY), "levels.memory.rule.name=adamx")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("<override>:1:25: levels.memory.rule.name: unknown rule 'adamx'")


def test_bad_override_on_the_command_line() -> None:
    result = run("validate", str(TINY), "model.dim")
    assert result.exit_code == 1
    assert result.stderr == "<override>:1:1: malformed override 'model.dim': expected path.to.key=value\n"


def test_bad_format_flag_is_a_usage_error() -> None:
    result = run("compile", str(TINY), "--format", "xml")
    assert result.exit_code == 2  # click's usage error: a message, no traceback


def test_schema_to_stdout_and_file(tmp_path: Path) -> None:
    result = run("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert {"levels", "block", "model"} <= set(schema["properties"])
    assert "in" in schema["$defs"]["AttentionNode"]["properties"]  # the alias users write
    target = tmp_path / "spec.schema.json"
    result = run("schema", "-o", str(target))
    assert result.exit_code == 0 and result.stdout == ""
    assert json.loads(target.read_text()) == schema
    result = run("schema", "-o", str(tmp_path / "nope" / "s.json"))
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_an_internal_bug_is_one_line_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from nestlearn.cli import spec_cmds

    def broken(spec: object) -> None:
        raise KeyError("oops")

    monkeypatch.setattr(spec_cmds, "build_graph", broken)
    result = run("validate", str(TINY))
    assert result.exit_code == 1
    assert result.stderr.startswith("internal error: KeyError: 'oops' (this is a bug in nestlearn")
    monkeypatch.setenv("NESTLEARN_DEBUG", "1")
    result = runner.invoke(app, ["validate", str(TINY)])
    assert isinstance(result.exception, KeyError)
