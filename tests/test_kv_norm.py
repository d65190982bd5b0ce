"""``kv_norm`` on a CMS level (an ``mlp`` node of an in-context level): its keys ``W_k x`` and
values ``W_v x`` are divided by their RMS before the level's inner objective sees them.

Why it exists (docs/training-health.md §5): the outer level learns ``W_k`` and ``W_v``, and the
chunk step of a CMS level grows with ``|k|^2`` (its curvature) and ``|v|`` (its error). At 8 x 2,048
bytes on an H100 the shipped HOPE's CMS inner losses grew fivefold in 250 outer steps (227 -> 1,199
for ``cms_fast``) and the fast level's inner update went non-finite at step 488. The exactness of
the option against a plain float64 loop is in ``tests/test_reductions.py``
(``test_hope_cms_levels_equal_the_mini_batch_recurrence[...-True]``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

import nestlearn
from nestlearn.compile import compile_spec
from nestlearn.spec import SpecError

DT = torch.float64


def cms_output(kv_norm: bool, scale: float, tokens: int, dim: int = 64) -> Tensor:
    """HOPE's fast CMS level (period 16, the shipped rate gate held at its maximum 3e-5) over
    ``tokens`` RMS-normalised inputs, with the outer projections ``W_k``, ``W_v`` grown by ``scale``
    (what outer training did to them)."""
    spec = nestlearn.load_spec("models/hope.yaml", overrides=[
        f"model.dim={dim}", "model.depth=1", "model.heads=4", f"block.c1.kv_norm={kv_norm}"])
    torch.manual_seed(0)
    op = compile_spec(spec, dtype=DT).blocks[0].ops["c1"]
    with torch.no_grad():
        op.proj["k"].weight.mul_(scale)
        op.proj["v"].weight.mul_(scale)
        op.hypers.gates["lr"].bias.fill_(10.0)
        x = torch.nn.functional.rms_norm(
            torch.randn(2, tokens, dim, dtype=DT, generator=torch.Generator().manual_seed(1)), (dim,))
        y, _ = op([x], {}, None)
    return y


def test_the_shipped_cms_levels_normalise_keys_and_values() -> None:
    spec = nestlearn.load_spec("models/hope.yaml")
    assert {n.id: n.kv_norm for n in spec.block if n.op == "mlp"} == {"c1": True, "c2": True, "c3": True}


def test_grown_projections_overshoot_at_2048_tokens_and_kv_norm_removes_the_cause() -> None:
    """The failure mechanism at small size: projections grown 18x push the fast level's chunk
    step past its bound, and over 2,048 tokens its memory goes non-finite; 128 tokens (the CPU
    profile's length) hide it (16x stays finite at either length). With ``kv_norm`` the level's
    output does not depend on the projections' scale at all."""
    assert not torch.isfinite(cms_output(False, 18.0, 2048)).all()
    assert torch.isfinite(cms_output(False, 18.0, 128)).all()
    base = cms_output(True, 1.0, 2048)
    assert torch.isfinite(base).all()
    torch.testing.assert_close(cms_output(True, 18.0, 2048), base, rtol=1e-10, atol=1e-10)
    assert (cms_output(False, 4.0, 2048) - cms_output(False, 1.0, 2048)).abs().max() > 1e-3


def test_outer_level_mlp_refuses_kv_norm(tmp_path) -> None:  # noqa: ANN001
    text = (
        "nestlearn: 1\nname: bad\nmodel: {vocab: 256, dim: 16, depth: 1, heads: 2}\n"
        "levels:\n  outer: {period: outer, rule: {name: adamw, lr: 1.0e-3}}\n"
        "block:\n  - {id: f, op: mlp, in: x, kv_norm: true}\n"
    )
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=r"bad\.yaml:7:\d+: block\.0\.kv_norm: kv_norm applies to an mlp node of an "
                                        r"in-context level"):
        nestlearn.compile(nestlearn.load_spec(path))


def test_spec_identity_unchanged_without_it() -> None:
    """``kv_norm: false`` (the earlier behaviour) is left out of a spec's identity, so runs and
    suite results made before the option still match; ``true`` is part of it."""
    from nestlearn.train.checkpoint import spec_data, spec_hash

    off = nestlearn.load_spec("models/hope.yaml", overrides=[f"block.{c}.kv_norm=false" for c in ("c1", "c2", "c3")])
    on = nestlearn.load_spec("models/hope.yaml")
    assert all("kv_norm" not in n for n in spec_data(off)["block"])
    assert spec_data(on)["block"][4]["kv_norm"] is True
    assert spec_hash(off) != spec_hash(on)


@pytest.mark.parametrize("path", ["specs/transformer.yaml", "specs/titans-mal.yaml", "specs/deltanet.yaml"])
def test_specs_without_the_option_keep_their_hash(path: str) -> None:
    """Specs that never set ``kv_norm`` hash as before the option existed: the field is dropped
    at its default before hashing (compared with the hash of the plain data minus that field)."""
    import hashlib
    import json

    from nestlearn.train.checkpoint import spec_hash

    spec = nestlearn.load_spec(path)
    data = spec.model_dump(mode="json", by_alias=True)
    for node in data["block"]:
        node.pop("kv_norm", None)
    if not data.get("profiles"):
        data.pop("profiles", None)
    for level in data["levels"].values():
        if level.get("max_gain", 0) is None:  # a level option of the sixteenth session, dropped alike
            level.pop("max_gain")
        if isinstance(level.get("rule"), dict) and level["rule"].get("decay_to") == "zero":
            level["rule"].pop("decay_to")
    plain = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert spec_hash(spec) == plain


def test_validate_warns_for_an_unnormalised_cms_level() -> None:
    """``nestlearn validate`` (and run / compile) warn, positioned at the node, for a CMS node
    whose keys and values are neither normalised nor clipped; the shipped specs get no warning."""
    from nestlearn import stability

    off = nestlearn.load_spec("models/hope.yaml", overrides=["block.c2.kv_norm=false"])
    (issue,) = stability.spec_warnings(off)
    line = 1 + next(i for i, t in enumerate(Path("models/hope.yaml").read_text().splitlines()) if "{id: c2," in t)
    assert issue.format().startswith(f"models/hope.yaml:{line}:") and "block.7.level: this CMS level's keys" in issue.format()
    assert "'cms_mid'" in issue.format()
    clipped = nestlearn.load_spec("models/hope.yaml", overrides=["block.c2.kv_norm=false", "levels.cms_mid.clip=1.0"])
    assert stability.warnings_for(clipped) == []
    for path in ("models/hope.yaml", "specs/hope-attention.yaml", "specs/hope-cms-nested.yaml",
                 "specs/hope-cms-independent.yaml", "specs/hope-cms-sequential.yaml"):
        assert stability.warnings_for(nestlearn.load_spec(path)) == [], path
