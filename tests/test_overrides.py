"""``path.to.key=value`` overrides, from the API and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nestlearn.graph import build_graph
from nestlearn.spec import apply_overrides, load_spec, locate, parse_spec
from nestlearn.spec.errors import SpecError
from nestlearn.spec.schema import AdamRule, Gate, MomentumRule

DATA = Path(__file__).parent / "data"
TINY = (DATA / "tiny.yaml").read_text()


def test_scalars_by_path() -> None:
    spec = parse_spec(TINY, "t.yaml", ["model.dim=64", "levels.memory.rule.lr=0.01", "levels.memory.period=16"])
    assert spec.model.dim == 64
    assert isinstance(spec.levels["memory"].rule, MomentumRule)
    assert spec.levels["memory"].rule.lr == 0.01
    assert spec.levels["memory"].period == 16
    assert build_graph(spec).node_dims["out"] == 64


def test_whole_mapping_replaces_the_value() -> None:
    spec = parse_spec(TINY, "t.yaml", ["levels.memory.rule={name: adam, lr: 0.001}"])
    rule = spec.levels["memory"].rule
    assert isinstance(rule, AdamRule) and rule.lr == 0.001 and rule.b1 == 0.9  # nothing merged from momentum


def test_nested_value_inside_a_hyper_parameter() -> None:
    spec = parse_spec(TINY, "t.yaml", ["levels.memory.rule.lr.max=0.5"])
    lr = spec.levels["memory"].rule.lr  # type: ignore[union-attr]
    assert isinstance(lr, Gate) and lr.max == 0.5 and lr.gate == "token"


def test_block_node_by_id_and_by_index() -> None:
    spec = parse_spec(TINY, "t.yaml", ["block.att.window=128", "block.4.memory.expand=3"])
    assert spec.block[1].window == 128  # type: ignore[union-attr]
    assert spec.block[4].memory.expand == 3  # type: ignore[union-attr]


def test_list_values_and_the_in_alias() -> None:
    spec = parse_spec(TINY, "t.yaml", ["block.out.in=[r1, att]"])
    assert spec.block[5].input_ids() == ["r1", "att"]
    spec = parse_spec(TINY, "t.yaml", ["block.out.inputs=[x, mem]"])  # the field's Python name works too
    assert spec.block[5].input_ids() == ["x", "mem"]


def test_strings_booleans_and_null() -> None:
    spec = parse_spec(TINY, "t.yaml", ["name=my run", "block.mem.qk_norm=false", "output=", "description=a=b"])
    assert spec.name == "my run"
    assert spec.block[4].qk_norm is False  # type: ignore[union-attr]
    assert spec.output is None
    assert spec.description == "a=b"  # only the first '=' separates the path


def test_later_overrides_win() -> None:
    spec = parse_spec(TINY, "t.yaml", ["model.dim=64", "model.dim=128"])
    assert spec.model.dim == 128


def test_missing_section_with_defaults_is_created() -> None:
    text = "\n".join(line for line in TINY.splitlines() if not line.startswith("model:")) + "\n"
    spec = parse_spec(text, "t.yaml", ["model.dim=48", "model.heads=3"])
    assert (spec.model.dim, spec.model.heads, spec.model.vocab) == (48, 3, 256)


def test_new_level_under_levels() -> None:
    spec = parse_spec(TINY, "t.yaml", ["levels.slow={period: 64, rule: {name: sgd}}", "block.mem.init=slow"])
    graph = build_graph(spec)
    assert graph.level_order == ["memory", "slow", "outer"]
    assert ("slow", "memory") in {(u, v) for u, v, _ in graph.edges("init")}


def test_positions_of_overridden_values() -> None:
    spec = parse_spec(TINY, "t.yaml", ["model.dim=64", "levels.memory.rule={name: adam, lr: 0.001}"])
    assert locate(spec, ("model", "dim")) == ("<override>", 1, 11)
    assert locate(spec, ("levels", "memory", "rule", "lr")) == ("<override>", 2, 37)
    assert locate(spec, ("model", "heads")) == ("t.yaml", 3, 47)  # untouched values keep their place


def test_validation_error_inside_an_override_value() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(TINY, "t.yaml", ["model.dim=64", "levels.memory.rule={name: adam, lr: 0.001, beta: 2}"])
    (issue,) = info.value.issues
    assert issue.format() == (
        "<override>:2:44: levels.memory.rule.beta: unknown field 'beta' "
        "(allowed: b1, b2, eps, eps_root, lr, name, weight_decay) "
        "(from override 'levels.memory.rule={name: adam, lr: 0.001, beta: 2}')"
    )


def test_graph_error_caused_by_an_override_points_at_it() -> None:
    spec = parse_spec(TINY, "t.yaml", ["block.n2.in=r9"])
    with pytest.raises(SpecError) as info:
        build_graph(spec)
    (issue,) = info.value.issues
    assert (issue.file, issue.line, issue.col) == ("<override>", 1, 13)
    assert "unknown input 'r9'" in issue.message and "block.n2.in=r9" in issue.message


def test_all_bad_overrides_are_reported() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(TINY, "t.yaml", ["model.dimm=1", "nothing", "levels.memory.rule.beta.x=1"])
    assert [(i.line, i.col) for i in info.value.issues] == [(1, 7), (2, 1), (3, 25)]
    assert all(i.file == "<override>" for i in info.value.issues)
    assert "did you mean 'dim'?" in info.value.issues[0].message


def test_duplicate_key_inside_an_override_value() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(TINY, "t.yaml", ["levels.memory.rule={name: adam, name: sgd}"])
    (issue,) = info.value.issues
    assert (issue.file, issue.line, issue.col) == ("<override>", 1, 33)
    assert "duplicate key 'name'" in issue.message


def test_apply_overrides_on_a_plain_document() -> None:
    doc = yaml.safe_load(TINY)
    apply_overrides(doc, ["model.depth=6", "block.att.window=32"])
    assert doc["model"]["depth"] == 6 and doc["block"][1]["window"] == 32
    with pytest.raises(SpecError):
        apply_overrides(doc, ["block.nope.window=1"])


def test_load_spec_with_overrides_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(TINY)
    spec = load_spec(path, ["model.dim=16", "model.heads=4"])
    assert spec.model.dim == 16
    assert path.read_text() == TINY
