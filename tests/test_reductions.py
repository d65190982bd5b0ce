"""Every shipped reduction equals an independent plain-PyTorch reference (DESIGN §4, guarantees 4-5).

Each reference below is written from the paper's equations with plain tensors, token by
token, with ``torch.autograd`` for inner gradients; no nestlearn code path computes a
reference value. The nestlearn side is the *shipped spec* (specs/*.yaml, models/hope.yaml)
compiled at a tiny size in float64, with its parameters randomised (gates and initial states
included, so nothing is trivially constant), and either the whole model or one op extracted
from it (``model.blocks[0].ops[node_id]``), called as ``op([x], sources, state)``.

Shapes: reference tensors are ``[B, H, T, d]`` per head, hyper-parameters ``[B, H, T]``.
The objective ``l2`` is ``||M(k) - v||^2``, not halved: one SGD step with rate ``lr`` is a
delta-rule step with ``beta = 2 lr``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import nestlearn
from nestlearn.compile import compile_spec
from tests import reference as ref

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]
TOL = {"rtol": 1e-10, "atol": 1e-10}


# ----------------------------------------------------------------------------- helpers


NO_CLIP = ("levels.memory.clip=null",)
"""The paper's recurrence has no clip on the inner gradient; the shipped specs' ``clip`` is
checked against its own reference in tests/test_executors.py."""


def build(spec_path: str, *overrides: str, seed: int = 0):  # noqa: ANN201
    spec = nestlearn.load_spec(ROOT / spec_path, overrides=list(overrides))
    torch.manual_seed(seed)
    model = compile_spec(spec, dtype=DT)
    randomize(model, seed)
    return model


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values for every parameter: norms near 1, matrices ~ 1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:  # e.g. a memory whose spec says ``init: zeros``
                continue
            if p.dim() == 1 and ("weight" in name.split(".")[-1] or "ln_weight" in name):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=DT))
            elif p.dim() == 1:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) / math.sqrt(p.shape[-1]))


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def split_heads(x: Tensor, h: int) -> Tensor:
    """``[B, T, D] -> [B, H, T, D/H]``."""
    b, t, d = x.shape
    return x.reshape(b, t, h, d // h).permute(0, 2, 1, 3)


def merge_heads(y: Tensor) -> Tensor:
    b, h, t, dh = y.shape
    return y.permute(0, 2, 1, 3).reshape(b, t, h * dh)


def unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def gate(x: Tensor, lin: torch.nn.Linear, max_: float) -> Tensor:
    """``max * sigmoid(W x + b)`` per head: ``[B, T, D] -> [B, H, T]``."""
    return (max_ * torch.sigmoid(x @ lin.weight.T + lin.bias)).permute(0, 2, 1)


def chunk_start_values(g: Tensor, period: int) -> Tensor:
    """A per-chunk gate: every token takes the value at its chunk's first token."""
    t = torch.arange(g.shape[-1])
    return g[..., t - t % period]


def causal_conv(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Depth-wise causal convolution: ``y_t = sum_j w[:, j] * x_{t - (W-1) + j} + b`` (zero history)."""
    width = w.shape[-1]
    xp = torch.cat([x.new_zeros(x.shape[0], width - 1, x.shape[2]), x], dim=1)
    t = x.shape[1]
    return sum(w[:, 0, j] * xp[:, j : j + t] for j in range(width)) + b


def rms(x: Tensor, w: Tensor, eps: float = 1e-6) -> Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def inner_grad(fn, params: dict[str, Tensor], k: Tensor, v: Tensor) -> dict[str, Tensor]:  # noqa: ANN001
    """Gradient of ``sum ||fn(params, k) - v||^2`` (batched over [B, H]; blocks are independent)."""
    p = {n: t.detach().clone().requires_grad_() for n, t in params.items()}
    with torch.enable_grad():
        loss = ((fn(p, k) - v) ** 2).sum()
        gs = torch.autograd.grad(loss, list(p.values()))
    return dict(zip(p, gs))


def mv(w: Tensor, x: Tensor) -> Tensor:
    """Per-(batch, head) matrix-vector product: ``w [B,H,o,i]``, ``x [B,H,i] -> [B,H,o]``."""
    return torch.einsum("bhoi,bhi->bho", w, x)


def expand_init(init: dict[str, Tensor], b: int) -> dict[str, Tensor]:
    return {n: p.detach().unsqueeze(0).expand(b, *p.shape).clone() for n, p in init.items()}


def bc(h: Tensor, t: int) -> Tensor:
    """Token ``t`` of a ``[B, H, T]`` hyper-parameter, shaped to scale ``[B, H, o, i]``."""
    return h[:, :, t, None, None]


# ----------------------------------------------------------------------------- Transformer


def rope(x: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary embedding, written as complex multiplication of consecutive feature pairs."""
    b, h, t, d = x.shape
    freqs = base ** (-torch.arange(0, d, 2, dtype=DT) / d)
    angle = torch.arange(t, dtype=DT)[:, None] * freqs[None, :]
    z = torch.view_as_complex(x.reshape(b, h, t, d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).reshape(b, h, t, d)


def causal_softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    t = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def gpt_reference(tokens: Tensor, P: dict[str, Tensor], depth: int, heads: int) -> Tensor:
    """A plain pre-norm GPT: x + Attn(RMSNorm(x)), then x + FFN(RMSNorm(x)); final norm, head."""
    h = P["embed.weight"][tokens]
    d = h.shape[-1]
    for i in range(depth):
        w = {n[len(f"blocks.{i}.ops."):]: p for n, p in P.items() if n.startswith(f"blocks.{i}.ops.")}
        a = rms(h, w["n1.weight"])
        q, k, v = (a @ w["att.qkv.weight"].T).split(d, dim=-1)
        q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
        o = merge_heads(causal_softmax_attention(rope(q), rope(k), v))
        h = h + o @ w["att.out.weight"].T
        m = rms(h, w["n2.weight"])
        h = h + F.gelu(m @ w["ffn.up.weight"].T) @ w["ffn.down.weight"].T
    return rms(h, P["norm.weight"]) @ P["head.weight"].T


def test_transformer_equals_plain_gpt() -> None:
    model = build("specs/transformer.yaml", "model.vocab=32", "model.dim=16", "model.depth=2", "model.heads=4")
    tokens = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, _ = model(tokens)
    P = {n: p.detach() for n, p in model.named_parameters()}
    torch.testing.assert_close(logits, gpt_reference(tokens, P, depth=2, heads=4), **TOL)


# ----------------------------------------------------------------------------- Titans


def layer_norm(r: Tensor, gamma: Tensor, shift: Tensor, eps: float = 1e-6) -> Tensor:
    """Layer norm over features with a per-head scale and shift (``[H, d]``)."""
    mu = r.mean(-1, keepdim=True)
    var = ((r - mu) ** 2).mean(-1, keepdim=True)
    return (r - mu) / torch.sqrt(var + eps) * gamma + shift


def titans_memory_reference(
    init: dict[str, Tensor], q: Tensor, k: Tensor, v: Tensor, theta: Tensor, eta: Tensor,
    alpha: Tensor, period: int, ln: tuple[Tensor, Tensor], decay_to: str = "zero",
) -> Tensor:
    """The Titans memory (arXiv:2501.00663, Eq. 12-15), token by token:

        l(M; x_t) = ||M(k_t) - v_t||^2
        S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; x_t)
        M_t = (1 - alpha_t) M_{t-1} + S_t,        y_t = M_t(q_t)

    with ``t'`` the start of t's chunk: ``t' = t - 1`` for period 1 (the online recurrence),
    the chunk-start state for period C (the mini-batch recurrence of Sec. 3.2). The deep memory
    of the shipped Titans specs is the two-layer MLP in layer-norm residual form,
    ``M(x) = x + LN(W1 gelu(W0 x))`` (LN scale and shift per head, outer parameters).
    ``decay_to="init"`` (what the specs ship): ``M_t = M_0 + (1 - alpha_t)(M_{t-1} - M_0) + S_t``."""

    def titans_mlp(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return x + layer_norm(mv(p["W1"], F.gelu(mv(p["W0"], x))), *ln)

    b, _, t_len, _ = q.shape
    M = expand_init(init, b)
    S = {n: torch.zeros_like(p) for n, p in M.items()}
    home = dict(M) if decay_to == "init" else {n: torch.zeros_like(p) for n, p in M.items()}
    ys = []
    for t in range(t_len):
        if t % period == 0:
            anchor = {n: p.clone() for n, p in M.items()}
        g = inner_grad(titans_mlp, anchor, k[:, :, t], v[:, :, t])
        for n in M:
            S[n] = bc(eta, t) * S[n] - bc(theta, t) * g[n]
            M[n] = home[n] + (1 - bc(alpha, t)) * (M[n] - home[n]) + S[n]
        ys.append(titans_mlp(M, q[:, :, t]))
    return torch.stack(ys, dim=2)


def titans_hypers(op, x: Tensor, period: int) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
    """theta_t, eta_t, alpha_t: per token, or (``gate: chunk``, Sec. 3.2) the chunk's first token's."""
    out = []
    for name in ("lr", "beta", "decay"):
        h = op.level.rule.hypers[name]
        g = gate(x, op.hypers.gates[name], h.max)
        out.append(chunk_start_values(g, period) if h.gate == "chunk" else g)
    return out[0], out[1], out[2]


@pytest.mark.parametrize("period,gates", [(1, "token"), (4, "token"), (64, "token"), (4, "chunk")])
@pytest.mark.parametrize("executor", ["auto", "sequential"])
@pytest.mark.parametrize("decay_to", ["zero", "init"])
def test_titans_memory_equals_the_papers_recurrence(period: int, gates: str, executor: str, decay_to: str) -> None:
    """The memory node of titans-lmm.yaml (period 64 as shipped; 1 = online; 4 = several chunks;
    ``chunk``: eta and alpha constant within a chunk, the per-chunk variant of Sec. 3.2); forgetting
    toward zero (the paper's Eq. 13) and toward the initial state (as shipped)."""
    ov = [f"levels.memory.period={period}", f"levels.memory.rule.decay_to={decay_to}"]
    if gates == "chunk":
        ov += ["levels.memory.rule.beta.gate=chunk", "levels.memory.rule.decay.gate=chunk"]
    model = build("specs/titans-lmm.yaml", "model.dim=8", "model.heads=2", "model.depth=1", *NO_CLIP, *ov)
    op = model.blocks[0].ops["mem"]
    op.level.executor = executor
    b, t, h = 2, 10, 2
    x, q, k, v = (rand(b, t, 8, seed=s) for s in range(4))
    y, _ = op([x], {"q": q, "k": k, "v": v}, None)  # out_proj is off: y is the memory's read
    init = {n: p.detach() for n, p in op.init.items()}
    theta, eta, alpha = titans_hypers(op, x, period)
    ln = (op.arch.ln_weight.detach(), op.arch.ln_bias.detach())
    ref = titans_memory_reference(init, unit(split_heads(q, h)), unit(split_heads(k, h)), split_heads(v, h),
                                  theta, eta, alpha, period, ln, decay_to)
    torch.testing.assert_close(y, merge_heads(ref), **TOL)


def test_titans_lmm_whole_model_equals_plain_titans() -> None:
    """titans-lmm.yaml end to end (one block): q, k, v = SiLU(conv4(W x)), L2-normalised q and k,
    the memory recurrence (LN-residual deep memory), RMS-normalised output gated by sigmoid(W_g x), output projection,
    residual, FFN, final norm and head -- all written here."""
    period, h = 4, 2
    model = build("specs/titans-lmm.yaml", "model.vocab=32", "model.dim=8", "model.heads=2", "model.depth=1", *NO_CLIP,
                  f"levels.memory.period={period}")
    tokens = torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(1))
    logits, _ = model(tokens)
    P = {n[len("blocks.0.ops."):] if n.startswith("blocks.0.ops.") else n: p.detach()
         for n, p in model.named_parameters()}
    x = P["embed.weight"][tokens]
    n1 = rms(x, P["n1.weight"])
    qkv = {r: F.silu(causal_conv(n1 @ P[f"{r}p.proj.weight"].T, P[f"{r}c.conv.weight"], P[f"{r}c.conv.bias"]))
           for r in "qkv"}
    op = model.blocks[0].ops["mem"]
    theta, eta, alpha = titans_hypers(op, n1, period)
    init = {n[len("mem.init."):]: p for n, p in P.items() if n.startswith("mem.init.")}
    ln = (P["mem.arch.ln_weight"], P["mem.arch.ln_bias"])
    mem = merge_heads(titans_memory_reference(init, unit(split_heads(qkv["q"], h)), unit(split_heads(qkv["k"], h)),
                                              split_heads(qkv["v"], h), theta, eta, alpha, period, ln,
                                              op.level.rule.decay_to))
    o = (rms(mem, P["mn.weight"]) * torch.sigmoid(n1 @ P["gp.proj.weight"].T)) @ P["o.proj.weight"].T
    r1 = x + o
    r2 = r1 + F.gelu(rms(r1, P["n2.weight"]) @ P["ffn.up.weight"].T) @ P["ffn.down.weight"].T
    ref = rms(r2, P["norm.weight"]) @ P["head.weight"].T
    torch.testing.assert_close(logits, ref, **TOL)


# ----------------------------------------------------------------------------- linear memories


def projected(op, x: Tensor, h: int, norm: bool = True) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
    """q, k, v of a memory op with ``proj`` sources (and its short convolution when it has one)."""
    out = []
    for r in "qkv":
        z = x @ op.proj[r].weight.T
        if r in op.convs:
            z = causal_conv(z, op.convs[r].weight, op.convs[r].bias)
        out.append(split_heads(z, h))
    q, k, v = out
    return (unit(q), unit(k), v) if norm else (q, k, v)


@pytest.mark.parametrize("period", [64, 1, 8])
def test_linear_attention_is_causal_masked_attention_without_softmax(period: int) -> None:
    """linear-attention.yaml: y = (Q K^T masked causally, diagonal included) V, for any period
    (the dot objective's gradient -v k^T does not depend on the memory)."""
    model = build("specs/linear-attention.yaml", "model.dim=8", "model.heads=2", "model.depth=1",
                  f"levels.memory.period={period}")
    op = model.blocks[0].ops["mem"]
    x = rand(2, 20, 8, seed=3)
    y, _ = op([x], {}, None)
    q, k, v = projected(op, x, 2)
    t = x.shape[1]
    scores = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), 0.0)
    ref = merge_heads(scores @ v) @ op.out.weight.T
    torch.testing.assert_close(y, ref, **TOL)


def delta_reference(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, alpha: Tensor | None = None,
                    gated_form: str = "ours") -> Tensor:
    """Sequential (gated) delta rules from M_0 = 0, read after the update, y_t = S_t q_t.

    DeltaNet:                  S_t = S_{t-1} - beta_t (S_{t-1} k_t - v_t) k_t^T
    ``ours`` (decay + sgd):    S_t = alpha_t S_{t-1} - beta_t (S_{t-1} k_t - v_t) k_t^T
    ``gdn`` (Yang et al.):     S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
    """
    b, h, t_len, d = q.shape
    S = q.new_zeros(b, h, v.shape[-1], d)
    ys = []
    for t in range(t_len):
        kt, vt, bt = k[:, :, t], v[:, :, t], bc(beta, t)
        at = 1.0 if alpha is None else bc(alpha, t)
        if gated_form == "gdn":
            S = at * (S - bt * torch.einsum("bho,bhi->bhoi", mv(S, kt), kt)) + bt * torch.einsum("bho,bhi->bhoi", vt, kt)
        else:
            S = at * S - bt * torch.einsum("bho,bhi->bhoi", mv(S, kt) - vt, kt)
        ys.append(mv(S, q[:, :, t]))
    return torch.stack(ys, dim=2)


@pytest.mark.parametrize("executor", ["auto", "sequential"])
def test_deltanet_is_the_sequential_delta_rule(executor: str) -> None:
    """deltanet.yaml: sgd on ||S k - v||^2 from S_0 = 0 is DeltaNet with beta_t = 2 lr_t, where
    lr_t = 0.5 sigmoid(w . x_t + b) per head; q, k, v through the width-4 causal convolution."""
    model = build("specs/deltanet.yaml", "model.dim=8", "model.heads=2", "model.depth=1")
    op = model.blocks[0].ops["mem"]
    op.level.executor = executor
    x = rand(2, 70, 8, seed=4)  # > 64: crosses a chunk of the parallel fast path
    y, _ = op([x], {}, None)
    q, k, v = projected(op, x, 2)
    beta = 2 * gate(x, op.hypers.gates["lr"], op.level.rule.hypers["lr"].max)
    ref = merge_heads(delta_reference(q, k, v, beta)) @ op.out.weight.T
    torch.testing.assert_close(y, ref, **TOL)


@pytest.mark.parametrize("executor", ["auto", "sequential"])
def test_gated_deltanet_spec_is_the_decayed_delta_rule(executor: str) -> None:
    """gated-deltanet.yaml computes, with alpha_t = 1 - decay_t and beta_t = 2 lr_t,

        S_t = alpha_t S_{t-1} - beta_t (S_{t-1} k_t - v_t) k_t^T

    because the rule is ``W <- (1 - decay) W - lr g`` with ``g`` taken at ``W_{t-1}`` (the state
    before the decay). Gated DeltaNet (Yang et al. 2025) writes the error at the *decayed* state:
    ``S_t = alpha_t S_{t-1} (I - beta_t k k^T) + beta_t v k^T``; see the next test for the exact map."""
    model = build("specs/gated-deltanet.yaml", "model.dim=8", "model.heads=2", "model.depth=1")
    op = model.blocks[0].ops["mem"]
    op.level.executor = executor
    x = rand(2, 70, 8, seed=5)
    y, _ = op([x], {}, None)
    q, k, v = projected(op, x, 2)
    hp = op.level.rule.hypers
    beta = 2 * gate(x, op.hypers.gates["lr"], hp["lr"].max)
    alpha = 1 - gate(x, op.hypers.gates["decay"], hp["decay"].max)
    ref = merge_heads(delta_reference(q, k, v, beta, alpha)) @ op.out.weight.T
    torch.testing.assert_close(y, ref, **TOL)


def test_gated_deltanet_paper_form_is_a_reparametrisation() -> None:
    """Gated DeltaNet exactly, through our decay + sgd rule:

        alpha S (I - beta k k^T) + beta v k^T  =  alpha S - (alpha beta) (S k - v / alpha) k^T

    i.e. our recurrence with ``decay = 1 - alpha``, ``lr = alpha beta / 2`` (l2 is not halved) and
    values ``v / alpha``. Driven through ``nestlearn.loops.run`` (auto and sequential executors)."""
    from nestlearn import objectives, rules
    from nestlearn.loops import GradMode, MemoryProblem, init_state, run
    from nestlearn.memories import LinearMemory

    b, h, t, d = 2, 2, 40, 4
    q, k = unit(rand(b, h, t, d, seed=6)), unit(rand(b, h, t, d, seed=7))
    v = rand(b, h, t, d, seed=8)
    beta = torch.sigmoid(rand(b, h, t, seed=9))
    alpha = 1 - 0.3 * torch.sigmoid(rand(b, h, t, seed=10))
    ref = delta_reference(q, k, v, beta, alpha, gated_form="gdn")
    arch = LinearMemory(d, d, h)
    rule = rules.sgd(lr=0.0, decay=0.0)
    for executor in ("auto", "sequential"):
        pb = MemoryProblem(arch, rule, objectives.l2, q, k, v / alpha.unsqueeze(-1),
                           {"lr": alpha * beta / 2, "decay": 1 - alpha}, 1, GradMode())
        y, _ = run(pb, init_state(arch, rule, {"W": torch.zeros(h, d, d, dtype=DT)}, b), executor)
        torch.testing.assert_close(y, ref, **TOL)


# ----------------------------------------------------------------------------- TTT


def ttt_reference(op, x: Tensor, period: int, core: str) -> Tensor:  # noqa: ANN001
    """Mini-batch TTT (Sun et al. 2024), the inner model in its LN-residual form:

        f(z; W) = z + LN(f_res(z; W)) * gamma + beta_ln
        W_t = W_{t'} - sum_{s = t'..t} eta_s grad ||f(k_s; W_{t'}) - v_s||^2,   out_t = f(q_t; W_t)

    with ``t'`` the start of t's mini-batch and eta_s = max sigmoid(w . x_s + b)."""
    h = op.heads
    q, k, v = projected(op, x, h, norm=False)
    eta = gate(x, op.hypers.gates["lr"], op.level.rule.hypers["lr"].max)
    gamma, shift = op.arch.ln_weight.detach(), op.arch.ln_bias.detach()

    def f(p: dict[str, Tensor], z: Tensor) -> Tensor:
        if core == "linear":
            r = mv(p["W0"], z) + p["b0"]
        else:
            r = mv(p["W1"], F.gelu(mv(p["W0"], z) + p["b0"])) + p["b1"]
        return z + layer_norm(r, gamma, shift)

    W = expand_init({n: p.detach() for n, p in op.init.items()}, x.shape[0])
    outs = []
    for t in range(x.shape[1]):
        if t % period == 0:
            anchor = {n: p.clone() for n, p in W.items()}
        g = inner_grad(f, anchor, k[:, :, t], v[:, :, t])
        W = {n: W[n] - eta[:, :, t].reshape(*eta.shape[:2], *([1] * (W[n].dim() - 2))) * g[n] for n in W}
        outs.append(f(W, q[:, :, t]))
    return merge_heads(torch.stack(outs, dim=2)) @ op.out.weight.T


@pytest.mark.parametrize("name", ["ttt-linear", "ttt-mlp"])
@pytest.mark.parametrize("period", [16, 4])
@pytest.mark.parametrize("executor", ["auto", "sequential"])
def test_ttt_is_mini_batch_gradient_descent(name: str, period: int, executor: str) -> None:
    model = build(f"specs/{name}.yaml", "model.dim=8", "model.heads=2", "model.depth=1",
                  f"levels.memory.period={period}", "levels.memory.rule.lr.max=0.5")
    op = model.blocks[0].ops["mem"]
    op.level.executor = executor
    x = rand(2, 20, 8, seed=11)
    y, _ = op([x], {}, None)
    torch.testing.assert_close(y, ttt_reference(op, x, period, name.split("-")[1]), **TOL)


# ----------------------------------------------------------------------------- optimizers as memories


def drive_token_by_token(op, x: Tensor) -> tuple[list[Tensor], Tensor]:  # noqa: ANN001
    """The op fed one token per call with the carried state: fast weights after every token."""
    state, ws, ys = None, [], []
    for t in range(x.shape[1]):
        y, state = op([x[:, t : t + 1]], {}, state)
        ws.append(state["mem"]["params"]["W"].detach())
        ys.append(y)
    return ws, torch.cat(ys, dim=1)


@pytest.mark.parametrize(
    "spec,make_opt",
    [
        ("specs/momentum-memory.yaml", lambda p, r: torch.optim.SGD(p, lr=r.lr, momentum=r.beta)),
        ("specs/adam-memory.yaml",
         lambda p, r: torch.optim.Adam(p, lr=r.lr, betas=(r.b1, r.b2), eps=r.eps, weight_decay=r.weight_decay)),
    ],
)
def test_optimizer_levels_reproduce_torch_optim(spec: str, make_opt) -> None:  # noqa: ANN001
    """The memory level of momentum-memory.yaml / adam-memory.yaml, fed the per-token losses
    ``||W k_t - v_t||^2``, moves its fast weights exactly as torch.optim does on a plain
    ``nn.Parameter`` with the same losses, step after step (and reads y_t = W_t q_t)."""
    model = build(spec, "model.dim=8", "model.heads=2", "model.depth=1")
    op = model.blocks[0].ops["mem"]
    x = rand(2, 12, 8, seed=12)
    ours, y = drive_token_by_token(op, x)
    q, k, v = (z.detach() for z in projected(op, x, 2))
    W = torch.nn.Parameter(op.init["W"].detach().unsqueeze(0).expand(2, -1, -1, -1).clone())
    opt = make_opt([W], model.spec.levels["memory"].rule)
    reads = []
    for t in range(x.shape[1]):
        opt.zero_grad()
        ((mv(W, k[:, :, t]) - v[:, :, t]) ** 2).sum().backward()
        opt.step()
        torch.testing.assert_close(ours[t], W.detach(), rtol=1e-12, atol=1e-12)
        reads.append(mv(W.detach(), q[:, :, t]))
    torch.testing.assert_close(y, merge_heads(torch.stack(reads, 2)) @ op.out.weight.T, **TOL)


def test_newton_schulz_reference_orthogonalises() -> None:
    """Sanity of the reference itself: singular values land near 1 (Muon's NS is approximate)."""
    m = rand(6, 6, seed=13)
    s = torch.linalg.svdvals(ref.newton_schulz5(m))
    assert s.min() > 0.6 and s.max() < 1.25


@pytest.mark.parametrize("period", [16, 4])
def test_muon_level_is_momentum_with_newton_schulz_output(period: int) -> None:
    """muon-memory.yaml: m_t = beta m_{t-1} + g_t, W_t = W_{t-1} - lr NS5(m_t), gradients at the
    chunk-start state (mini-batches of ``period`` tokens)."""
    model = build("specs/muon-memory.yaml", "model.dim=8", "model.heads=2", "model.depth=1",
                  f"levels.memory.period={period}")
    op = model.blocks[0].ops["mem"]
    x = rand(1, 20, 8, seed=14)
    y, state = op([x], {}, None)
    r = model.spec.levels["memory"].rule
    q, k, v = projected(op, x, 2)
    W = expand_init({"W": op.init["W"]}, 1)["W"]
    m = torch.zeros_like(W)
    reads = []
    for t in range(x.shape[1]):
        if t % period == 0:
            anchor = W.clone()
        g = inner_grad(lambda p, z: mv(p["W"], z), {"W": anchor}, k[:, :, t], v[:, :, t])["W"]
        m = r.beta * m + g
        W = W - r.lr * torch.stack([torch.stack([ref.newton_schulz5(mh) for mh in mb]) for mb in m])
        reads.append(mv(W, q[:, :, t]))
    torch.testing.assert_close(y, merge_heads(torch.stack(reads, 2)) @ op.out.weight.T, **TOL)
    torch.testing.assert_close(state["mem"]["params"]["W"], W, **TOL)


# ----------------------------------------------------------------------------- HOPE's CMS levels


def cms_reference(op, x: Tensor, period: int, kv_norm: bool = False) -> Tensor:  # noqa: ANN001
    """One CMS level of models/hope.yaml (Eq. 70-71): an MLP ``W1 gelu(W0 x)`` whose weights learn
    in context by SGD on ``||MLP(W_k x_t) - W_v x_t||^2`` (nestlearn's CMS error signal) with
    lr_t = max sigmoid(w . x_t + b), mini-batch semantics: every gradient of a chunk at the
    chunk-start weights, token t read with the weights after its own update. ``kv_norm``: keys
    and values divided by their RMS (``sqrt(mean(z^2) + eps)``) first."""
    k, v = x @ op.proj["k"].weight.T, x @ op.proj["v"].weight.T
    if kv_norm:
        eps = torch.finfo(x.dtype).eps
        k, v = (z / torch.sqrt((z * z).mean(-1, keepdim=True) + eps) for z in (k, v))
    lr = gate(x, op.hypers.gates["lr"], op.level.rule.hypers["lr"].max)[:, 0]  # one head

    def mlp(p: dict[str, Tensor], z: Tensor) -> Tensor:
        return torch.einsum("boi,bi->bo", p["W1"], F.gelu(torch.einsum("boi,bi->bo", p["W0"], z)))

    W = {n: p.detach()[0].unsqueeze(0).expand(x.shape[0], -1, -1).clone() for n, p in op.init.items()}
    ys = []
    for t in range(x.shape[1]):
        if t % period == 0:
            anchor = {n: p.clone() for n, p in W.items()}
        g = inner_grad(mlp, anchor, k[:, t], v[:, t])
        W = {n: W[n] - lr[:, t, None, None] * g[n] for n in W}
        ys.append(mlp(W, x[:, t]))
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("node,period", [("c1", None), ("c2", None), ("c1", 4), ("c3", 8)])
@pytest.mark.parametrize("executor", ["auto", "sequential"])
@pytest.mark.parametrize("kv_norm", [False, True])
def test_hope_cms_levels_equal_the_mini_batch_recurrence(node: str, period: int | None, executor: str,
                                                         kv_norm: bool) -> None:
    level = {"c1": "cms_fast", "c2": "cms_mid", "c3": "cms_slow"}[node]
    ov = ["model.dim=8", "model.depth=1", "block.sm.heads=2", "model.heads=2", f"block.{node}.kv_norm={kv_norm}"]
    if period is not None:
        ov.append(f"levels.{level}.period={period}")
    model = build("models/hope.yaml", *ov)
    op = model.blocks[0].ops[node]
    op.level.executor = executor
    with torch.no_grad():  # rates large enough for the in-context updates to matter at this size
        op.level.rule.hypers["lr"].max = 0.05
    x = rand(2, 20, 8, seed=15)
    y, _ = op([x], {}, None)
    torch.testing.assert_close(y, cms_reference(op, x, int(op.level.period), kv_norm), **TOL)
