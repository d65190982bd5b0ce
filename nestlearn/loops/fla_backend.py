"""Optional dispatch of the exact (gated) delta rule to flash-linear-attention's Triton kernels.

Only problems that ``loops/delta.py`` computes exactly are candidates: a period-1 linear memory
without bias, the ``l2`` objective (not halved), plain sgd (no momentum) with a per-token ``lr``
and optional per-token ``decay``, ``grad: unroll``. Our recurrence (``rules/momentum.py``, the
output read after the token's update) is

    W_t = alpha_t W_{t-1} + beta_t (v_t - W_{t-1} k_t) k_t^T,   y_t = W_t q_t,
    alpha_t = 1 - decay_t,   beta_t = 2 lr_t          (d/dW ||W k - v||^2 = 2 (W k - v) k^T)

with ``W`` laid out ``[B, H, d_out, d_in]``. fla (>= 0.6, inputs ``[B, T, H, D]``, state
``S = W^T`` laid out ``[B, H, K, V]``) computes, with ``scale = 1``:

    chunk_delta_rule:        S_t = S_{t-1} + k_t (b_t (v_t - S_{t-1}^T k_t))^T,     o_t = S_t^T q_t
    chunk_gated_delta_rule:  S' = exp(g_t) S_{t-1};  S_t = S' + k_t (b_t (v_t - S'^T k_t))^T

so DeltaNet maps exactly with ``b = 2 lr``. The gated kernel takes its delta error at the
*decayed* state, ours at the undecayed one; writing ours as
``alpha W + (beta / alpha) (alpha v - alpha W k) k^T`` gives the exact map

    g_t = log alpha_t,   b_t = beta_t / alpha_t,   v'_t = alpha_t v_t.

Where exactness needs care (all listed, none silent):

- ``alpha_t -> 0`` (decay -> 1): ``b_t`` grows like 1/alpha_t. alpha is floored at
  ``ALPHA_MIN`` (1e-6): a token with ``decay > 1 - 1e-6`` keeps 1e-6 of the previous state
  instead of none, and its ``decay`` gradient is zero. The shipped gate (``max: 1.0, bias: -4``)
  stays far from it; the products fla forms (``b_t * exp(g_t - g_s)``) stay bounded.
- precision: fla keeps the state in fp32 but rounds its per-chunk intermediates (``v_new``,
  chunk states) to the input dtype, so bf16/fp16 inputs give ~1e-2 relative differences to the
  float64 recurrence (as fla's own tests tolerate); ``loops/delta.py`` computes in fp32 always.
- fp32 inputs: ``chunk_delta_rule`` refuses fp32, so fp32 problems (with or without decay) run
  ``chunk_gated_delta_rule`` (``g = 0`` without decay). Its ``tl.dot`` on fp32 inputs uses TF32
  unless ``TRITON_F32_DEFAULT`` is ``ieee`` (or ``tf32x3``); fp32 problems are therefore
  accepted only when the user allowed TF32 matmuls (``torch.get_float32_matmul_precision() !=
  "highest"``) or set that variable -- "fp32 means fp32" otherwise, and the pure-PyTorch path runs.
- fla 0.6 raises in the *backward* of its gated kernel on Hopper GPUs with Triton >= 3.4 and
  < 3.7.1 unless tilelang is installed (fla issue #640: that Triton miscompiles it). Problems
  that would take the gated kernel (any decay, or fp32 inputs) are not dispatched there
  (``gated_kernel_ok``); the pure-PyTorch path runs them.
- ``first_order`` / ``truncate`` / ``stop`` gradients cannot be expressed through fla's autograd
  functions and are rejected, as are head dims over 256 (fla's limit) and float64.
- fla's autograd functions do not compose with ``torch.func``: this replaces a whole inner loop,
  which is how the executors call it.

``NESTLEARN_FLA=0`` (or ``false``/``off``/``no``) disables the dispatch (e.g. to time or debug the
pure-PyTorch path). The carried state matches ``loops/delta.py``'s: fp32 (at least) final
weights as both ``params`` and ``anchor``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nestlearn.loops.chunks import per_token
from nestlearn.loops.common import MemoryProblem, MemoryState
from nestlearn.loops.delta import carried_weights
from nestlearn.loops.delta import supports as delta_supports

ALPHA_MIN = 1e-6
"""Floor on ``alpha_t = 1 - decay_t`` on the gated path (its ``beta`` is divided by alpha)."""

MAX_HEAD_DIM = 256  # fla's chunk kernels assert K <= 256
FLA_CHUNKS = (16, 32, 64)  # the chunk sizes fla's chunk kernels accept
_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class FlaKernels:
    chunk_delta_rule: Callable[..., tuple[Tensor, Tensor]]
    chunk_gated_delta_rule: Callable[..., tuple[Tensor, Tensor]]


@functools.lru_cache(maxsize=1)
def kernels() -> FlaKernels | None:
    """fla's two chunk kernels, or ``None`` where fla (or its triton) cannot be imported."""
    try:
        delta = importlib.import_module("fla.ops.delta_rule")
        gated = importlib.import_module("fla.ops.gated_delta_rule")
        return FlaKernels(delta.chunk_delta_rule, gated.chunk_gated_delta_rule)
    except Exception:  # ImportError, or triton failing to initialise without a GPU
        return None


def enabled() -> bool:
    """The user's switch: ``NESTLEARN_FLA`` unset or anything but 0/false/off/no."""
    return os.environ.get("NESTLEARN_FLA", "1").strip().lower() not in ("0", "false", "off", "no")


def available(pb: MemoryProblem | None = None) -> bool:
    """fla is enabled and importable and, given ``pb``, its tensors live on a CUDA device
    (without ``pb``: a CUDA device exists). Cheap checks first: CPU problems never import fla."""
    if not enabled():
        return False
    if pb is None:
        if not torch.cuda.is_available():
            return False
    else:
        tensors = [pb.q, pb.k, pb.v, *(h for h in pb.hp.values() if isinstance(h, Tensor))]
        if not all(t.is_cuda and t.device == pb.q.device for t in tensors):
            return False
    return kernels() is not None


def fp32_allowed() -> bool:
    """fp32 inputs run fla's kernels in TF32 unless triton is told otherwise (see the module doc)."""
    return (os.environ.get("TRITON_F32_DEFAULT", "").lower() in ("ieee", "tf32x3")
            or torch.get_float32_matmul_precision() != "highest")


def supports(pb: MemoryProblem) -> bool:
    """True exactly where fla's chunk kernels compute our recurrence (module doc): the
    ``loops/delta.py`` problems with ``grad: unroll``, fp16/bf16 (or fp32, see ``fp32_allowed``)
    inputs of one dtype, head dims <= 256."""
    if not delta_supports(pb) or pb.grad.kind != "unroll":
        return False
    q, k, v = pb.q, pb.k, pb.v
    if not (q.dtype == k.dtype == v.dtype) or q.dim() != 4 or q.shape[2] == 0:
        return False
    if q.dtype not in _LOW_PRECISION and not (q.dtype == torch.float32 and fp32_allowed()):
        return False
    if q.shape[-1] != k.shape[-1] or k.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return False
    if (has_decay(pb) or q.dtype not in _LOW_PRECISION) and not gated_kernel_ok(q.device):
        return False
    return all(not isinstance(h, Tensor) or h.dim() <= 3 for h in pb.hp.values())


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:3])


@functools.lru_cache(maxsize=8)
def gated_kernel_ok(device: torch.device) -> bool:
    """False where fla's gated kernel would refuse its backward (Hopper, Triton [3.4, 3.7.1),
    no tilelang): see the module doc."""
    if device.type != "cuda":
        return True
    try:
        triton = importlib.import_module("triton")
    except Exception:
        return False
    hopper = torch.cuda.get_device_capability(device)[0] == 9
    buggy = (3, 4, 0) <= _version(triton.__version__) < (3, 7, 1)
    return not (hopper and buggy) or importlib.util.find_spec("tilelang") is not None


def has_decay(pb: MemoryProblem) -> bool:
    """Whether ``pb`` needs the gated kernel for its decay (a tensor decay always does)."""
    dec = pb.hp.get("decay", 0.0)
    return isinstance(dec, Tensor) or float(dec) != 0.0


@dataclass
class FlaArgs:
    """fla's arguments for one problem: ``q, k, v [B, T, H, D]`` in the inputs' dtype,
    ``beta, g [B, T, H]`` and ``h0 [B, H, K, V]`` in fp32 at least (``g is None``: no decay)."""

    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor
    g: Tensor | None
    h0: Tensor
    scale: float = 1.0


def to_fla(pb: MemoryProblem, state: MemoryState) -> FlaArgs:
    """Map ``pb`` and its carried state to fla's conventions (exact; see the module doc)."""
    wdt = torch.promote_types(pb.q.dtype, torch.float32)
    ref = pb.q[..., 0].to(wdt)  # [B, H, T]
    beta = 2.0 * per_token(pb.hp.get("lr", 0.0), ref)  # l2 is not halved: its gradient carries 2
    v = pb.v
    g: Tensor | None = None
    if has_decay(pb):
        alpha = (1.0 - per_token(pb.hp.get("decay", 0.0), ref)).clamp_min(ALPHA_MIN)
        g = torch.log(alpha)
        beta = beta / alpha
        v = (v.to(wdt) * alpha.unsqueeze(-1)).to(pb.v.dtype)
    h0 = state["params"]["W"].to(wdt).transpose(-1, -2)  # ours [B,H,dv,dk] -> fla's [B,H,K,V]
    bthd = lambda x: x.transpose(1, 2)  # noqa: E731  [B,H,T,...] -> [B,T,H,...]
    return FlaArgs(bthd(pb.q), bthd(pb.k), bthd(v), bthd(beta), None if g is None else bthd(g), h0)


def from_fla(pb: MemoryProblem, state: MemoryState, o: Tensor, ht: Tensor) -> tuple[Tensor, MemoryState]:
    """fla's ``o [B, T, H, V]`` and final state ``[B, H, K, V]`` back to our output and state."""
    y = o.transpose(1, 2).to(pb.q.dtype)
    w = ht.transpose(-1, -2)
    return y, carried_weights(state, w, pb.q.shape[2])


def call_kernels(fk: FlaKernels, a: FlaArgs, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Run fla on mapped arguments: ``chunk_delta_rule`` for fp16/bf16 without decay,
    ``chunk_gated_delta_rule`` otherwise (fla's delta-rule kernel refuses fp32)."""
    kw: dict[str, Any] = dict(scale=a.scale, initial_state=a.h0, output_final_state=True,
                              use_qk_l2norm_in_kernel=False, chunk_size=chunk)
    if a.g is None and a.q.dtype in _LOW_PRECISION:
        return fk.chunk_delta_rule(q=a.q, k=a.k, v=a.v, beta=a.beta, **kw)
    g = a.g if a.g is not None else torch.zeros_like(a.beta)
    return fk.chunk_gated_delta_rule(q=a.q, k=a.k, v=a.v, g=g, beta=a.beta, **kw)


def run_fla(pb: MemoryProblem, state: MemoryState, chunk: int | None = None) -> tuple[Tensor, MemoryState]:
    """Executor entry, same contract as ``run_delta`` for problems ``supports`` accepts (on
    CUDA, with ``available``). ``chunk`` is an execution detail (the math is exact): fla's
    kernels take 16, 32 or 64; anything else runs at 64."""
    fk = kernels()
    if fk is None:
        raise RuntimeError("flash-linear-attention is not importable; check fla_backend.available() first")
    o, ht = call_kernels(fk, to_fla(pb, state), chunk if chunk in FLA_CHUNKS else 64)
    return from_fla(pb, state, o, ht)
