"""Every shipped spec (specs/*.yaml, models/*.yaml) validates, compiles, runs and is documented.

At a tiny size (dim 16, depth 2, every in-context period shrunk so that 32 tokens span several
chunks, attention windows shrunk to 8) each spec compiles through ``nestlearn.compile`` (the
level graph is checked first) and through ``nestlearn compile`` on the command line, runs a
forward and a backward pass on CPU in which every trainable parameter receives a finite
gradient, and gives the same logits in one call as in two pieces with the carried state.
At the shipped size (built on the meta device, no memory) the parameter count printed in its
``docs/specs/<name>.md`` page is the model's ``num_parameters()``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import nestlearn
from nestlearn.compile import compile_spec

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "specs").glob("*.yaml")) + sorted((ROOT / "models").glob("*.yaml"))
IDS = [p.stem for p in SHIPPED]
T = 32


def tiny_overrides(path: Path) -> list[str]:
    doc = yaml.safe_load(path.read_text())
    ov = ["model.dim=16", "model.depth=2", "model.heads=2"]
    periods = sorted({lv["period"] for lv in doc["levels"].values() if isinstance(lv["period"], int) and lv["period"] > 1})
    small = {p: 4 * 2**i for i, p in enumerate(periods)}  # keeps the order of the levels' periods
    for name, lv in doc["levels"].items():
        if lv["period"] in small:
            ov.append(f"levels.{name}.period={small[lv['period']]}")
    for node in doc["block"]:
        if node.get("heads") is not None:
            ov.append(f"block.{node['id']}.heads=2")
        if node.get("window") is not None:
            ov.append(f"block.{node['id']}.window=8")
    return ov


def build_tiny(path: Path, dtype: torch.dtype = torch.float64):  # noqa: ANN201
    spec = nestlearn.load_spec(path, overrides=tiny_overrides(path))
    torch.manual_seed(0)
    return nestlearn.compile(spec, dtype=dtype)  # checks the level graph, then builds


def test_every_spec_directory_is_covered() -> None:
    assert len(SHIPPED) >= 17 and (ROOT / "models" / "hope.yaml") in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=IDS)
def test_validates_and_names_match_files(path: Path) -> None:
    spec = nestlearn.load_spec(path)
    assert spec.name == path.stem
    assert spec.description


@pytest.mark.parametrize("path", SHIPPED, ids=IDS)
def test_forward_backward_at_tiny_size(path: Path) -> None:
    model = build_tiny(path)
    tokens = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(0))
    logits, state = model(tokens)
    assert logits.shape == (2, T, 256) and torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters the outer loss does not reach: {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


@pytest.mark.parametrize("path", SHIPPED, ids=IDS)
def test_one_call_equals_two_pieces(path: Path) -> None:
    model = build_tiny(path)
    tokens = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole, _ = model(tokens)
        first, state = model(tokens[:, :13])
        second, _ = model(tokens[:, 13:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path", SHIPPED, ids=IDS)
def test_cli_compiles_it(path: Path) -> None:
    from nestlearn.cli import app

    result = CliRunner().invoke(app, ["compile", str(path), *tiny_overrides(path)])
    assert result.exit_code == 0, result.output
    assert path.stem in result.output


@pytest.mark.parametrize("path", SHIPPED, ids=IDS)
def test_documented_with_its_parameter_count(path: Path) -> None:
    page = ROOT / "docs" / "specs" / f"{path.stem}.md"
    assert page.exists(), f"missing {page.relative_to(ROOT)}"
    with torch.device("meta"):
        n = compile_spec(nestlearn.load_spec(path)).num_parameters()
    assert f"{n:,}" in page.read_text(), f"{page.name} does not state the parameter count {n:,}"


def test_hope_cms_sequential_is_models_hope() -> None:
    a = yaml.safe_load((ROOT / "models" / "hope.yaml").read_text())
    b = yaml.safe_load((ROOT / "specs" / "hope-cms-sequential.yaml").read_text())
    for doc in (a, b):
        doc.pop("name"), doc.pop("description")
    assert a == b


def test_hope_variants_share_levels_and_the_self_modifying_memory() -> None:
    hope = nestlearn.load_spec(ROOT / "models" / "hope.yaml")
    for name in ("hope-cms-independent", "hope-attention", "hope-delta"):
        other = nestlearn.load_spec(ROOT / "specs" / f"{name}.yaml")
        for level in ("cms_fast", "cms_mid", "cms_slow"):
            assert other.levels[level] == hope.levels[level]
    ind = nestlearn.load_spec(ROOT / "specs" / "hope-cms-independent.yaml")
    assert ind.levels == hope.levels
    assert [n for n in ind.block if n.id == "sm"] == [n for n in hope.block if n.id == "sm"]


def test_hope_delta_is_models_hope_with_a_per_token_delta_rule_main_memory() -> None:
    """specs/hope-delta.yaml is models/hope.yaml with exactly these overrides (the form the
    recall-delta / niah-delta runs recorded in bench/results/ were made with)."""
    ov = ["block.1.memory={type: linear}", "levels.selfmod.clip=null", "levels.selfmod.period=1",
          "levels.selfmod.rule={name: sgd, lr: {gate: token, max: 1.0}, decay: {gate: token, max: 0.1, bias: -6.0}}",
          "block.1.gen_lr_max=0.002"]
    a = nestlearn.load_spec(ROOT / "models" / "hope.yaml", overrides=ov).model_dump()
    b = nestlearn.load_spec(ROOT / "specs" / "hope-delta.yaml").model_dump()
    for doc in (a, b):
        doc.pop("name"), doc.pop("description")
    assert a == b
