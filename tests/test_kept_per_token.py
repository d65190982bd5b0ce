"""``nestlearn compile``'s ``kept/token``: the fast state each in-context level's backward keeps
per token of a sequence. Checked against plain arithmetic at HOPE's shipped size (where the
fast CMS level's 1 MB per token is what ran an H100 out of memory at 65,536 tokens) and, as a
lower bound, against the bytes autograd actually saves."""

from __future__ import annotations

from pathlib import Path

import torch

import nestlearn

HOPE = Path(__file__).resolve().parent.parent / "models" / "hope.yaml"


def _kept(*overrides: str, path: Path = HOPE) -> dict[str, float | None]:
    model = nestlearn.compile(nestlearn.load_spec(path, list(overrides), profile="none"))
    return {r["name"]: r["kept_per_token"] for r in model.level_summary()}


def test_hope_at_its_shipped_size() -> None:
    kept = _kept()
    blocks, heads, dh, dim = 4, 8, 64, 512
    # cms_fast: W0 [1024, 512] and W1 [512, 1024] per block, plain SGD, every 16 tokens
    assert kept["cms_fast"] == blocks * 2 * dim * 2 * dim * 4 / 16 == 2**20
    assert kept["cms_mid"] == kept["cms_fast"] / 16 and kept["cms_slow"] == kept["cms_fast"] / 128
    # selfmod: the main MLP memory (2 x 64 x 64 per head) with DGD's momentum every 16 tokens,
    # the generators (2 x 64 + 2 rows of 64 per head) with theirs every 64
    main = blocks * heads * 2 * dh * dh * 2 * 4 / 16
    gen = blocks * heads * (2 * dh + 2) * dh * 2 * 4 / 64
    assert kept["selfmod"] == main + gen
    assert kept["outer"] is None


def test_remat_divides_it_and_period_one_has_none() -> None:
    assert _kept("levels.cms_fast.remat=8")["cms_fast"] == 2**20 / 8
    assert _kept(path=HOPE.parent.parent / "specs" / "deltanet.yaml")["memory"] is None


def _saved_bytes(model: torch.nn.Module, tokens: int) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, 256, (1, tokens)))
    return sum(storages.values())


def test_a_lower_bound_on_what_autograd_saves() -> None:
    """Per extra token, autograd saves at least the figure, and `remat` on the fast CMS level
    saves at least the predicted difference less (HOPE, one block at dim 64)."""
    small = ("model.dim=64", "model.depth=1", "model.heads=2")
    grown, kept = {}, {}
    for extra in ((), ("levels.cms_fast.remat=4",)):
        torch.manual_seed(0)
        spec = nestlearn.load_spec(HOPE, [*small, *extra], profile="none")
        model = nestlearn.compile(spec)
        kept[extra] = sum(r["kept_per_token"] or 0 for r in model.level_summary())
        grown[extra] = (_saved_bytes(model, 512) - _saved_bytes(model, 256)) / 256
        assert grown[extra] >= kept[extra], (extra, grown[extra], kept[extra])
    remat = ("levels.cms_fast.remat=4",)
    assert grown[()] - grown[remat] >= kept[()] - kept[remat] > 0


def test_a_nested_init_counts_for_the_slow_level_that_learns_it() -> None:
    """hope-cms-nested: each slow CMS level also learns the faster one's initial state (Φ,
    Eq. 72), kept once per slow chunk: cms_mid keeps its own weights and cms_fast's Φ every 256."""
    kept = _kept(path=HOPE.parent.parent / "specs" / "hope-cms-nested.yaml")
    own = 4 * 2 * 512 * 1024 * 4 / 256  # cms_mid's weights, 4 blocks
    assert kept["cms_fast"] == 2**20 and kept["cms_mid"] == own + own  # Φ has cms_fast's size
