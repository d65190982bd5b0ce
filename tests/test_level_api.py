"""The Python API of a level: swapping its rule (by object, name or YAML-like spec) rebuilds its
gates and says what it dropped; names and specs are checked like the YAML, with its messages."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import nestlearn
from nestlearn.compile.model import CompiledModel

TINY = Path(__file__).parent / "data" / "tiny_run.yaml"


def model(*overrides: str) -> CompiledModel:
    torch.manual_seed(0)
    return nestlearn.compile(nestlearn.load_spec(TINY, ["model.depth=2", *overrides]))


def gate_params(m: CompiledModel) -> set[str]:
    return {n for n, _ in m.named_parameters() if ".hypers." in n}


def untrained(m: CompiledModel) -> set[str]:
    m.zero_grad(set_to_none=True)
    y, _ = m(torch.randint(0, 256, (2, 20)))
    (y * torch.randn_like(y)).sum().backward()
    return {n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}


def test_swap_drops_the_old_rules_gates_and_says_so() -> None:
    m = model("levels.memory.rule.decay={gate: chunk, max: 0.1}")
    assert any(".gates.decay." in n for n in gate_params(m))
    kept = m.blocks[0].ops["mem"].hypers.gates["lr"]
    with pytest.warns(UserWarning, match=r"level 'memory'.*removed.*blocks\.\*\.ops\.mem\.hypers\.gates\.decay"):
        m.levels["memory"].rule = nestlearn.rules.sgd(lr=nestlearn.spec.schema.Gate(gate="token", max=0.02))
    assert gate_params(m) == {f"blocks.{i}.ops.mem.hypers.gates.lr.{w}" for i in range(2) for w in ("weight", "bias")}
    assert m.blocks[0].ops["mem"].hypers.gates["lr"] is kept  # a gate the new rule still has stays trained
    assert untrained(m) == set()  # no parameter is left behind without a gradient


def test_swap_to_a_torchopt_rule_drops_every_gate() -> None:
    import torchopt

    m = model()
    with pytest.warns(UserWarning, match="gates.lr"):
        m.levels["memory"].rule = torchopt.sgd(0.05)
    assert gate_params(m) == set() and untrained(m) == set()


def test_swap_to_a_dict_spec_adds_fresh_gates_and_learned_values() -> None:
    m = model()
    with pytest.warns(UserWarning, match=r"added fresh.*learned\.beta"):
        m.levels["memory"].rule = {"name": "momentum", "lr": {"gate": "token", "max": 0.05}, "beta": {"learned": 0.5},
                                   "decay": {"gate": "token", "max": 0.01}}
    names = gate_params(m)
    assert {"blocks.0.ops.mem.hypers.learned.beta", "blocks.1.ops.mem.hypers.gates.decay.weight"} <= names
    assert m.levels["memory"].spec.rule.name == "momentum"
    assert untrained(m) == set()


def test_swap_by_name_without_gate_changes_is_silent() -> None:
    m = model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.levels["memory"].rule = {"name": "dgd", "lr": {"gate": "token", "max": 0.02}}
    assert m.levels["memory"].rule.describe().startswith("dgd(")
    m(torch.randint(0, 256, (3, 12)))


@pytest.mark.parametrize(("value", "message"), [
    ("adamm", "<python>: levels.memory.rule.name: unknown rule 'adamm' (did you mean 'adam'?)"),
    ({"name": "sgd", "lrr": 0.1}, "levels.memory.rule.lrr: unknown field 'lrr' (did you mean 'lr'?)"),
    ({"name": "sgd", "lr": {"gate": "tok", "max": 0.1}},
     "levels.memory.rule.lr.gate: expected 'token' or 'chunk', got 'tok' (did you mean 'token'?)"),
    (42, "levels.memory.rule: expected a mapping, got 42"),
])
def test_bad_rules_from_python_say_what_yaml_says(value: object, message: str) -> None:
    m = model()
    before = m.levels["memory"].rule
    params = set(dict(m.named_parameters()))
    with pytest.raises(nestlearn.SpecError) as err:
        m.levels["memory"].rule = value
    assert message in str(err.value)
    assert m.levels["memory"].rule is before and set(dict(m.named_parameters())) == params


def test_outer_level_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="outer level's rule"):
        model().levels["outer"].rule = "sgd"


# ----------------------------------------------------------------------------- inspection


def test_params_and_init_read_the_state_and_the_outer_parameters() -> None:
    m = model()
    lv = m.levels["memory"]
    assert lv.nodes() == ["0.mem", "1.mem"]
    _, state = m(torch.randint(0, 256, (3, 20)))
    fast = lv.params(state)
    assert set(fast) == {"0.mem", "1.mem"}
    for key in fast:
        block, node = key.split(".")
        assert fast[key] is state[block][node]["mem"]["params"]
        assert all(t.shape[:2] == (3, 2) for t in fast[key].values())
        init = lv.init[key]
        assert set(init) == set(fast[key])
        assert all(init[n] is p for n, p in m.blocks[int(block)].ops[node].init.items())
    # the fast weights moved away from the initial memory
    assert (fast["0.mem"]["W0"][0] - lv.init["0.mem"]["W0"]).abs().max() > 0


def test_selfmod_and_nested_levels() -> None:
    m = nestlearn.compile(nestlearn.load_spec(Path(__file__).parents[1] / "specs" / "hope-cms-nested.yaml",
                                              ["model.dim=16", "model.depth=1", "model.heads=2"]))
    _, state = m(torch.randint(0, 256, (2, 20)))
    sm = m.levels["selfmod"]
    assert set(sm.params(state)) == set(sm.init) == {"0.sm", "0.sm.generators"}
    mid = m.levels["cms_mid"]  # its own node, and the initial state of cms_fast's it meta-learns
    assert set(mid.params(state)) == {"0.c1", "0.c2"}
    assert mid.params(state)["0.c1"] is state["0"]["c1"]["nest"]["params"]


def test_params_of_a_foreign_state_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="the state has no entry for node 'mem' of block 0"):
        model().levels["memory"].params({})
