"""No forward keeps memory alive after it returns (training-health issue: Titans-MAG and
Titans-MAC ran out of GPU memory at their evaluations).

Every no-grad forward of a Titans or TTT spec used to leave its inner-gradient graphs behind:
``_signals`` asked ``autograd.grad`` for a graph (``create_graph``) by the level's gradient mode
alone, also under ``no_grad``, and the saved tensors ``keep_saved`` stores as themselves (an
op's output saved by its own node, such as the TTT layer norm's rsqrt) close reference cycles
through autograd that Python's gc cannot collect. On the GPU that was 1.9 GB per evaluation
batch of Titans-MAG at 8 x 2,048 (``python -m bench.memory_growth``). A forward with grad
dropped without a backward leaked its whole graph the same way (``keep_saved`` now installs its
hook only inside a checkpoint). Here: every shipped spec at a small size, a no-grad forward, a
forward with grad that is dropped, and a training step, then the same again: the tensors alive
afterwards must be the same.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nestlearn

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted([*ROOT.glob("specs/*.yaml"), *ROOT.glob("models/*.yaml")])


def live_elements() -> int:
    gc.collect()
    # type(), not isinstance: the latter reads __class__, which deprecated torch objects warn about
    return sum(o.numel() for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def test_every_shipped_spec_is_covered() -> None:
    names = {p.stem for p in SPECS}
    assert {"titans-mag", "titans-mac", "titans-mal", "titans-lmm", "ttt-mlp", "hope"} <= names


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_forwards_leave_nothing_alive(path: Path) -> None:
    torch.manual_seed(0)
    spec = nestlearn.load_spec(path, profile=None, overrides=["model.dim=32", "model.depth=2", "model.heads=2"])
    model = nestlearn.compile(spec)
    x = torch.randint(0, 256, (2, 97))

    def evaluate_and_train() -> None:
        with torch.no_grad():  # evaluation, per-level stats, generation
            model(x[:, :-1])
        model(x[:, :-1])  # a forward with grad, dropped without a backward (a notebook's look)
        out = model(x[:, :-1])[0]
        F.cross_entropy(out.flatten(0, 1), x[:, 1:].flatten()).backward()

    evaluate_and_train()  # lazily built caches (masks, rope tables) come into being here
    before = live_elements()
    evaluate_and_train()
    evaluate_and_train()
    assert live_elements() == before


def test_keep_saved_hooks_only_inside_a_checkpoint() -> None:
    """Outside other saved-tensor hooks ``keep_saved`` installs nothing; inside a (remat)
    checkpoint it overrides the checkpoint's hooks."""
    from torch.utils.checkpoint import checkpoint

    from nestlearn.loops.chunks import keep_saved

    top = torch._C._autograd._top_saved_tensors_default_hooks
    with keep_saved():
        assert top(False) is None
    seen: list[bool] = []

    def body(x: torch.Tensor) -> torch.Tensor:
        before = top(False)
        with keep_saved():
            seen.append(top(False) is not None and top(False) != before)
        return x.sin()

    checkpoint(body, torch.ones(2, requires_grad=True), use_reentrant=False)
    assert seen == [True]
