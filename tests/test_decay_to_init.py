"""``decay_to: init``: forgetting toward the level's initial state, ``W <- W_0 + (1 - decay)(W - W_0) + S``.

Every executor equals a plain float64 loop written here with torch.autograd (outputs, final
weights and the outer gradients to the keys and to the initial state W_0, which enters both as
the start and as the point forgetting returns to). The spec and graph accept it only on
sgd / momentum in-context levels."""

from __future__ import annotations

import zlib

import pytest
import torch
from torch import Tensor

import nestlearn
from nestlearn import objectives, rules
from nestlearn.loops import GradMode, MemoryProblem, init_state, run
from nestlearn.memories import LinearMemory, MLPMemory
from nestlearn.memories.ttt import TTTMemory
from nestlearn.spec import SpecError
from tests import reference as ref

B, H, T, D = 2, 2, 9, 3
DT = torch.float64


def plain_loop(mem: str, init: dict[str, Tensor], q: Tensor, k: Tensor, v: Tensor,
               hp: dict[str, Tensor], period: int, momentum: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """All sequences and heads, token by token, differentiable end to end (``grad: unroll``):
    the chunk's inner gradients are taken at its start state with ``create_graph``."""
    f = ref.linear_mem if mem == "linear" else ref.mlp_mem
    ys = torch.zeros(B, H, T, D, dtype=DT)
    finals: dict[str, list[Tensor]] = {n: [] for n in init}
    for b in range(B):
        for h in range(H):
            home = {n: p[h] for n, p in init.items()}
            W = dict(home)
            S = {n: torch.zeros_like(w) for n, w in W.items()}
            anchor = W
            out = []
            for t in range(T):
                if t % period == 0:
                    anchor = W
                loss = ref.l2(f(anchor, k[b, h, t]), v[b, h, t])
                names = list(anchor)
                grads = dict(zip(names, torch.autograd.grad(loss, [anchor[n] for n in names], create_graph=True)))
                lr, decay = hp["lr"][b, h, t], hp["decay"][b, h, t]
                beta = hp["beta"][b, h, t] if momentum else 0.0
                S = {n: beta * S[n] - lr * grads[n] for n in W}
                W = {n: home[n] + (1 - decay) * (W[n] - home[n]) + S[n] for n in W}
                out.append(f(W, q[b, h, t]))
            ys[b, h] = torch.stack(out)
            for n in W:
                finals[n].append(W[n])
    return ys, {n: torch.stack(ws).reshape(B, H, *ws[0].shape) for n, ws in finals.items()}


@pytest.mark.parametrize("mem", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["sgd", "momentum"])
@pytest.mark.parametrize("period", [1, 4])
def test_executors_match_the_plain_loop(mem: str, rule: str, period: int) -> None:
    g = torch.Generator().manual_seed(zlib.crc32(f"home/{mem}/{rule}/{period}".encode()))
    arch = LinearMemory(D, D, H, init_std=0.5) if mem == "linear" else MLPMemory(D, D, H, expand=2)
    init = {n: (torch.randn(p.shape, generator=g, dtype=DT) * 0.5).requires_grad_() for n, p in arch.init_params().items()}
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=DT) for _ in range(3))
    hp = {"lr": torch.rand(B, H, T, generator=g, dtype=DT) * 0.2,
          "decay": torch.rand(B, H, T, generator=g, dtype=DT) * 0.5}  # large: forgetting shows
    if rule == "momentum":
        hp["beta"] = torch.rand(B, H, T, generator=g, dtype=DT) * 0.9
    r = rules.momentum(0.0, 0.0, 0.0, decay_to="init") if rule == "momentum" else rules.sgd(0.0, 0.0, decay_to="init")
    kk = k.clone().requires_grad_()
    y_ref, w_ref = plain_loop(mem, init, q, kk, v, hp, period, rule == "momentum")
    want = torch.autograd.grad(y_ref.pow(2).sum(), [kk, *init.values()])
    for executor in ("sequential", "auto", "scan"):
        kk = k.clone().requires_grad_()
        pb = MemoryProblem(arch, r, objectives.l2, q, kk, v, hp, period, GradMode())
        y, st = run(pb, init_state(arch, r, init, B), executor)  # type: ignore[arg-type]
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10, msg=f"{executor} outputs")
        for n in w_ref:
            torch.testing.assert_close(st["params"][n], w_ref[n], rtol=1e-9, atol=1e-10, msg=f"{executor} {n}")
        got = torch.autograd.grad(y.pow(2).sum(), [kk, *init.values()])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"{executor} outer gradients")


def test_forgetting_toward_init_differs_from_forgetting_toward_zero() -> None:
    """The option changes the recurrence (the test above would pass vacuously otherwise)."""
    g = torch.Generator().manual_seed(5)
    arch = MLPMemory(D, D, H, expand=2)
    init = {n: torch.randn(p.shape, generator=g, dtype=DT) for n, p in arch.init_params().items()}
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=DT) for _ in range(3))
    hp = {"lr": 0.05, "decay": 0.3}
    ys = {}
    for to in ("zero", "init"):
        r = rules.sgd(0.0, 0.0, decay_to=to)
        ys[to], st = run(MemoryProblem(arch, r, objectives.l2, q, k, v, hp, 4, GradMode()), init_state(arch, r, init, B))
    assert (ys["zero"] - ys["init"]).abs().max() > 0.1


def test_ttt_memory_with_biases_closed_form_equals_sequential() -> None:
    """The closed form's bias path (TTT memories carry biases) against the rule stepped token by token."""
    g = torch.Generator().manual_seed(11)
    arch = TTTMemory(D, D, H, core="mlp", expand=2, bias=True).double()
    init = {n: (torch.randn(p.shape, generator=g, dtype=DT) * 0.5).requires_grad_() for n, p in arch.init_params(DT).items()}
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=DT) for _ in range(3))
    hp = {"lr": torch.rand(B, H, T, generator=g, dtype=DT) * 0.2, "beta": torch.rand(B, H, T, generator=g, dtype=DT),
          "decay": torch.rand(B, H, T, generator=g, dtype=DT) * 0.5}
    r = rules.momentum(0.0, 0.0, 0.0, decay_to="init")
    outs = {}
    for executor in ("sequential", "auto"):
        kk = k.clone().requires_grad_()
        y, st = run(MemoryProblem(arch, r, objectives.l2, q, kk, v, hp, 4, GradMode()), init_state(arch, r, init, B),
                    executor)  # type: ignore[arg-type]
        outs[executor] = (y, st["params"], torch.autograd.grad(y.pow(2).sum(), [kk, *init.values()]))
    (y_s, p_s, g_s), (y_a, p_a, g_a) = outs["sequential"], outs["auto"]
    torch.testing.assert_close(y_a, y_s, rtol=1e-9, atol=1e-10)
    for n in p_s:
        torch.testing.assert_close(p_a[n], p_s[n], rtol=1e-9, atol=1e-10)
    for a, b in zip(g_a, g_s):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_delta_executors_decline_it() -> None:
    """The period-1 delta-rule paths (loops/delta.py, fla) compute forgetting toward zero only."""
    from nestlearn.loops import delta

    arch = LinearMemory(D, D, H)
    q = k = v = torch.zeros(B, H, T, D)
    assert delta.supports(MemoryProblem(arch, rules.sgd(0.1, 0.1), objectives.l2, q, k, v, {}, 1, GradMode()))
    assert not delta.supports(MemoryProblem(arch, rules.sgd(0.1, 0.1, decay_to="init"), objectives.l2, q, k, v, {}, 1,
                                            GradMode()))


def test_spec_option() -> None:
    spec = nestlearn.load_spec("specs/titans-lmm.yaml", overrides=["levels.memory.rule.decay_to=init", "model.dim=32",
                                                                   "model.depth=1"])
    model = nestlearn.compile(spec)
    assert model.levels["memory"].rule.decay_to == "init"
    assert "decay_to=init" in model.level_summary()[1]["rule"]
    with pytest.raises(SpecError, match="decay_to"):
        nestlearn.load_spec("specs/titans-lmm.yaml", overrides=["levels.memory.rule.decay_to=home"])
    with pytest.raises(SpecError, match="decay_to applies to in-context levels only"):
        nestlearn.compile(nestlearn.load_spec("specs/titans-lmm.yaml", overrides=[
            "levels.outer.rule={name: sgd, lr: 0.1, decay_to: init}"]))


def test_spec_identity_unchanged_for_specs_that_do_not_use_it() -> None:
    """Runs, checkpoints and suite results made before the option existed still match their specs:
    ``decay_to: zero`` (the earlier behaviour) is left out of the spec's identity, ``init`` is not."""
    from nestlearn.train.checkpoint import spec_data, spec_hash

    zero = nestlearn.load_spec("specs/titans-lmm.yaml", overrides=["levels.memory.rule.decay_to=zero"])
    init = nestlearn.load_spec("specs/titans-lmm.yaml")
    assert "decay_to" not in spec_data(zero)["levels"]["memory"]["rule"]
    assert spec_data(init)["levels"]["memory"]["rule"]["decay_to"] == "init"
    assert spec_hash(zero) != spec_hash(init)
