"""A level's ``remat:`` (loops/remat.py): same outputs and gradients, fewer saved tensors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nestlearn import objectives, rules
from nestlearn.loops import GradMode, MemoryProblem, init_state, run
from nestlearn.memories import LinearMemory, MLPMemory

B, H, T, D = 2, 2, 45, 4
DT = torch.float64


def _problem(mem: str, rule: str, obj: str, period: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    arch = LinearMemory(D, D, H, init_std=0.5) if mem == "linear" else MLPMemory(D, D, H, expand=2)
    init = {n: (torch.randn(p.shape, generator=g, dtype=DT) * 0.5).requires_grad_()
            for n, p in arch.init_params().items()}
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=DT, requires_grad=True) for _ in range(3))
    lr = (torch.rand(B, H, T, generator=g, dtype=DT) * 0.02).requires_grad_()  # stable over T tokens
    r = {"momentum": rules.momentum(0.0, 0.5, 0.0), "dgd": rules.dgd(0.0, 0.0, 0.0),
         "sgd": rules.sgd(0.0, 0.0)}[rule]
    hp = {"lr": lr, "beta": 0.5} if rule == "dgd" else {"lr": lr}
    pb = MemoryProblem(arch, r, objectives.BUILTIN[obj], q, k, v, hp, period, GradMode())
    return pb, init, [q, k, v, lr, *init.values()]


def _saved_bytes(fn) -> int:  # noqa: ANN001
    """Bytes of tensors autograd keeps for the backward while ``fn`` runs (outside checkpoints)."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize(("mem", "rule", "obj", "period"), [
    ("mlp", "momentum", "l2", 4), ("mlp", "dgd", "l2", 3), ("linear", "sgd", "dot", 5),
    ("mlp", "sgd", "l2", 1), ("linear", "sgd", "l2", 1),
])
@pytest.mark.parametrize("executor", ["auto", "sequential"])
def test_same_outputs_state_and_gradients(mem: str, rule: str, obj: str, period: int, executor: str) -> None:
    pb, init, leaves = _problem(mem, rule, obj, period)
    wy = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(9), dtype=DT)

    def go(p: MemoryProblem):  # noqa: ANN202
        y, st = run(p, init_state(p.arch, p.rule, init, B), executor)  # type: ignore[arg-type]
        loss = (y * wy).sum() + sum(x.square().sum() for x in st["params"].values())
        return y, st, torch.autograd.grad(loss, leaves)

    y0, st0, g0 = go(pb)
    y1, st1, g1 = go(replace(pb, remat=2, chunk=4))
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    for n in st0["params"]:
        torch.testing.assert_close(st1["params"][n], st0["params"][n], rtol=1e-12, atol=1e-12)
    assert st1["offset"] == st0["offset"] and st1["chunks"] == st0["chunks"]
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_carried_offset_and_pieces() -> None:
    """A piece starting mid-chunk (carried offset) is still exact under remat."""
    pb, init, _ = _problem("mlp", "momentum", "l2", 4, seed=1)
    y_full, _ = run(pb, init_state(pb.arch, pb.rule, init, B))
    st, ys = init_state(pb.arch, pb.rule, init, B), []
    for t0, t1 in [(0, 7), (7, 45)]:
        sl = slice(t0, t1)
        part = replace(pb, q=pb.q[:, :, sl], k=pb.k[:, :, sl], v=pb.v[:, :, sl],
                       hp={"lr": pb.hp["lr"][..., sl]}, remat=2)  # type: ignore[index]
        y, st = run(part, st)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 2), y_full, rtol=1e-12, atol=1e-12)


def test_saved_tensors_shrink() -> None:
    pb, init, _ = _problem("mlp", "momentum", "l2", 3, seed=2)

    def fwd(p: MemoryProblem):  # noqa: ANN202
        return lambda: run(p, init_state(p.arch, p.rule, init, B))

    full = _saved_bytes(fwd(pb))
    grouped = _saved_bytes(fwd(replace(pb, remat=3)))
    assert grouped < full / 4, (grouped, full)


def test_no_recompute_without_grad() -> None:
    """Under no_grad (evaluation) nothing is checkpointed: same values, no checkpoint call."""
    pb, init, _ = _problem("mlp", "momentum", "l2", 4)
    with torch.no_grad():
        y0, _ = run(pb, init_state(pb.arch, pb.rule, init, B))
        y1, _ = run(replace(pb, remat=1), init_state(pb.arch, pb.rule, init, B))
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)


def _assert_same(a: torch.nn.Module, b: torch.nn.Module, ya: torch.Tensor, yb: torch.Tensor) -> None:
    """Two models' outputs and every parameter gradient of a loss on them agree (float64)."""
    torch.testing.assert_close(yb, ya, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(ya.square().mean(), list(a.parameters()), allow_unused=True)
    gb = torch.autograd.grad(yb.square().mean(), list(b.parameters()), allow_unused=True)
    for u, w in zip(ga, gb, strict=True):
        if u is not None:
            torch.testing.assert_close(w, u, rtol=1e-10, atol=1e-12)


def test_spec_level_remat_compiles_and_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``remat:`` on a level reaches the executor; the outer level refuses it with its path."""
    import nestlearn
    from nestlearn.spec.errors import SpecError

    spec = Path(__file__).resolve().parents[1] / "specs" / "titans-mag.yaml"
    over = ["model.dim=32", "model.depth=1", "model.heads=2"]
    torch.manual_seed(0)
    a = nestlearn.compile(spec, over).double()
    torch.manual_seed(0)
    level = next(n for n, lv in a.spec.levels.items() if not lv.is_outer)
    b = nestlearn.compile(spec, [*over, f"levels.{level}.remat=2"]).double()
    x = torch.randint(0, 256, (2, 150))
    from nestlearn.loops import remat

    calls: list[int] = []
    real = remat.run_grouped
    monkeypatch.setattr(remat, "run_grouped", lambda *args: calls.append(1) or real(*args))
    ya = a(x)[0]
    assert not calls
    yb = b(x)[0]
    assert calls, "the level's remat did not reach the executor"
    _assert_same(a, b, ya, yb)
    outer = next(n for n, lv in a.spec.levels.items() if lv.is_outer)
    with pytest.raises(SpecError, match=rf"levels\.{outer}\.remat: 'remat' applies to in-context levels only"):
        nestlearn.compile(spec, [*over, f"levels.{outer}.remat=2"])
    adam = Path(__file__).resolve().parents[1] / "specs" / "adam-memory.yaml"
    mem = next(n for n, lv in nestlearn.compile(adam, over).spec.levels.items() if not lv.is_outer)
    with pytest.raises(SpecError, match="not available for rule 'adam'"):
        nestlearn.compile(adam, [*over, f"levels.{mem}.remat=2"])


def test_rule_swapped_to_one_without_closed_form_warns_and_runs() -> None:
    """A rule swapped in from Python (no spec check) that takes the torch.func executor: one
    warning, no recomputation, same result."""
    pb, init, _ = _problem("mlp", "momentum", "l2", 4)
    adam = replace(pb, rule=rules.adam(0.01), hp={}, remat=2)
    y0, _ = run(replace(adam, remat=None), init_state(pb.arch, adam.rule, init, B))
    with pytest.warns(UserWarning, match="remat is not applied"):
        y1, _ = run(adam, init_state(pb.arch, adam.rule, init, B))
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)


def test_hope_selfmod_remat_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """HOPE's self-modifying memory (DGD closed form) under ``levels.selfmod.remat``."""
    import nestlearn
    from nestlearn.loops import remat

    hope = Path(__file__).resolve().parents[1] / "models" / "hope.yaml"
    over = ["model.dim=32", "model.depth=1", "model.heads=2"]
    torch.manual_seed(0)
    a = nestlearn.compile(hope, over).double()
    torch.manual_seed(0)
    b = nestlearn.compile(hope, [*over, "levels.selfmod.remat=2"]).double()
    calls: list[int] = []
    real = remat.run_grouped
    monkeypatch.setattr(remat, "run_grouped", lambda *args: calls.append(1) or real(*args))
    x = torch.randint(0, 256, (1, 100))
    ya, yb = a(x)[0], b(x)[0]
    assert calls
    _assert_same(a, b, ya, yb)


def test_sequential_executor_does_not_recompute_in_the_forward() -> None:
    """Its per-token autograd.grad unpacks what it saved at once: those tensors stay outside
    the checkpoint, so the forward runs each group once (the backward once more)."""
    pb, init, leaves = _problem("mlp", "sgd", "l2", 4)
    calls = [0]
    apply = pb.arch.apply

    def counting(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        calls[0] += 1
        return apply(*a, **kw)

    pb.arch.apply = counting  # type: ignore[method-assign]
    run(pb, init_state(pb.arch, pb.rule, init, B), "sequential")
    plain = calls[0]
    calls[0] = 0
    y, _ = run(replace(pb, remat=2), init_state(pb.arch, pb.rule, init, B), "sequential")
    assert calls[0] == plain
    torch.autograd.grad(y.sum(), leaves)
    assert calls[0] == 2 * plain
