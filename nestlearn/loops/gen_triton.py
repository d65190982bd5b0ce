"""HOPE's generators on the fused Triton kernel (``loops/triton/gen_dgd.py``) where it computes
exactly what the op's chunk loop does (``SelfModOp._generate_loop``): keys, values, raw gates and the
generators' carried state.

``generate`` takes a call when all of these hold (anything else returns None and the loop runs):

- the tensors live on one CUDA device (NVIDIA), in fp32 or under CUDA autocast (the kernel then
  runs the generators in fp32, as every in-context loop runs; the loop's projections ``x G^T``
  would be half precision there, so the two agree to that rounding), and triton is installed and
  not switched off (``NESTLEARN_TRITON=0``);
- no gradient is wanted (grad mode off, or nothing requires one): evaluation and generation.
  Training keeps the loop (its backward is autograd's) until the kernel has a backward;
- no CUDA graph is being captured. On an H100 (2026-12-07, ``python -m bench.triton_gen``, HOPE's
  generators at 8 x 2,048, 8 heads of 64, chunk 64; ``bench/results/h100_2026-12-07_session10/``)
  the kernel took 21.4 ms against 74.9 ms for the loop run eagerly (3.5x), but the loop replayed
  from a CUDA graph took 10.2 ms: its batched matmuls use the whole GPU, while the kernel's 64
  programs walk their 32 chunks at about 660 us each (chunk 64: ptxas spills 6.2 KB a thread);
- the level's rule is DGD with ``lr`` / ``decay`` / ``beta`` only (no own ``proj``), its
  objective ``l2``, its gradient mode anything (no gradient flows), the executor ``auto``;
- the generators' period and the head width are powers of two in 16..64 and 16..128, the call
  starts at a generator chunk boundary (``offset`` 0) with at least one whole chunk: the kernel
  takes the whole chunks, the loop a trailing partial one and every call that starts mid-chunk
  (a generation step of one token).

The first use says so once (a warning naming the switch). Products are fp32 (``ieee``) unless
the user allowed TF32 matmuls (``dgd_triton.precision``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from nestlearn import objectives
from nestlearn.loops import triton as kernels
from nestlearn.loops.chunks import per_token
from nestlearn.loops.common import MemoryState
from nestlearn.loops.dgd_triton import CHUNKS, WIDTHS, precision


def device_ok(xh: Tensor) -> bool:
    """A CUDA tensor (NVIDIA) and the kernels available and switched on (the tests lift this to
    run the kernel through Triton's interpreter on the CPU)."""
    return xh.is_cuda and torch.version.hip is None and kernels.enabled() and kernels.importable()


def supports(level: Any, xh: Tensor, state: MemoryState, tensors: list[Tensor], max_proj: float | None,
             period: int) -> bool:
    """True where ``generate`` runs the kernel (module docstring); cheap checks first."""
    from nestlearn.rules.dgd import DGD

    if not device_ok(xh):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if kernels.capturing(xh):  # the loop replays faster from a graph (module docstring)
        return False
    rule = level.rule
    return (isinstance(rule, DGD) and set(rule.hypers) <= {"lr", "decay", "beta"} and max_proj is None
            and level.spec.max_gain is None  # the kernel has the clip, not the gain cap
            and level.objective is objectives.l2 and level.executor == "auto"
            and xh.shape[-1] in WIDTHS and period in CHUNKS and state["offset"] == 0 and xh.shape[2] >= period
            and all(t.device == xh.device for t in tensors))


def generate(level: Any, xh: Tensor, state: MemoryState, bias: Tensor, beta: dict[str, Tensor | float],
             lr_scale: float, decay_scale: float, max_proj: float | None, period: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, MemoryState] | None:
    """``(k, v, lr_raw, decay_raw, state)`` over the call's whole generator chunks from the kernel
    (the caller runs a trailing partial chunk), or None where it does not apply."""
    w, m = state["params"]["W"], state["opt"].get("m", {}).get("W")
    if m is None:  # a rule without momentum (not DGD)
        return None
    b = beta.get("beta", 0.0)
    tensors = [xh, w, m, bias] + ([b] if isinstance(b, Tensor) else [])
    if not supports(level, xh, state, tensors, max_proj, period):
        return None
    from nestlearn.loops.triton.gen_dgd import gen_dgd_fwd

    f32 = torch.float32
    xh = xh[:, :, : xh.shape[2] // period * period]
    beta_t = per_token(b.to(f32) if isinstance(b, Tensor) else float(b), xh[..., 0].to(f32))
    with torch.autocast("cuda", enabled=False):
        out = gen_dgd_fwd(xh.to(f32), w.to(f32), m.to(f32), bias.to(f32), beta_t, chunk=period,
                          lr_scale=lr_scale, decay_scale=decay_scale, clip=level.spec.clip, precision=precision())
    _say_once()
    dt = xh.dtype
    new = MemoryState(params={"W": out.weights.to(w.dtype)}, opt={"m": {"W": out.momentum.to(m.dtype)}},
                      anchor={"W": out.anchor.to(w.dtype)}, offset=0, chunks=state["chunks"] + xh.shape[2] // period)
    return out.k.to(dt), out.v.to(dt), out.lr_raw.to(dt), out.decay_raw.to(dt), new


_said = False


def _say_once() -> None:
    global _said
    if not _said:
        _said = True
        warnings.warn("nestlearn: HOPE's generators run on a fused Triton kernel for evaluation and generation "
                      "(NESTLEARN_TRITON=0 switches the kernels off)", stacklevel=4)
