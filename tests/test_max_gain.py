"""A level's ``max_gain`` as users meet it: the spec gives it to every problem of the level with
the chunk's accumulated step ``S(C, beta)`` from the level's period and momentum, a rule that
cannot take it is refused on a swap as in the YAML, and the spec-time stability warnings
leave a capped level alone. The arithmetic itself is tested against the plain reference in
``tests/test_executors.py::test_max_gain_matches_reference`` and, on the CMS kernel, in
``tests/test_triton_cms_rev.py``."""

from __future__ import annotations

import pytest
import torch

import nestlearn
from nestlearn import rules, stability
from nestlearn.loops import MemoryProblem
from nestlearn.memories import LinearMemory
from nestlearn.spec.errors import SpecError

TINY = "tests/data/tiny.yaml"  # memory: period 8, momentum with beta 0.9, clip 1.0


def _problem_of(overrides: list[str]) -> MemoryProblem:
    model = nestlearn.compile(nestlearn.load_spec(TINY, overrides=overrides))
    level = model.levels["memory"]
    x = torch.zeros(1, 2, 8, 16)
    arch = LinearMemory(16, 16, 2)
    return level.problem(arch, x, x, x, {"lr": 0.1}, 8)


def test_a_level_hands_its_cap_and_chunk_step_to_its_problems() -> None:
    pb = _problem_of(["levels.memory.max_gain=0.5"])
    assert pb.max_gain == 0.5 and pb.clip == 1.0
    assert pb.gain_steps == pytest.approx(stability.accumulated_step(8, 0.9))
    assert pb.gain_steps == pytest.approx(sum((1 - 0.9**t) / 0.1 for t in range(1, 9)))
    gated = _problem_of(["levels.memory.max_gain=0.5", "levels.memory.rule.beta={gate: token, max: 0.5}"])
    assert gated.gain_steps == pytest.approx(stability.accumulated_step(8, 0.5))  # a gate at its maximum
    plain = _problem_of(["levels.memory.rule={name: sgd, lr: 0.1}", "levels.memory.max_gain=0.5"])
    assert plain.gain_steps == 8.0
    assert _problem_of([]).max_gain is None


def test_a_swap_to_a_rule_that_does_not_sum_gradients_is_refused() -> None:
    model = nestlearn.compile(nestlearn.load_spec(TINY, overrides=["levels.memory.max_gain=0.5"]))
    level = model.levels["memory"]
    with pytest.raises(SpecError, match=r"levels\.memory\.max_gain: 'max_gain' bounds a step that sums gradients"):
        level.rule = "adam"
    with pytest.raises(ValueError, match="rule 'adam' does not"):
        level.rule = rules.adam(0.01)
    with pytest.warns(UserWarning, match="swapping"):  # the momentum gate leaves: said, as for any swap
        level.rule = rules.sgd(0.05)  # sums gradients: taken
    assert level.rule.name == "sgd"


def test_the_option_enters_a_spec_s_identity_only_when_set() -> None:
    """Runs, checkpoints and suite results made before ``max_gain`` existed keep matching their
    specs (``checkpoint.LEVEL_OPTIONS_ADDED``); a spec that sets it is another spec."""
    from nestlearn.train.checkpoint import spec_data, spec_hash

    plain, capped = nestlearn.load_spec(TINY), nestlearn.load_spec(TINY, overrides=["levels.memory.max_gain=1"])
    assert all("max_gain" not in lv for lv in spec_data(plain)["levels"].values())
    assert spec_data(capped)["levels"]["memory"]["max_gain"] == 1.0
    assert spec_hash(plain) != spec_hash(capped)


def test_a_capped_level_gets_no_stability_warning() -> None:
    """The spec-time bound (``stability.warnings_for``) flags an uncapped level past gain 1 and
    an unnormalised CMS node, and suggests ``max_gain``; with it neither is flagged."""
    fast = ["levels.memory.clip=null", "levels.memory.rule.lr.max=2.0"]
    (issue,) = stability.warnings_for(nestlearn.load_spec(TINY, overrides=fast))
    assert "'max_gain' (e.g. 0.5)" in issue[1]
    assert stability.warnings_for(nestlearn.load_spec(TINY, overrides=[*fast, "levels.memory.max_gain=0.5"])) == []
    open_cms = ["block.c2.kv_norm=false"]
    assert stability.warnings_for(nestlearn.load_spec("models/hope.yaml", overrides=open_cms))
    capped = [*open_cms, "levels.cms_mid.max_gain=0.5"]
    assert stability.warnings_for(nestlearn.load_spec("models/hope.yaml", overrides=capped)) == []
