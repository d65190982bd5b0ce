"""The nested Continuum Memory System (Nested Learning, Eq. 72), float64.

A memory ``F`` (period ``C_F``) whose ``init`` names a slower in-context level ``S`` (period
``C_S``, a multiple of ``C_F``) is re-initialised from ``S``'s state ``Φ`` at the start of every
chunk of ``S``; within it ``F`` learns by Eq. 71; at the chunk's end ``S`` steps ``Φ`` with the
meta-gradient of ``ℓ(Φ) = Σ_t L_F(θ^F_{a(t)}(Φ); k_t, v_t)`` (``F``'s inner losses over the chunk
at the states its gradients were taken at, as functions of its initial state).

The references below are the paper's recurrences written token by token: for a linear memory
the meta-gradient in closed form (``θ_{a} = Φ P_a + c_a``, ``∂ℓ/∂Φ = Σ_t 2 e_t k_tᵀ P_{a(t)}ᵀ``),
for the CMS MLP by plain ``torch.autograd`` on the unrolled recurrence.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import nestlearn
from nestlearn.graph import build_graph
from nestlearn.spec.errors import SpecError
from nestlearn.spec.loader import parse_spec

TOL = {"rtol": 1e-10, "atol": 1e-10}

LINEAR = """\
nestlearn: 1
name: nested-linear
model: {{vocab: 32, dim: 8, depth: 1, heads: 2}}
levels:
  outer: {{period: outer, rule: {{name: adamw}}}}
  fast:  {{period: {cf}, objective: l2, rule: {{name: sgd, lr: {{gate: token, max: 0.4}}}}}}
  slow:  {{period: {cs}, objective: l2, rule: {slow_rule}}}
block:
  - {{id: mem, op: memory, in: x, level: fast, memory: {{type: linear}}, init: slow}}
  - {{id: own, op: memory, in: x, level: slow, memory: {{type: linear}}}}
  - {{id: out, op: add, in: [x, mem, own]}}
"""
SGD = "{name: sgd, lr: {gate: token, max: 0.3}}"
MOMENTUM = "{name: momentum, lr: {gate: chunk, max: 0.3}, beta: 0.7}"

CMS = """\
nestlearn: 1
name: nested-cms
model: {{vocab: 32, dim: 6, depth: 1, heads: 1}}
levels:
  outer: {{period: outer, rule: {{name: adamw}}}}
  fast:  {{period: {cf}, objective: l2, rule: {{name: sgd, lr: {{gate: token, max: 0.3}}}}}}
  slow:  {{period: {cs}, objective: l2, rule: {{name: sgd, lr: {{gate: token, max: 0.2}}}}}}
block:
  - {{id: n1, op: rmsnorm, in: x}}
  - {{id: c1, op: mlp, in: n1, level: fast, expand: 2, init: slow}}
  - {{id: h1, op: add, in: [x, c1]}}
  - {{id: n2, op: rmsnorm, in: h1}}
  - {{id: c2, op: mlp, in: n2, level: slow, expand: 2}}
  - {{id: out, op: add, in: [h1, c2]}}
"""


def build(text: str, seed: int = 0):  # noqa: ANN201
    torch.manual_seed(seed)
    model = nestlearn.compile(parse_spec(text, "t.yaml"), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # gates and initial states vary, so every token's rates differ
        for name, p in model.named_parameters():
            if "gates" in name or name.endswith("init.W") or ".init." in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def rand(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gate(x: Tensor, lin: torch.nn.Linear, mx: float) -> Tensor:
    """``max σ(w·x_t + b)`` per token and head: ``[B, T, H]``."""
    return mx * torch.sigmoid(x @ lin.weight.T + lin.bias)


# ----------------------------------------------------------------------------- linear memory


def linear_reference(op, x: Tensor, cf: int, cs: int, beta: float | None) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    """Eq. 71-72 for a matrix memory ``M(k) = W k`` per head, token by token, with the
    meta-gradient of ``ℓ`` in closed form. Returns the op's output and the final ``Φ``."""
    b, t, d = x.shape
    h = op.heads
    dh = d // h

    def heads(z: Tensor) -> Tensor:
        return z.view(b, t, h, dh)

    q = F.normalize(heads(x @ op.proj["q"].weight.T), dim=-1)
    k = F.normalize(heads(x @ op.proj["k"].weight.T), dim=-1)
    v = heads(x @ op.proj["v"].weight.T)
    lr_f = gate(x, op.hypers.gates["lr"], 0.4)  # [B, T, H]
    slow_hp = op.nest.level.rule.hypers["lr"]
    lr_s = gate(x, op.nest.hypers.gates["lr"], slow_hp.max)
    eye = torch.eye(dh, dtype=x.dtype).expand(b, h, dh, dh)
    phi = op.init["W"].detach().unsqueeze(0).expand(b, h, dh, dh).clone()
    mom = torch.zeros_like(phi)
    ys = []
    for i in range(t):
        if i % cs == 0:  # a chunk of S begins: F starts from Φ; P tracks ∂θ_anchor/∂Φ (θ_a = Φ P + c)
            W, P, G = phi.clone(), eye.clone(), torch.zeros_like(phi)
            s_first = i
        if i % cf == 0:  # a chunk of F begins: its gradients are taken at the anchor
            anchor, A = W.clone(), eye.clone()
        e = torch.einsum("bhoi,bhi->bho", anchor, k[:, i]) - v[:, i]
        kk = k[:, i]
        G = G + 2 * torch.einsum("bho,bhi->bhoi", e, torch.einsum("bhij,bhj->bhi", P, kk))
        W = W - lr_f[:, i, :, None, None] * 2 * torch.einsum("bho,bhi->bhoi", e, kk)
        A = A - 2 * lr_f[:, i, :, None, None] * torch.einsum("bho,bhi->bhoi", kk, kk)
        ys.append(torch.einsum("bhoi,bhi->bho", W, q[:, i]))
        if (i + 1) % cf == 0:  # the next anchor is this one times A plus a constant
            P = P @ A
        if (i + 1) % cs == 0:  # S's step on ∇_Φ ℓ (rates read at the closing token; chunk gate: first)
            if beta is None:
                phi = phi - lr_s[:, i, :, None, None] * G
            else:
                mom = beta * mom - lr_s[:, s_first, :, None, None] * G
                phi = phi + mom
    y = torch.stack(ys, dim=1).reshape(b, t, d)
    return y @ op.out.weight.T, phi


@pytest.mark.parametrize("cf,cs", [(1, 3), (1, 1), (2, 6), (3, 6)])
@pytest.mark.parametrize("slow_rule", ["sgd", "momentum"])
@pytest.mark.parametrize("executor", ["auto", "sequential"])
def test_nested_linear_memory_equals_the_paper_recurrence(cf: int, cs: int, slow_rule: str, executor: str) -> None:
    rule = SGD if slow_rule == "sgd" else MOMENTUM
    model = build(LINEAR.format(cf=cf, cs=cs, slow_rule=rule))
    op = model.blocks[0].ops["mem"]
    op.level.executor = executor
    x = rand(2, 14, 8, seed=3)
    y, state = op([x], {}, None)
    ref_y, ref_phi = linear_reference(op, x, cf, cs, None if slow_rule == "sgd" else 0.7)
    torch.testing.assert_close(y, ref_y, **TOL)
    torch.testing.assert_close(state["nest"]["params"]["W"], ref_phi, **TOL)
    assert state["nest"]["offset"] == 14 % cs


# ----------------------------------------------------------------------------- the CMS MLP


def cms_reference(op, x: Tensor, cf: int, cs: int) -> tuple[Tensor, dict[str, Tensor]]:  # noqa: ANN001
    """A CMS level ``MLP(z) = W1 gelu(W0 z)`` learning ``||MLP(W_k x_t) - W_v x_t||²`` by SGD
    (Eq. 71, mini-batch: gradients at the chunk-start weights, token t read after its update),
    re-initialised from ``Φ`` every ``cs`` tokens; ``Φ`` steps by SGD on the gradient of the
    summed inner losses with respect to it, through the unrolled updates (Eq. 72)."""
    k, v = x @ op.proj["k"].weight.T, x @ op.proj["v"].weight.T
    lr_f = gate(x, op.hypers.gates["lr"], 0.3)[..., 0]
    lr_s = gate(x, op.nest.hypers.gates["lr"], 0.2)[..., 0]

    def mlp(p: dict[str, Tensor], z: Tensor) -> Tensor:
        return torch.einsum("boi,bi->bo", p["W1"], F.gelu(torch.einsum("boi,bi->bo", p["W0"], z)))

    def loss(p: dict[str, Tensor], i: int) -> Tensor:
        return (mlp(p, k[:, i]) - v[:, i]).pow(2).sum()  # summed over the batch: per-sequence grads

    phi = {n: p.detach()[0].unsqueeze(0).expand(x.shape[0], -1, -1).clone() for n, p in op.init.items()}
    ys = []
    for i in range(x.shape[1]):
        if i % cs == 0:
            phi = {n: p.detach().requires_grad_() for n, p in phi.items()}
            W, meta = dict(phi), x.new_zeros(())
        if i % cf == 0:
            anchor = dict(W)
        names = list(anchor)
        gs = torch.autograd.grad(loss(anchor, i), [anchor[n] for n in names], create_graph=True)
        W = {n: W[n] - lr_f[:, i, None, None] * g for n, g in zip(names, gs)}
        meta = meta + loss(anchor, i)
        ys.append(mlp(W, x[:, i]).detach())
        if (i + 1) % cs == 0:
            G = torch.autograd.grad(meta, [phi[n] for n in names])
            phi = {n: phi[n].detach() - lr_s[:, i, None, None] * g for n, g in zip(names, G)}
    return torch.stack(ys, dim=1), {n: p.detach() for n, p in phi.items()}


@pytest.mark.parametrize("cf,cs", [(1, 4), (2, 4), (3, 3)])
@pytest.mark.parametrize("executor", ["auto", "sequential"])
def test_nested_cms_mlp_equals_the_paper_recurrence(cf: int, cs: int, executor: str) -> None:
    model = build(CMS.format(cf=cf, cs=cs))
    op = model.blocks[0].ops["c1"]
    op.level.executor = executor
    x = rand(2, 13, 6, seed=5)
    with torch.no_grad():
        y, state = op([x], {}, None)
    ref_y, ref_phi = cms_reference(op, x, cf, cs)
    torch.testing.assert_close(y, ref_y, **TOL)
    for n, p in ref_phi.items():
        torch.testing.assert_close(state["nest"]["params"][n][:, 0], p, **TOL)  # one head


def test_nested_init_is_not_init_outer() -> None:
    """The defect this fixes: ``init: slow`` used to run as ``init: outer``. Both agree until the
    first chunk of ``slow`` ends; from then on the nested level restarts from the learned ``Φ``."""
    nested = build(CMS.format(cf=2, cs=4))
    plain = build(CMS.format(cf=2, cs=4).replace("init: slow", "init: outer"))
    plain.load_state_dict({k: v for k, v in nested.state_dict().items() if ".nest." not in k})
    x = rand(2, 12, 6, seed=8)
    with torch.no_grad():
        a, _ = nested.blocks[0].ops["c1"]([x], {}, None)
        b, _ = plain.blocks[0].ops["c1"]([x], {}, None)
    torch.testing.assert_close(a[:, :4], b[:, :4], **TOL)
    assert (a[:, 4:] - b[:, 4:]).abs().amax(dim=(0, 2)).min() > 1e-4


# ----------------------------------------------------------------------------- carried state


@pytest.mark.parametrize("cuts", [(5,), (1, 2, 9), (4, 8), (3, 7, 11, 12)])
@pytest.mark.parametrize("grad", [False, True])
def test_fed_in_pieces_equals_one_call(cuts: tuple[int, ...], grad: bool) -> None:
    model = build(CMS.format(cf=2, cs=4))
    tokens = torch.randint(0, 32, (2, 13), generator=torch.Generator().manual_seed(9))
    with torch.set_grad_enabled(grad):
        whole, st = model(tokens)
        parts, state = [], None
        for a, b in zip((0, *cuts), (*cuts, 13)):
            y, state = model(tokens[:, a:b], state)
            parts.append(y)
    torch.testing.assert_close(torch.cat(parts, 1), whole, **TOL)
    nest_a, nest_b = st["0"]["c1"]["nest"], state["0"]["c1"]["nest"]
    assert nest_a["offset"] == nest_b["offset"] == 1
    for n in nest_a["params"]:
        torch.testing.assert_close(nest_b["params"][n], nest_a["params"][n], **TOL)
        torch.testing.assert_close(nest_b["grad"][n], nest_a["grad"][n], **TOL)


@pytest.mark.parametrize("grad", [False, True])
def test_a_detached_state_carried_in_mid_chunk_continues(grad: bool) -> None:
    """The trainer carries states detached (``--carry-state``); cut in the middle of a chunk of
    ``S`` such a ``Φ`` re-enters the graph as a leaf, and until that chunk ends the outputs are
    those of one call (its meta-gradient then takes the carried anchor as a constant)."""
    model = build(CMS.format(cf=2, cs=4))
    tokens = torch.randint(0, 32, (2, 13), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        whole, _ = model(tokens)
    _, state = model(tokens[:, :5])  # with gradients, as a training step: Φ is in the graph
    state = torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, state)
    assert state["0"]["c1"]["nest"]["offset"] == 1
    with torch.set_grad_enabled(grad):
        rest, _ = model(tokens[:, 5:], state)
    torch.testing.assert_close(rest[:, :3].detach(), whole[:, 5:8], **TOL)  # tokens 5-7: S's chunk 4-7
    assert torch.isfinite(rest).all()


# ----------------------------------------------------------------------------- outer gradients


def test_outer_gradient_reaches_the_slow_initial_state_through_the_nested_init() -> None:
    """Finite differences of an outer loss against autograd for ``Φ_0`` (the slow level's initial
    parameters), the slow level's rate gate and the fast level's projection: three chunks of the
    slow level, so the loss sees ``Φ_0`` through two meta-steps (third-order terms included)."""
    model = build(CMS.format(cf=2, cs=4), seed=2)
    x = rand(2, 12, 6, seed=10)
    r = rand(2, 12, 6, seed=11)
    op = model.blocks[0].ops["c1"]

    def outer() -> Tensor:
        y, _ = op([x], {}, None)
        return (y * r).sum()

    params = {"init.W0": op.init["W0"], "init.W1": op.init["W1"],
              "slow gate": op.nest.hypers.gates["lr"].weight, "W_k": op.proj["k"].weight}
    grads = torch.autograd.grad(outer(), list(params.values()))
    eps = 1e-6
    for (name, p), g in zip(params.items(), grads):
        assert g.abs().max() > 1e-6, name
        flat, gflat = p.data.view(-1), g.reshape(-1)
        for j in (0, p.numel() // 2, p.numel() - 1):
            flat[j] += eps
            up = outer().item()
            flat[j] -= 2 * eps
            down = outer().item()
            flat[j] += eps
            fd = (up - down) / (2 * eps)
            assert math.isclose(fd, gflat[j].item(), rel_tol=1e-6, abs_tol=1e-9), (name, j, fd, gflat[j])


def test_the_meta_step_is_what_carries_phi0_past_the_first_chunk() -> None:
    """With the slow level at ``grad: stop`` the outer loss no longer sees ``Φ`` (a constant)."""
    model = build(CMS.format(cf=2, cs=4).replace("rule: {name: sgd, lr: {gate: token, max: 0.2}}}",
                                                 "rule: {name: sgd, lr: {gate: token, max: 0.2}}, grad: stop}"))
    op = model.blocks[0].ops["c1"]
    y, _ = op([rand(2, 12, 6, seed=12)], {}, None)
    y.sum().backward()
    assert op.init["W0"].grad is None and op.proj["k"].weight.grad is not None


# ----------------------------------------------------------------------------- the graph


BAD = """\
nestlearn: 1
name: bad
model: {vocab: 32, dim: 8, depth: 1, heads: 2}
levels:
  outer: {period: outer, rule: {name: adamw}}
  fast:  {period: 4, rule: {name: sgd}}
  slow:  {period: 16, rule: {name: sgd}}
block:
  - {id: c1, op: mlp, in: x, level: fast, init: slow}
  - {id: c2, op: mlp, in: c1, level: slow}
"""


def message(text: str) -> str:
    with pytest.raises(SpecError) as info:
        build_graph(parse_spec(text, "bad.yaml"))
    return str(info.value)


def test_graph_accepts_the_nested_init_and_draws_its_edges() -> None:
    g = build_graph(parse_spec(BAD, "ok.yaml"))
    inits = {(u, v, tuple(d["via"])) for u, v, d in g.edges("init")}
    assert inits == {("slow", "fast", ("c1",)), ("outer", "slow", ("c2",))}
    assert ("fast", "slow") in {(u, v) for u, v, _ in g.edges("grad")}


@pytest.mark.parametrize("edit,expected", [
    (("rule: {name: sgd}}\nblock", "rule: {name: dgd}}\nblock"),
     "bad.yaml:9:49: block.0.init: nested init: 'slow' meta-learns this node's initial state with one step "
     "of its rule per chunk, but its rule 'dgd' needs a memory's per-token layer inputs, which that step "
     "does not have; give it another rule (e.g. sgd, momentum, adam)"),
    (("period: 16", "period: 10"),
     "bad.yaml:9:49: block.0.init: nested init: the period of 'slow' (10) must be a multiple of the period "
     "of 'fast' (4)"),
    (("period: 16", "period: 2"),
     "bad.yaml:9:49: block.0.init: init edge from a faster level: 'slow' (period 2) is faster than this "
     "node's level 'fast' (period 4); the initial state must come from a slower level"),
    (("init: slow}", "init: fast}"),
     "bad.yaml:9:49: block.0.init: level 'fast' cannot initialise itself: name a slower level (e.g. 'outer') "
     "or 'zeros'"),
    (("{id: c2, op: mlp, in: c1, level: slow}", "{id: c2, op: mlp, in: c1, init: slow}"),
     "bad.yaml:10:37: block.1.init: init edge from a faster level: 'slow' (period 16) cannot initialise the "
     "outer level 'outer'"),
    (("{id: c1, op: mlp, in: x, level: fast, init: slow}",
      "{id: c1, op: selfmod, in: x, level: fast, init: slow}"),
     "bad.yaml:9:53: block.0.init: nested init from 'slow' is implemented for memory and mlp nodes; a "
     "selfmod node's memories start from the outer level (init: outer) or 'zeros'"),
])
def test_graph_rejects_the_bad_nested_inits(edit: tuple[str, str], expected: str) -> None:
    old, new = edit
    assert BAD.count(old) == 1
    assert message(BAD.replace(old, new)) == expected
