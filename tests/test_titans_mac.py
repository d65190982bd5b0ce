"""specs/titans-mac.yaml is Titans' Memory as Context (arXiv:2501.00663, Sec. 4.1, Eq. 21-25).

The shipped spec, compiled at a tiny size in float64 with every parameter randomised, is
compared with a plain reference written below from the paper's equations:

    h_t    = M*_{t-1}(q_t),  q_t = S^(t) W_Q                                  (Eq. 21)
    S~^(t) = [p_1 .. p_Np] || h_t || S^(t)                                    (Eq. 22)
    y_t    = Attn(S~^(t))                                                     (Eq. 23)
    M_t    = M_{t-1}(y_t)                                                     (Eq. 24)
    o_t    = y_t (x) M*_t(y_t)                                                (Eq. 25)

The reference loops over segments; the attention is an explicit softmax over the concatenated
rows (persistent tokens, retrieved tokens, segment tokens) under an explicit visibility rule;
the memory is the Titans recurrence (Eq. 12-14) token by token, every gradient of a segment
taken at the segment-start state (the mini-batch form of Sec. 3.2, chunk = segment), with
``torch.autograd`` on plain tensors. No nestlearn code computes a reference value.

The choices the paper leaves open are the ones docs/specs/titans-mac.md states: q, k, v =
SiLU(conv4(W x)) with L2-normalised q and k (Sec. 4.4); segment token i sees every persistent
token and h_t[j], S^(t)[j] for j <= i; M*_t(y_t)[i] is read after token i's update, through the
memory's query map; (x) is RMSNorm(y) * sigmoid(RMSNorm(m)); rotary positions are indices in
S~^(t) (p_j at j, h_t[i] at Np + i, S^(t)[i] at Np + C + i).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten

import nestlearn
from nestlearn.compile.model import CompiledModel

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]
TOL = {"rtol": 1e-10, "atol": 1e-10}
Params = dict[str, Tensor]

# name, overrides on top of the tiny size, executor
CONFIGS = {
    "shipped": ([], "auto"),
    "sequential-chunk-gates": (["levels.memory.rule.beta.gate=chunk", "levels.memory.rule.decay.gate=chunk"],
                               "sequential"),
    "no-rope-no-conv-no-qknorm": (["block.mac.rope=false", "block.mac.conv=0", "block.mac.qk_norm=false"], "auto"),
    "period-1-no-persistent": (["levels.memory.period=1", "block.mac.persistent=0"], "auto"),
    "papers-forgetting-toward-zero": (["levels.memory.rule.decay_to=zero"], "auto"),
}


def build(*overrides: str, depth: int = 2, period: int = 4, executor: str = "auto", seed: int = 0) -> CompiledModel:
    ov = ["model.vocab=32", "model.dim=8", "model.heads=2", f"model.depth={depth}",
          f"levels.memory.period={period}", "block.mac.persistent=3",
          "levels.memory.clip=null",  # the paper's equations have no clip (tests/test_executors.py checks it)
          *overrides]
    spec = nestlearn.load_spec(ROOT / "specs" / "titans-mac.yaml", overrides=ov)
    torch.manual_seed(seed)
    model = nestlearn.compile(spec, dtype=DT)
    model.set_executor(executor)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():  # nothing trivially constant: gates, initial state, LN and norms included
        for name, p in model.named_parameters():
            last = name.split(".")[-1]
            if last in ("weight", "ln_weight") and (p.dim() == 1 or last == "ln_weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=DT))
            elif p.dim() == 1 or last == "ln_bias":
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=DT))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) / math.sqrt(p.shape[-1]))
    return model


# ----------------------------------------------------------------------------- the reference


def rms(x: Tensor, w: Tensor, eps: float = 1e-6) -> Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def heads_of(x: Tensor, h: int) -> Tensor:
    """``[B, T, D] -> [B, H, T, D/H]``."""
    b, t, d = x.shape
    return x.reshape(b, t, h, d // h).permute(0, 2, 1, 3)


def merge(y: Tensor) -> Tensor:
    b, h, t, dh = y.shape
    return y.permute(0, 2, 1, 3).reshape(b, t, h * dh)


def causal_conv(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``y_t = sum_j w[:, j] x_{t-(W-1)+j} + b`` over ``x [B, T, D]``, zero before the stream."""
    width = w.shape[-1]
    xp = torch.cat([x.new_zeros(x.shape[0], width - 1, x.shape[2]), x], dim=1)
    return sum(w[:, 0, j] * xp[:, j : j + x.shape[1]] for j in range(width)) + b


def rotate(x: Tensor, pos: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary embedding as a complex product of feature pairs, ``x [..., T, d]`` at ``pos [T]``."""
    d = x.shape[-1]
    angle = pos.to(DT)[:, None] * base ** (-torch.arange(0, d, 2, dtype=DT) / d)[None, :]
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).reshape(x.shape)


def memory_fn(ln_w: Tensor, ln_b: Tensor) -> Any:  # noqa: ANN401
    """The Titans deep memory of the shipped specs, per head: ``M(z) = z + LN(W1 gelu(W0 z))``."""

    def f(p: Params, z: Tensor) -> Tensor:  # p: [B, H, o, i], z: [B, H, N, d]
        r = torch.einsum("bhoi,bhni->bhno", p["W1"], F.gelu(torch.einsum("bhoi,bhni->bhno", p["W0"], z)))
        mu = r.mean(-1, keepdim=True)
        var = ((r - mu) ** 2).mean(-1, keepdim=True)
        return z + (r - mu) / torch.sqrt(var + 1e-6) * ln_w[:, None] + ln_b[:, None]

    return f


def mac_reference(x: Tensor, W: Params, *, heads: int, period: int, rope: bool, conv: bool, qk_norm: bool,
                  gates: dict[str, tuple[float, str]], decay_to: str = "zero") -> Tensor:
    """One MAC node on its input ``x [B, T, D]`` from a fresh state. ``W``: the node's parameters
    by name (``memory.proj.q.weight``, ``qkv.weight``, ``persistent``, ...)."""
    b, t_len, d = x.shape
    h, dh, C = heads, d // heads, period
    f = memory_fn(W["memory.arch.ln_weight"], W["memory.arch.ln_bias"])
    P = W.get("persistent", x.new_zeros(0, d))
    n_p = P.shape[0]
    Wq, Wk, Wv = W["qkv.weight"].split(d, dim=0)

    def feats(role: str, z: Tensor) -> Tensor:
        """SiLU(conv(z W_role)) per head, over a whole stream ``z [B, t, D]`` (zero history)."""
        u = z @ W[f"memory.proj.{role}.weight"].T
        if conv:
            u = causal_conv(u, W[f"memory.convs.{role}.weight"], W[f"memory.convs.{role}.bias"])
        u = heads_of(F.silu(u), h)
        return F.normalize(u, dim=-1) if qk_norm and role in ("q", "k") else u

    def gate(name: str, y: Tensor) -> Tensor:
        mx, kind = gates[name]
        g = (mx * torch.sigmoid(y @ W[f"memory.hypers.gates.{name}.weight"].T
                                + W[f"memory.hypers.gates.{name}.bias"])).permute(0, 2, 1)  # [B, H, n]
        return g[..., :1].expand_as(g) if kind == "chunk" else g  # chunk: the segment's first token

    M = {n: W[f"memory.init.{n}"].unsqueeze(0).expand(b, *W[f"memory.init.{n}"].shape) for n in ("W0", "W1")}
    S = {n: torch.zeros_like(p) for n, p in M.items()}
    home = dict(M) if decay_to == "init" else {n: torch.zeros_like(p) for n, p in M.items()}  # where forgetting pulls
    q_all = feats("q", x)
    ys: list[Tensor] = []
    outs = []
    for s0 in range(0, t_len, C):
        n = min(C, t_len - s0)
        seg = x[:, s0 : s0 + n]
        start = dict(M)                                              # M_{t-1}
        hret = merge(f(start, q_all[:, :, s0 : s0 + n]))             # Eq. 21
        ctx = torch.cat([P.unsqueeze(0).expand(b, -1, -1), hret, seg], dim=1)  # Eq. 22
        Q, K, V = heads_of(seg @ Wq.T, h), heads_of(ctx @ Wk.T, h), heads_of(ctx @ Wv.T, h)
        if rope:
            ar = torch.arange(n)
            Q = rotate(Q, n_p + C + ar)
            K = rotate(K, torch.cat([torch.arange(n_p), n_p + ar, n_p + C + ar]))
        # row i sees: every persistent token, h_t[j] and S^(t)[j] for j <= i
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        seen = torch.cat([torch.ones(n, n_p, dtype=torch.bool), j <= i, j <= i], dim=1)
        scores = (Q @ K.transpose(-1, -2)) / math.sqrt(dh)
        att = torch.softmax(scores.masked_fill(~seen, float("-inf")), dim=-1) @ V
        y = merge(att) @ W["out.weight"].T                           # Eq. 23
        ys.append(y)
        Y = torch.cat(ys, dim=1)                                     # the y stream so far (for the convs)
        k, v, qy = (feats(r, Y)[:, :, s0 : s0 + n] for r in ("k", "v", "q"))
        theta, eta, alpha = gate("lr", y), gate("beta", y), gate("decay", y)
        reads = []
        for a in range(n):                                           # Eq. 24, token by token
            # the inner gradient at the segment-start state, holding k and v fixed (fresh aliases)
            anchor = {nm: p.view_as(p) for nm, p in start.items()}
            loss = ((f(anchor, k[:, :, a : a + 1]) - v[:, :, a : a + 1]) ** 2).sum()
            grads = dict(zip(anchor, torch.autograd.grad(loss, list(anchor.values()), create_graph=True)))
            th, et, al = (g[:, :, a, None, None] for g in (theta, eta, alpha))  # [B, H, 1, 1]
            for nm in M:
                S[nm] = et * S[nm] - th * grads[nm]                  # Eq. 14 (surprise with momentum)
                M[nm] = home[nm] + (1 - al) * (M[nm] - home[nm]) + S[nm]  # Eq. 13 (forgetting; toward M_0 with decay_to: init)
            reads.append(f(M, qy[:, :, a : a + 1]))                  # M*_t(y_t), after token a's update
        m = merge(torch.cat(reads, dim=2))
        outs.append(rms(y, W["norm_y.weight"]) * torch.sigmoid(rms(m, W["norm_m.weight"])))  # Eq. 25
    return torch.cat(outs, dim=1)


def model_reference(tokens: Tensor, P: Params, *, depth: int, **cfg: Any) -> Tensor:  # noqa: ANN401
    """The spec around the MAC node: pre-norm residual block, FFN, final norm, head."""
    x = P["embed.weight"][tokens]
    for i in range(depth):
        w = {n[len(f"blocks.{i}.ops."):]: p for n, p in P.items() if n.startswith(f"blocks.{i}.ops.")}
        mac = mac_reference(rms(x, w["n1.weight"]), {n[4:]: p for n, p in w.items() if n.startswith("mac.")}, **cfg)
        x = x + mac @ w["o.proj.weight"].T
        x = x + F.gelu(rms(x, w["n2.weight"]) @ w["ffn.up.weight"].T) @ w["ffn.down.weight"].T
    return rms(x, P["norm.weight"]) @ P["head.weight"].T


def cfg_of(model: CompiledModel) -> dict[str, Any]:
    node = next(n for n in model.spec.block if n.id == "mac")
    rule = model.spec.levels["memory"].rule
    gates = {n: (getattr(rule, n).max, getattr(rule, n).gate) for n in ("lr", "beta", "decay")}
    return {"heads": model.spec.model.heads, "period": int(model.spec.levels["memory"].period),
            "rope": node.rope, "conv": node.conv > 0, "qk_norm": node.qk_norm, "gates": gates,
            "decay_to": rule.decay_to}


def tokens_of(t: int, seed: int = 0) -> Tensor:
    return torch.randint(0, 32, (2, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mac_model_equals_the_papers_equations(name: str) -> None:
    """The whole titans-mac model (2 blocks) over 11 tokens = segments of 4, 4 and 3 tokens."""
    overrides, executor = CONFIGS[name]
    period = 1 if "levels.memory.period=1" in overrides else 4
    model = build(*overrides, period=period, executor=executor)
    tokens = tokens_of(11)
    logits, _ = model(tokens)
    P = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}  # for the inner grads
    ref = model_reference(tokens, P, depth=2, **cfg_of(model))
    torch.testing.assert_close(logits, ref.detach(), **TOL)


def test_outer_gradients_equal_the_reference_through_every_unrolled_update() -> None:
    """``grad: unroll``: the outer loss's gradient w.r.t. every parameter (persistent tokens,
    attention, W_Q/W_K/W_V, convolutions, gates, M_0, LN, norms) equals the reference's, whose
    inner gradients are taken with ``create_graph=True``."""
    model = build(depth=1)
    tokens = tokens_of(10, seed=3)
    R = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(4), dtype=DT)
    logits, _ = model(tokens)
    (logits * R).sum().backward()
    P = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    ref = model_reference(tokens, P, depth=1, **cfg_of(model))
    ref_grads = torch.autograd.grad((ref * R).sum(), list(P.values()))
    for (name, p), g in zip(model.named_parameters(), ref_grads):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("splits", [[5, 1, 7], [4, 8], [3, 3, 3, 3, 3, 3, 3]])
def test_pieces_equal_one_call(splits: list[int]) -> None:
    """Feeding 23 tokens in pieces (mid-segment, one token, segment-aligned) with the carried
    state gives the same logits and the same final state (memory, momentum, segment position,
    segment cache, convolution tails) as one call."""
    model = build("levels.memory.rule.beta.gate=chunk")
    tokens = tokens_of(23, seed=5)
    with torch.no_grad():
        whole, whole_state = model(tokens)
        outs, state, t0 = [], None, 0
        for t1 in [*torch.tensor(splits).cumsum(0).tolist(), 23]:
            out, state = model(tokens[:, t0:t1], state)
            outs.append(out)
            t0 = t1
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-11, atol=1e-11)
    a, spec_a = tree_flatten(whole_state)
    b, spec_b = tree_flatten(state)
    assert spec_a == spec_b
    for u, v in zip(a, b):
        if isinstance(u, Tensor):
            torch.testing.assert_close(u, v, rtol=1e-11, atol=1e-11)
        else:
            assert u == v
    assert state["0"]["mac"]["mem"]["offset"] == 23 % 4 and state["0"]["mac"]["cache"]["sk"].shape[2] == 3


def test_causal_and_the_memory_carries_across_segments() -> None:
    """Changing token j leaves every earlier output unchanged (the visibility rule admits no
    future token, retrieved tokens included), and changes outputs two segments later, which
    attention cannot reach: the memory carries it."""
    model = build(depth=1)
    tokens = tokens_of(16, seed=6)
    with torch.no_grad():
        base, _ = model(tokens)
        for j in (0, 5, 10):
            other = tokens.clone()
            other[:, j] = (other[:, j] + 1) % 32
            out, _ = model(other)
            torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=0)
            assert (out[:, j] - base[:, j]).abs().max() > 1e-6
        far = (out[:, 12:] - base[:, 12:]).abs().max()  # j = 10 -> tokens 12..15 are a later segment
        assert far > 1e-9
        other = tokens.clone()
        other[:, 1] = (other[:, 1] + 1) % 32
        out, _ = model(other)
        assert (out[:, 8:] - base[:, 8:]).abs().max() > 1e-9  # segment 0 -> segments 2 and 3


def test_forward_backward_finite_and_every_parameter_learns() -> None:
    """A longer stream (5 segments of 8, 3 blocks): finite logits and a finite, non-zero outer
    gradient for every parameter; the memory level's state is reported by ``level_summary``."""
    model = build(depth=3, period=8)
    tokens = tokens_of(40, seed=7)
    logits, state = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"{name} receives a zero gradient"
    rows = {r["name"]: r for r in model.level_summary()}
    assert rows["memory"]["state"] == 3 * 2 * (2 * 4 * 16)  # depth x heads x (W0 + W1)
    assert state["2"]["mac"]["mem"]["chunks"] == 5
