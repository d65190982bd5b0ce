"""Bad specs: every one gives a clear ``file:line:col: path: message`` and exit code 1, never a traceback.

Each case edits the small valid spec in ``tests/data/tiny.yaml`` (line numbers below refer to
it) and states the exact position, path and a key phrase of the first message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nestlearn.cli import app
from nestlearn.graph import build_graph
from nestlearn.spec.errors import SpecError, SpecIssue
from nestlearn.spec.loader import load_spec, parse_spec

DATA = Path(__file__).parent / "data"
TINY = (DATA / "tiny.yaml").read_text()
TINY_BLOCK = (DATA / "tiny_block.yaml").read_text()
#  1 nestlearn: 1
#  2 name: tiny
#  3 model: {vocab: 256, dim: 32, depth: 2, heads: 2}
#  4 levels:
#  5   outer:  {period: outer, rule: {name: adamw, lr: 3.0e-4}}
#  6   memory: {period: 8, objective: l2, rule: {name: momentum, lr: {gate: token, max: 0.1}, beta: 0.9}}
#  7 block:
#  8   - {id: n1, op: rmsnorm, in: x}
#  9   - {id: att, op: attention, in: n1, window: 16}
# 10   - {id: r1, op: add, in: [x, att]}
# 11   - {id: n2, op: rmsnorm, in: r1}
# 12   - {id: mem, op: memory, in: n2, level: memory, memory: {type: mlp, expand: 2}}
# 13   - {id: out, op: add, in: [r1, mem]}


def edit(text: str, *pairs: tuple[str, str]) -> str:
    """``text`` with each ``old -> new`` replaced (each ``old`` must occur exactly once)."""
    for old, new in pairs:
        assert text.count(old) == 1, f"stale edit: {old!r} occurs {text.count(old)} times"
        text = text.replace(old, new)
    return text


def tiny(*pairs: tuple[str, str]) -> str:
    return edit(TINY, *pairs)


MEM_RULE = "{name: momentum, lr: {gate: token, max: 0.1}, beta: 0.9}"
EXTRA_LEVEL = "levels:\n  slow: {period: 16, rule: {name: sgd}}\n"


@dataclass
class Case:
    id: str
    text: str | bytes
    line: int | None
    col: int | None
    path: str
    phrase: str
    overrides: tuple[str, ...] = ()
    file: str | None = None  # None: the spec file itself
    count: int = 1  # how many issues the spec has in all


CASES = [
    # ---- the file and its YAML
    Case("empty-file", "", 1, 1, "", "the spec is empty"),
    Case("only-comments", "# nothing here\n\n", 1, 1, "", "the spec is empty"),
    Case("top-level-list", "- {id: a}\n- {id: b}\n", 1, 1, "", "must be a mapping"),
    Case("top-level-scalar", "hello\n", 1, 1, "", "got the scalar 'hello'"),
    Case("broken-yaml-flow", tiny(("block:\n", "block: [\n")), 8, 3, "", "invalid YAML"),
    Case("broken-yaml-indent", tiny(("  - {id: n1", "\t- {id: n1")), 8, 1, "", "found character '\\t'"),
    Case("unclosed-mapping", tiny(("{id: n2, op: rmsnorm, in: r1}", "{id: n2, op: rmsnorm, in: r1")), 12, 5, "",
         "invalid YAML"),
    Case("two-documents", TINY + "---\nname: again\n", 14, 1, "", "expected a single document"),
    Case("duplicate-yaml-key", tiny(("name: tiny\n", "name: tiny\nname: other\n")), 3, 1, "name",
         "duplicate key 'name' (first given at line 2)"),
    Case("duplicate-key-in-flow", tiny(("in: r1}", "in: r1, in: n1}")), 11, 35, "block.3.in",
         "duplicate key 'in'"),
    Case("control-character", tiny(("name: tiny", "name: ti\x07ny")), 2, 9, "", "unacceptable character #x0007"),
    Case("python-tag", tiny(("name: tiny", "name: !!python/object/apply:os.system [ls]")), 2, 7, "",
         "could not determine a constructor"),
    Case("alias-bomb", "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10) if i else 'x'}]\n"
                               for i in range(9)), 1, 1, "", "aliases expand to more than"),
    Case("nested-too-deeply", "name: " + "[" * 3000 + "]" * 3000 + "\n", 1, 1, "", "nested too deeply"),
    Case("not-utf8", TINY.encode().replace(b"name: tiny", b"name: ti\xffny"), 2, 9, "", "not valid UTF-8"),
    # ---- schema: types, names, values
    Case("unknown-top-field", tiny(("name: tiny", "name: tiny\nlevls: 3")), 3, 1, "levls",
         "unknown field 'levls' (did you mean 'levels'?)"),
    Case("unknown-node-field", tiny(("window: 16", "widnow: 16")), 9, 38, "block.1.widnow",
         "unknown field 'widnow' (did you mean 'window'?)"),
    Case("unknown-op", tiny(("op: attention", "op: attn")), 9, 19, "block.1.op",
         "unknown op 'attn' (did you mean 'attention'?)"),
    Case("missing-op", tiny(("op: attention, ", "")), 9, 5, "block.1.op", "required field is missing"),
    Case("unknown-rule", tiny(("name: momentum", "name: adamx")), 6, 51, "levels.memory.rule.name",
         "unknown rule 'adamx' (did you mean 'adam'?)"),
    Case("unknown-objective", tiny(("objective: l2", "objective: l3")), 6, 34, "levels.memory.objective",
         "unknown objective 'l3'"),
    Case("bad-grad-mode", tiny(("objective: l2,", "objective: l2, grad: unrol,")), 6, 44, "levels.memory.grad",
         "unknown gradient mode 'unrol'"),
    Case("truncate-zero", tiny(("objective: l2,", "objective: l2, grad: 'truncate:0',")), 6, 44,
         "levels.memory.grad", "truncate:N"),
    Case("wrong-type-int", tiny(("dim: 32", "dim: big")), 3, 26, "model.dim", "expected an integer, got 'big'"),
    Case("wrong-type-mapping", tiny(("model: {vocab: 256, dim: 32, depth: 2, heads: 2}", "model: [256, 32]")),
         3, 1, "model", "expected a mapping, got a list"),
    Case("wrong-type-bool", tiny(("expand: 2}", "expand: 2}, qk_norm: maybe")), 12, 91, "block.4.qk_norm",
         "expected true or false, got 'maybe'"),
    Case("wrong-type-input", tiny(("in: n1,", "in: 5,")), 9, 34, "block.1.in",
         "expected a string or a list of strings, got 5"),
    Case("wrong-type-input-item", tiny(("in: [x, att]", "in: [x, 7]")), 10, 31, "block.2.in.1",
         "expected a string, got 7"),
    Case("wrong-type-hyper", tiny(("lr: {gate: token, max: 0.1}", "lr: fast")), 6, 65, "levels.memory.rule.lr",
         "expected a number, {learned: ...} or {gate: ...}, got 'fast'"),
    Case("non-positive-period", tiny(("period: 8", "period: -3")), 6, 20, "levels.memory.period",
         "expected an integer > 0, got -3"),
    Case("zero-period", tiny(("period: 8", "period: 0")), 6, 20, "levels.memory.period",
         "expected an integer > 0, got 0"),
    Case("period-typo", tiny(("period: outer", "period: outr")), 5, 20, "levels.outer.period",
         "expected 'outer' or an integer > 0, got 'outr' (did you mean 'outer'?)"),
    Case("no-outer-level", tiny(("period: outer", "period: 64")), 4, 1, "levels", "no level has 'period: outer'"),
    Case("two-outer-levels", tiny(("period: 8", "period: outer")), 6, 20, "levels.memory.period",
         "a second outer level"),
    Case("gate-max-zero", tiny(("max: 0.1", "max: 0")), 6, 84, "levels.memory.rule.lr.max",
         "expected a number > 0, got 0"),
    Case("gate-kind-typo", tiny(("gate: token", "gate: tokn")), 6, 72, "levels.memory.rule.lr.gate",
         "got 'tokn' (did you mean 'token'?)"),
    Case("learned-not-number", tiny(("lr: {gate: token, max: 0.1}", "lr: {learned: lots}")), 6, 75,
         "levels.memory.rule.lr.learned", "expected a number, got 'lots'"),
    Case("heads-not-dividing-dim", tiny(("heads: 2}", "heads: 3}")), 3, 47, "model.heads",
         "dim 32 is not divisible by heads 3"),
    Case("missing-field", tiny((" level: memory,", "")), 12, 5, "block.4.level", "required field is missing"),
    Case("missing-levels", "nestlearn: 1\nblock: [{id: a, op: rmsnorm, in: x}]\n", 1, 1, "levels",
         "required field is missing"),
    Case("empty-block", tiny(("block:\n", "block: []\nunused:\n")), 7, 1, "block", "expected at least 1 item",
         count=2),
    Case("bad-id", tiny(("id: att,", "id: 'my att',")), 9, 10, "block.1.id", "invalid id 'my att'"),
    Case("bad-level-name", tiny(("  memory: {", "  'my memory': {")), 6, 3, "levels.my memory",
         "invalid name 'my memory'"),
    Case("format-version", tiny(("nestlearn: 1", "nestlearn: 2")), 1, 12, "nestlearn",
         "unsupported format version 2"),
    Case("block-style-unknown-field", edit(TINY_BLOCK, ("      beta: 0.9", "      betta: 0.9")), 20, 7,
         "levels.memory.rule.betta", "unknown field 'betta' (did you mean 'beta'?)"),
    Case("block-style-missing-rule", edit(TINY_BLOCK, ("    objective: l2\n    rule:\n      name: momentum\n"
                                                      "      lr: {gate: token, max: 0.1}\n      beta: 0.9\n",
                                                      "    objective: l2\n")), 14, 3, "levels.memory.rule",
         "required field is missing"),
    # ---- the graph
    Case("dangling-input", tiny(("in: r1}", "in: r2}")), 11, 31, "block.3.in",
         "unknown input 'r2' (did you mean 'r1'?)"),
    Case("dangling-input-in-list", tiny(("in: [r1, mem]", "in: [r1, memo]")), 13, 33, "block.5.in.1",
         "unknown input 'memo' (did you mean 'mem'?)"),
    Case("cycle", tiny(("{id: n1, op: rmsnorm, in: x}", "{id: n1, op: rmsnorm, in: out}")), 8, 31, "block.0.in",
         "cycle in the block: n1 -> att -> r1 -> n2 -> mem -> out -> n1"),
    Case("self-loop", tiny(("{id: n2, op: rmsnorm, in: r1}", "{id: n2, op: rmsnorm, in: n2}")), 11, 31,
         "block.3.in", "cycle in the block: n2 -> n2"),
    Case("duplicate-id", tiny(("id: r1,", "id: n1,"), ("in: [x, att]", "in: [x, att]")), 10, 10, "block.2.id",
         "duplicate id 'n1' (already used by block.0)", count=3),
    Case("reserved-id", tiny(("id: n2,", "id: x,"), ("in: n2,", "in: x,")), 11, 10, "block.3.id",
         "'x' is reserved"),
    Case("unknown-output", tiny(("block:\n", "output: ot\nblock:\n")), 7, 9, "output",
         "unknown node 'ot' (did you mean 'out'?)"),
    Case("unknown-level", tiny(("level: memory,", "level: memroy,")), 12, 42, "block.4.level",
         "unknown level 'memroy' (did you mean 'memory'?)"),
    Case("memory-at-outer-level", tiny(("level: memory,", "level: outer,")), 12, 42, "block.4.level",
         "'outer' is the outer level"),
    Case("unused-level", tiny(("levels:\n", "levels:\n  extra: {period: 4, rule: {name: sgd}}\n")), 5, 3,
         "levels.extra", "level 'extra' is declared but no node uses it"),
    Case("init-from-faster-level",
         tiny(("levels:\n", "levels:\n  fast: {period: 4, rule: {name: sgd}}\n"),
              ("level: memory,", "level: memory, init: fast,"),
              ("in: [r1, mem]}", "in: [r1, mem]}\n  - {id: m2, op: mlp, in: out, level: fast}\n"
                                 "  - {id: o2, op: add, in: [out, m2]}")),
         13, 56, "block.4.init", "init edge from a faster level: 'fast' (period 4)"),
    Case("init-periods-do-not-divide",
         tiny(("levels:\n", "levels:\n  slow: {period: 12, rule: {name: sgd}}\n"),
              ("level: memory,", "level: memory, init: slow,")),
         13, 56, "block.4.init", "must be a multiple of the period of 'memory' (8)"),
    Case("init-unknown-level", tiny(("level: memory,", "level: memory, init: outr,")), 12, 56, "block.4.init",
         "unknown level 'outr' (did you mean 'outer'?)"),
    Case("unknown-key-source", tiny(("level: memory,", "level: memory, key: n3,")), 12, 55, "block.4.key",
         "unknown key source 'n3'"),
    Case("add-needs-two-inputs", tiny(("in: [x, att]", "in: [att]")), 10, 23, "block.2.in",
         "'add' needs at least 2 inputs, got 1"),
    Case("unary-op-two-inputs", tiny(("{id: n2, op: rmsnorm, in: r1}", "{id: n2, op: rmsnorm, in: [r1, x]}")),
         11, 27, "block.3.in", "'rmsnorm' takes exactly 1 input, got 2"),
    Case("dimension-mismatch-add",
         tiny(("{id: n2, op: rmsnorm, in: r1}", "{id: n2, op: linear, in: r1, dim: 16}"),
              ("in: n2, level", "in: r1, level"), ("in: [r1, mem]", "in: [r1, n2]")),
         13, 24, "block.5.in", "'add' inputs have different widths: r1 (32), n2 (16)"),
    Case("dimension-mismatch-memory", tiny(("{id: n2, op: rmsnorm, in: r1}", "{id: n2, op: linear, in: r1, dim: 16}")),
         12, 31, "block.4.in", "'memory' reads model.dim = 32 wide inputs, but 'n2' is 16 wide"),
    Case("output-not-model-width", TINY + "  - {id: down, op: linear, in: out, dim: 8}\n", 14, 5, "block.6",
         "the block's output 'down' is 8 wide, but must be model.dim = 32"),
    Case("attention-heads-not-dividing", tiny(("window: 16", "window: 16, heads: 5")), 9, 57, "block.1.heads",
         "heads 5 does not divide the width 32"),
    # rope on an odd head width once passed validation and failed in the first forward
    Case("rope-odd-head-width", tiny(("window: 16", "window: 16, heads: 32, rope: true")), 9, 67, "block.1.rope",
         "the head width is odd (32 / 32 heads = 1)"),
    Case("objective-not-importable", tiny(("objective: l2", "objective: 'no_such_pkg.losses:mine'")), 6, 34,
         "levels.memory.objective", "cannot import module 'no_such_pkg.losses'"),
    Case("objective-no-function", tiny(("objective: l2", "objective: 'nestlearn.objectives:l3'")), 6, 34,
         "levels.memory.objective", "has no attribute 'l3' (did you mean 'l2'?)"),
    Case("torchopt-unknown-fn", tiny((MEM_RULE, "{name: torchopt, fn: adamm}")), 6, 65,
         "levels.memory.rule.fn", "torchopt has no transformation 'adamm' (did you mean 'adam'?)"),
    Case("torchopt-bad-args", tiny((MEM_RULE, "{name: torchopt, fn: sgd, args: {lr: 0.1, betas: 2}}")), 6, 70,
         "levels.memory.rule.args", "torchopt.sgd does not accept these arguments"),
    Case("chunk-on-chunked-level", tiny(("objective: l2,", "objective: l2, chunk: 4,")), 6, 45,
         "levels.memory.chunk", "'chunk' applies to period-1 levels only"),
    Case("eps-root-on-outer-level", tiny(("lr: 3.0e-4}}", "lr: 3.0e-4, eps_root: 1.0e-8}}")), 5, 69,
         "levels.outer.rule.eps_root", "eps_root applies to in-context levels only (the outer level trains "
         "with torch.optim, which has none); remove it"),
    Case("max-gain-on-outer-level", tiny(("lr: 3.0e-4}}", "lr: 3.0e-4}, max_gain: 0.5}")), 5, 70,
         "levels.outer.max_gain", "'max_gain' applies to in-context levels only"),
    Case("max-gain-dot-objective", tiny(("objective: l2,", "objective: dot, max_gain: 0.5,")), 6, 49,
         "levels.memory.max_gain", "'max_gain' bounds the l2 objective's chunk step; this level's objective is 'dot'"),
    Case("max-gain-adam-rule", tiny((MEM_RULE, "{name: adam, lr: 0.01}"), ("objective: l2,", "objective: l2, max_gain: 0.5,")),
         6, 48, "levels.memory.max_gain", "'max_gain' bounds a step that sums gradients (sgd, momentum, dgd); rule 'adam'"),
    # ---- overrides
    Case("override-unknown-field", TINY, 1, 11, "block.att.widnow",
         "unknown field 'widnow' (did you mean 'window'?) in override 'block.att.widnow=128'",
         overrides=("block.att.widnow=128",), file="<override>"),
    Case("override-unknown-node", TINY, 1, 7, "block.atn", "no node with id 'atn' (did you mean 'att'?)",
         overrides=("block.atn.window=128",), file="<override>"),
    Case("override-unknown-level", TINY, 2, 8, "levels.memroy", "unknown level 'memroy' (did you mean 'memory'?)",
         overrides=("model.dim=64", "levels.memroy.period=4"), file="<override>"),
    Case("override-unknown-top", TINY, 1, 1, "modle", "unknown field 'modle' (did you mean 'model'?)",
         overrides=("modle.dim=64",), file="<override>"),
    Case("override-malformed", TINY, 1, 1, "", "malformed override 'model.dim'",
         overrides=("model.dim",), file="<override>"),
    Case("override-empty-segment", TINY, 1, 1, "", "malformed override 'model..dim=3'",
         overrides=("model..dim=3",), file="<override>"),
    Case("override-bad-value", TINY, 1, 11, "model.dim", "expected an integer > 0, got -4 (from override",
         overrides=("model.dim=-4",), file="<override>"),
    Case("override-bad-yaml", TINY, 1, 13, "", "invalid YAML", overrides=("model.dim=[1",), file="<override>"),
    Case("override-through-scalar", TINY, 1, 25, "levels.memory.rule.beta.x", "is 0.9, not a mapping",
         overrides=("levels.memory.rule.beta.x=1",), file="<override>"),
    Case("override-index-out-of-range", TINY, 1, 7, "block.9", "index 9 is out of range",
         overrides=("block.9.window=1",), file="<override>"),
    Case("override-creates-bad-graph", TINY, 1, 17, "block.4.level", "unknown level 'slow'",
         overrides=("block.mem.level=slow",), file="<override>"),
]


def _issues(case: Case, tmp_path: Path) -> tuple[list[SpecIssue], Path]:
    path = tmp_path / "spec.yaml"
    if isinstance(case.text, bytes):
        path.write_bytes(case.text)
    else:
        path.write_text(case.text)
    try:
        build_graph(load_spec(path, case.overrides))
    except SpecError as err:
        return err.issues, path
    raise AssertionError(f"{case.id}: no error")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_spec_message(case: Case, tmp_path: Path) -> None:
    issues, path = _issues(case, tmp_path)
    first = issues[0]
    expected_file = case.file or str(path)
    got = (first.file, first.line, first.col, ".".join(map(str, first.loc)))
    assert got == (expected_file, case.line, case.col, case.path), first.format()
    assert case.phrase in first.message, first.format()
    assert len(issues) == case.count, "\n".join(i.format() for i in issues)
    # one line per issue, in the documented shape
    line = first.format()
    prefix = f"{expected_file}:{case.line}:{case.col}: " + (f"{case.path}: " if case.path else "")
    assert line.startswith(prefix) and "\n" not in line


IMPORTED_AT_RUN = {"objective-not-importable", "objective-no-function"}
"""``build_graph`` imports a user objective (``nestlearn run``, ``nestlearn.compile``); ``validate``
checks its name only, never importing it: tests/test_objective_import.py."""
CLI_CASES = [c for c in CASES if c.id not in IMPORTED_AT_RUN]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_bad_spec_cli(case: Case, tmp_path: Path) -> None:
    issues, path = _issues(case, tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(path), *case.overrides])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    assert result.stderr.splitlines() == [i.format() for i in issues]


def test_the_cases_are_distinct() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 30
    assert len({(c.text, c.overrides) for c in CASES}) == len(CASES)


def test_valid_specs_load() -> None:
    for text in (TINY, TINY_BLOCK):
        spec = parse_spec(text, "ok.yaml")
        build_graph(spec)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(missing)
    assert info.value.issues[0].format() == f"{missing}: no such file"
    result = CliRunner().invoke(app, ["compile", str(missing)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == f"{missing}: no such file"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "is a directory" in result.stderr


def test_unreadable_file(tmp_path: Path) -> None:
    import os

    path = tmp_path / "secret.yaml"
    path.write_text(TINY)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # running as root: permissions are not enforced
            pytest.skip("file permissions are not enforced for this user")
        result = CliRunner().invoke(app, ["validate", str(path)])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "permission denied" in result.stderr
    finally:
        path.chmod(0o644)


def test_all_issues_are_reported_at_once(tmp_path: Path) -> None:
    text = tiny(("window: 16", "widnow: 16"), ("name: momentum", "name: adamx"), ("dim: 32", "dim: -1"))
    with pytest.raises(SpecError) as info:
        parse_spec(text, "many.yaml")
    lines = str(info.value).splitlines()
    assert lines == [
        "many.yaml:3:26: model.dim: expected an integer > 0, got -1",
        "many.yaml:6:51: levels.memory.rule.name: unknown rule 'adamx' (did you mean 'adam'?)",
        "many.yaml:9:38: block.1.widnow: unknown field 'widnow' (did you mean 'window'?)",
    ]


def test_graph_issues_are_all_collected() -> None:
    text = tiny(("in: r1}", "in: r2}"), ("level: memory,", "level: memory, init: outr,"),
                ("window: 16", "window: 16, heads: 5"))
    with pytest.raises(SpecError) as info:
        build_graph(parse_spec(text, "g.yaml"))
    assert [(i.line, ".".join(map(str, i.loc))) for i in info.value.issues] == [
        (9, "block.1.heads"), (11, "block.3.in"), (12, "block.4.init"),
    ]


def test_python_m_nestlearn_reports_without_traceback(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    path = tmp_path / "bad.yaml"
    path.write_text(tiny(("in: r1}", "in: r2}")))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "nestlearn", "validate", str(path)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip() == f"{path}:11:31: block.3.in: unknown input 'r2' (did you mean 'r1'?)"


# nested CMS (Eq. 72): an in-context level as the initial state's meta-learner
NESTED_CASES = [
    Case("nested-init-slow-rule-needs-inputs",
         tiny(("levels:\n", "levels:\n  slow: {period: 16, rule: {name: dgd}}\n"),
              ("level: memory,", "level: memory, init: slow,")),
         13, 56, "block.4.init", "nested init: 'slow' meta-learns this node's initial state with one step of "
         "its rule per chunk, but its rule 'dgd' needs a memory's per-token layer inputs"),
    Case("nested-init-on-selfmod",
         tiny(("levels:\n", "levels:\n  slow: {period: 16, rule: {name: sgd}}\n"),
              ("{id: mem, op: memory, in: n2, level: memory, memory: {type: mlp, expand: 2}}",
               "{id: mem, op: selfmod, in: n2, level: memory, init: slow}")),
         13, 57, "block.4.init", "nested init from 'slow' is implemented for memory and mlp nodes"),
    Case("zeros-init-on-selfmod",
         tiny(("{id: mem, op: memory, in: n2, level: memory, memory: {type: mlp, expand: 2}}",
               "{id: mem, op: selfmod, in: n2, level: memory, init: zeros}")),
         12, 57, "block.4.init", "a selfmod node cannot start from 'zeros'"),
]


@pytest.mark.parametrize("case", NESTED_CASES, ids=[c.id for c in NESTED_CASES])
def test_nested_init_errors(case: Case) -> None:
    with pytest.raises(SpecError) as info:
        build_graph(parse_spec(case.text, "bad.yaml"))
    first = info.value.issues[0]
    assert (first.line, first.col, ".".join(map(str, first.loc))) == (case.line, case.col, case.path)
    assert case.phrase in first.message
