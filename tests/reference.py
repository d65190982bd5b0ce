"""Plain, obviously-correct references the tests compare nestlearn against.

Everything here is written per sequence and per head, token by token, with torch.autograd
on plain tensors: no nestlearn code is imported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_mem(p: dict[str, Tensor], x: Tensor) -> Tensor:
    return p["W"] @ x


def mlp_mem(p: dict[str, Tensor], x: Tensor) -> Tensor:
    """Residual 2-layer MLP memory x + W1 gelu(W0 x) (the paper's Eq. 89 form)."""
    return x + p["W1"] @ F.gelu(p["W0"] @ x)


def l2(pred: Tensor, target: Tensor) -> Tensor:
    return ((pred - target) ** 2).sum()


def dot(pred: Tensor, target: Tensor) -> Tensor:
    return -(pred * target).sum()


def layer_inputs(mem: str, p: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
    if mem == "linear":
        return {"W": x}
    return {"W0": x, "W1": F.gelu(p["W0"] @ x)}


def inner_loop(
    mem: str, rule: str, objective: str, init: dict[str, Tensor], q: Tensor, k: Tensor, v: Tensor,
    hp: dict[str, Tensor | float], period: int, read_start: bool = False, clip: float | None = None,
    max_gain: float | None = None, steps: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One sequence, one head: q, k, v are [T, d]; hp values are [T] tensors or floats.

    Mini-batch semantics: every gradient of a chunk of ``period`` tokens is taken at the
    chunk-start weights; token t is read after its own update (``read_start``: with the
    chunk-start weights, Nested Learning Eq. 71). ``clip``: each token's gradient, all weights
    together, is scaled down to that norm when longer. ``max_gain`` (l2 only): then scaled down
    again where ``steps * lr * |g| / |g_raw| * |g_raw|^2 / |dL/dpred|^2`` (the token's chunk gain:
    its rate, what the clip left of it, and the memory's curvature along its error) exceeds it.
    """
    f = linear_mem if mem == "linear" else mlp_mem
    obj = l2 if objective == "l2" else dot
    W = {n: t.clone() for n, t in init.items()}
    S = {n: torch.zeros_like(t) for n, t in init.items()}  # momentum / first moment
    V = {n: torch.zeros_like(t) for n, t in init.items()}  # second moment
    ys = []

    def h(name: str, t: int, default: float = 0.0) -> float | Tensor:
        x = hp.get(name, default)
        return x[t] if isinstance(x, Tensor) else x

    anchor = W
    for t in range(q.shape[0]):
        if t % period == 0:
            anchor = {n: w.detach().requires_grad_() for n, w in W.items()}
        pred = f(anchor, k[t])
        loss = obj(pred, v[t])
        names = list(anchor)
        grads = dict(zip(names, torch.autograd.grad(loss, [anchor[n] for n in names])))
        raw_norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        if clip is not None and raw_norm > clip:
            grads = {n: g * (clip / raw_norm) for n, g in grads.items()}
        lr = h("lr", t)
        if max_gain is not None:
            curvature = raw_norm**2 / ((2 * (pred - v[t])) ** 2).sum()
            kept = torch.sqrt(sum((g**2).sum() for g in grads.values())) / raw_norm
            gain = steps * lr * kept * curvature
            if gain > max_gain:
                grads = {n: g * (max_gain / gain) for n, g in grads.items()}
        proj = h("proj", t) if "proj" in hp else lr  # DGD's projection rate (default: lr)
        if rule == "sgd":
            W = {n: (1 - h("decay", t)) * W[n] - lr * grads[n] for n in W}
        elif rule == "momentum":
            S = {n: h("beta", t) * S[n] - lr * grads[n] for n in W}
            W = {n: (1 - h("decay", t)) * W[n] + S[n] for n in W}
        elif rule == "adam":
            b1, b2, eps = 0.9, 0.999, 1e-8
            S = {n: b1 * S[n] + (1 - b1) * grads[n] for n in W}
            V = {n: b2 * V[n] + (1 - b2) * grads[n] ** 2 for n in W}
            c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
            W = {n: W[n] - lr * (S[n] / c1) / (torch.sqrt(V[n] / c2) + eps) for n in W}
        elif rule == "dgd":
            ins = layer_inputs(mem, {n: a.detach() for n, a in anchor.items()}, k[t])
            S = {n: h("beta", t) * S[n] + grads[n] for n in W}
            new = {}
            for n in W:
                a = ins[n] / ins[n].norm()
                new[n] = W[n] @ ((1 - h("decay", t)) * torch.eye(a.shape[0], dtype=a.dtype)
                                 - proj * torch.outer(a, a)) - lr * S[n]
            W = new
        else:
            raise ValueError(rule)
        ys.append(f(anchor if read_start else W, q[t]).detach())
    return torch.stack(ys), {n: w.detach() for n, w in W.items()}


def batched_inner_loop(
    mem: str, rule: str, objective: str, init: dict[str, Tensor], q: Tensor, k: Tensor, v: Tensor,
    hp: dict[str, Tensor | float], period: int, read_start: bool = False, clip: float | None = None,
    max_gain: float | None = None, steps: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``inner_loop`` for every sequence and head, one at a time: q, k, v are [B, H, T, d]; init
    values are per head ([H, ...]); hp values are [B, H, T] tensors or floats. Returns the
    outputs [B, H, T, d] and the final weights [B, H, ...]."""
    B, H = q.shape[:2]
    ys = torch.zeros_like(q)
    finals = {n: torch.zeros(B, *p.shape, dtype=p.dtype) for n, p in init.items()}
    for b in range(B):
        for h in range(H):
            y, fin = inner_loop(mem, rule, objective, {n: p[h] for n, p in init.items()}, q[b, h], k[b, h], v[b, h],
                                {n: (x[b, h] if isinstance(x, Tensor) else x) for n, x in hp.items()}, period,
                                read_start=read_start, clip=clip, max_gain=max_gain, steps=steps)
            ys[b, h] = y
            for n in fin:
                finals[n][b, h] = fin[n]
    return ys, finals


def gpt_block_reference(x: Tensor, w: dict[str, Tensor], heads: int) -> Tensor:
    """A plain pre-norm decoder block (RMSNorm eps 1e-6, causal softmax attention, GELU MLP)."""

    def rms(z: Tensor, g: Tensor) -> Tensor:
        return z / torch.sqrt((z * z).mean(-1, keepdim=True) + 1e-6) * g

    b, t, d = x.shape
    dh = d // heads
    h = rms(x, w["n1"])
    q, k, v = (h @ w["wq"].T, h @ w["wk"].T, h @ w["wv"].T)
    q, k, v = (z.view(b, t, heads, dh).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
    att = att.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    y = (att @ v).transpose(1, 2).reshape(b, t, d) @ w["wo"].T
    x = x + y
    return x + F.gelu(rms(x, w["n2"]) @ w["up"].T) @ w["down"].T


def newton_schulz5(m: Tensor, steps: int = 5) -> Tensor:
    """Muon's quintic Newton-Schulz iteration (K. Jordan et al. 2024), one matrix at a time:
    X <- a X + (b A + c A^2) X with A = X X^T, on the wide orientation, from X = M / ||M||_F."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = m.shape[0] > m.shape[1]
    x = m.T if tall else m
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    x = x.T if tall else x
    return x * math.sqrt(max(1.0, m.shape[0] / m.shape[1]))
