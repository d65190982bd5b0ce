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
