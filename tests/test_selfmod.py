"""HOPE's self-modifying memory == a plain token-by-token implementation of the paper's
self-modifying Titans equations (Eq. 83-90 as specified in nestlearn/compile/selfmod.py),
at period 1 and with chunk-wise generation (period C), for linear and MLP main memories."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from nestlearn.compile import compile_spec
from nestlearn.spec.schema import Spec
from tests import reference as ref

DT = torch.float64
SPEC = """
nestlearn: 1
name: selfmod-test
model: {{vocab: 16, dim: 8, depth: 1, heads: 2}}
levels:
  outer: {{period: outer, rule: {{name: adamw}}}}
  fast: {{period: {period}, objective: l2,
         rule: {{name: dgd, lr: {{gate: token, max: 0.4}}, decay: {{gate: token, max: 0.2}}, beta: 0.6}}}}
block:
  - {{id: sm, op: selfmod, in: x, level: fast, memory: {{type: {mem}, expand: 2}}, conv: 3}}
"""


def causal_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [T, D], w [D, 1, W]: y_t = sum_j w[:, j] x_{t-W+1+j} + b (zeros before the start)."""
    T, D = x.shape
    W = w.shape[-1]
    pad = torch.cat([torch.zeros(W - 1, D, dtype=x.dtype), x])
    return torch.stack([(pad[t : t + W] * w[:, 0].T).sum(0) + b for t in range(T)])


def plain_selfmod(x: torch.Tensor, p: dict, heads: int, period: int, mem: str, gen_period: int | None = None,
                  gen_lr_max: float = 0.4, rule: str = "dgd", lr_max: float = 0.4, decay_max: float = 0.2) -> torch.Tensor:
    """``rule``: ``dgd`` (momentum 0.6, the projection term) or ``sgd`` (plain gradient step with
    forgetting toward zero: at period 1 on a linear memory, the gated delta rule)."""
    gen_period = gen_period or period
    T, D = x.shape
    dh = D // heads
    xc = causal_conv(x, p["conv_x.weight"], p["conv_x.bias"])
    qc = causal_conv(x @ p["q.weight"].T, p["conv_q.weight"], p["conv_q.bias"])
    main_f = ref.linear_mem if mem == "linear" else ref.mlp_mem
    fns = {"k": ref.linear_mem, "v": ref.linear_mem, "lr": ref.linear_mem, "decay": ref.linear_mem, "main": main_f}
    outs = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        M = {s: {n.split("__", 1)[1]: t[h].clone() for n, t in p.items() if n.startswith(f"init.{s}__")} for s in fns}
        mom = {s: {n: torch.zeros_like(w) for n, w in M[s].items()} for s in fns}
        ys = []
        A = M
        for t in range(T):
            if t % gen_period == 0:  # the generators' chunk start
                A = {**A, **{s: {n: w.clone() for n, w in M[s].items()} for s in fns if s != "main"}}
            if t % period == 0:  # the main memory's chunk start
                A = {**A, "main": {n: w.clone() for n, w in M["main"].items()}}
            xt, qt = xc[t, sl], F.normalize(qc[t, sl], dim=0)
            k = F.normalize(fns["k"](A["k"], xt), dim=0)
            v = fns["v"](A["v"], xt)
            gate = torch.sigmoid(fns["lr"](A["lr"], xt)[0] + p["gen_bias.lr"][h])
            dec = decay_max * torch.sigmoid(fns["decay"](A["decay"], xt)[0] + p["gen_bias.decay"][h])
            vu = F.normalize(v, dim=0)
            for s, f in fns.items():
                lr = (lr_max if s == "main" else gen_lr_max) * gate  # the rule's lr max; the generators' own
                target = v if s == "main" else f(A[s], vu)
                a = {n: w.clone().requires_grad_() for n, w in A[s].items()}
                loss = ((f(a, k) - target.detach()) ** 2).sum()
                g = dict(zip(a, torch.autograd.grad(loss, list(a.values()))))
                if rule == "sgd":
                    M[s] = {n: (1 - dec) * w - lr * g[n] for n, w in M[s].items()}
                    continue
                ins = {"W": k} if f is ref.linear_mem else ref.layer_inputs("mlp", A[s], k)
                for n in M[s]:
                    mom[s][n] = 0.6 * mom[s][n] + g[n]
                    u = ins[n] / ins[n].norm()
                    eye = torch.eye(u.shape[0], dtype=DT)
                    M[s][n] = M[s][n] @ ((1 - dec) * eye - lr * torch.outer(u, u)) - lr * mom[s][n]
            ys.append(main_f(M["main"], qt))
        outs.append(torch.stack(ys))
    return torch.cat(outs, dim=-1) @ p["out.weight"].T


def run_selfmod(period: int, mem: str, **node: object) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The compiled op on a random input (float64; conv and gate biases moved off their init):
    ``(x, y, parameters)``. ``node``: extra options of the selfmod node."""
    raw = yaml.safe_load(SPEC.format(period=period, mem=mem))
    raw["block"][0].update(node)
    model = compile_spec(Spec.model_validate(raw), dtype=DT)
    op = model.blocks[0].ops["sm"]
    with torch.no_grad():
        for n, w in op.named_parameters():
            if "conv" in n or "gen_bias" in n:
                w.add_(torch.randn_like(w) * 0.3)
    x = torch.randn(2, 10, 8, dtype=DT)
    y, _ = op([x], {}, None)
    return x, y.detach(), {n: w.detach() for n, w in op.named_parameters()}


@pytest.mark.parametrize(("period", "gen_period"), [(1, None), (3, None), (2, 4), (4, 3)])
@pytest.mark.parametrize("mem", ["linear", "mlp"])
def test_selfmod_matches_plain_equations(period: int, gen_period: int | None, mem: str) -> None:
    torch.manual_seed(0)
    x, y, p = run_selfmod(period, mem, **({"gen_period": gen_period} if gen_period else {}))
    for b in range(2):
        expected = plain_selfmod(x[b], p, 2, period, mem, gen_period)
        torch.testing.assert_close(y[b], expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mem", ["linear", "mlp"])
def test_generators_own_rate_matches_plain_equations(mem: str) -> None:
    """``gen_lr_max``: the generators learn at their own maximum of the shared generated gate,
    the main memory at the rule's; float64 against the plain recurrence with the two rates."""
    torch.manual_seed(1)
    x, y, p = run_selfmod(2, mem, gen_period=4, gen_lr_max=0.05)
    for b in range(2):
        torch.testing.assert_close(y[b], plain_selfmod(x[b], p, 2, 2, mem, 4, gen_lr_max=0.05), rtol=1e-9, atol=1e-10)
    # and it matters: the shared rate (the paper's default) gives another output
    assert not torch.allclose(y[0], plain_selfmod(x[0], p, 2, 2, mem, 4), atol=1e-6)


def test_hope_delta_main_memory_is_the_per_token_delta_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """specs/hope-delta.yaml's selfmod op (a tiny size, float64): generators chunk-wise sgd at their
    own rate, the linear main memory the exact per-token gated delta rule
    ``M_t = (1 - d_t) M_{t-1} - 2 lr_t (M_{t-1} k_t - v_t) k_t^T``, read after the update; and it
    runs on the chunk-parallel ``delta`` executor, not a per-token loop."""
    import importlib
    from pathlib import Path

    import nestlearn
    from nestlearn.loops import executors

    spec = nestlearn.load_spec(Path(__file__).resolve().parents[1] / "specs" / "hope-delta.yaml", overrides=[
        "model.dim=8", "model.heads=2", "model.depth=1", "block.1.gen_period=4", "block.1.gen_lr_max=0.05"])
    torch.manual_seed(2)
    op = compile_spec(spec, dtype=DT).blocks[0].ops["sm"]
    with torch.no_grad():
        for n, w in op.named_parameters():
            if "conv" in n or "gen_bias" in n:
                w.add_(torch.randn_like(w) * 0.3)
            if n == "gen_bias.decay":
                w.fill_(-1.0)  # forgetting large enough to matter in 10 tokens
    p = {n: w.detach() for n, w in op.named_parameters()}
    picked: list[str] = []
    selfmod = importlib.import_module("nestlearn.compile.selfmod")
    real_run = selfmod.run

    def spy(pb, state, executor="auto"):  # noqa: ANN001, ANN202
        picked.append(executors.pick(pb, executor).name)
        return real_run(pb, state, executor)

    monkeypatch.setattr(selfmod, "run", spy)
    x = torch.randn(2, 10, 8, dtype=DT)
    y, _ = op([x], {}, None)
    assert picked[-1] == "delta"
    for b in range(2):
        expected = plain_selfmod(x[b], p, 2, 1, "linear", 4, gen_lr_max=0.05, rule="sgd", lr_max=1.0, decay_max=0.1)
        torch.testing.assert_close(y[b], expected, rtol=1e-9, atol=1e-10)


def test_a_forward_draws_nothing_from_the_global_generator() -> None:
    """HOPE's first forward once asked the DGD closed form whether it applies by building the
    generators' random initial weights, which advanced torch's global generator (a run's later
    draws then depended on whether a forward had happened). Every forward leaves it as it was."""
    import nestlearn

    spec = nestlearn.load_spec("models/hope.yaml", overrides=["model.dim=32", "model.depth=1"], profile=None)
    model = nestlearn.compile(spec)
    x = torch.randint(0, 256, (1, 80))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    model(x)
    assert torch.equal(before, torch.get_rng_state())
