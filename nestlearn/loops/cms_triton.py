"""The executor row ``cms_triton``: HOPE's CMS levels (an in-context ``mlp`` node under ``sgd``)
on the Triton chunk step (``loops/triton/sgd_mlp.py``) where it computes exactly what ``dual``
does: outputs, carried state and (training) every outer gradient.

It takes a problem when all of these hold (``supports``; anything else runs ``run_dual``):

- without gradients (evaluation, generation), and in training (the fused backward), compiled
  chunk steps (``--compile``) inside a CUDA graph included since the fifteenth session: there the
  compiled closed form had been a little faster, but it saves every chunk's weights for the
  backward, which the kernel's training node no longer does (below). On an H100 (2026-12-07,
  ``python -m bench.triton_cms``, c1's shape: 8 x 2,048, 512 -> 1,024 -> 512, chunk 16, forward
  + backward, same process; ``bench/results/h100_2026-12-07_session10/``) the kernels took
  92.5 ms eagerly against 146.2 ms for the compiled closed form and 229.5 ms for the eager one,
  75.8 ms from a CUDA graph against 71.7 ms for the compiled closed form in one (4,305 against
  4,804 MiB at the peak; gradients within 2.2e-6), both before the rebuilt start weights.
  ``NESTLEARN_CMS_TRITON=infer`` takes the kernel only without gradients, ``0`` never;
- the tensors live on one CUDA device (NVIDIA), in fp32 (or half precision under autocast:
  ``loops.run`` casts such problems to fp32 first), and triton is installed and not switched
  off (``NESTLEARN_TRITON=0``);
- no gradient will be asked for (grad mode off, or nothing requires one: evaluation,
  generation), or the level's gradient mode is ``unroll`` (training) and the user did not keep
  training on the closed form (``NESTLEARN_TRITON=infer``): each chunk is then a
  ``sgd_mlp.SGDMLPStep``, whose backward is ``sgd_mlp_bwd``'s fused kernels. ``first_order``,
  ``stop`` and ``truncate:N`` with gradients stay on ``run_dual``;
- the memory is exactly what an in-context ``mlp`` node builds (``compile/ops.py``):
  ``MLPMemory`` of depth 2, ``gelu``, no residual, no biases, widths multiples of 16; the rule
  ``sgd`` (``Momentum`` without ``beta``, forgetting toward zero) with a ``lr`` (a constant or a
  gate) and no decay (absent or the constant 0); the ``l2`` objective, with or without the
  level's ``clip`` and ``max_gain`` (each token's rate scaled by ``sgd_mlp_rev.scaled_rate``); a period
  that is a multiple of 16 up to ``sgd_mlp.MAX_CHUNK`` (64). ``read: chunk_start`` is taken too.

In training over two or more chunks the whole chunks are one ``sgd_mlp_rev.SGDMLPChunks`` node:
it keeps each chunk's error signals and every 16th chunk-start weights, and rebuilds the others
in the backward (about 8x less saved memory at HOPE's fast level: the 4 MB per sequence and
chunk of saved weights was most of HOPE's memory at 8 x 2,048; ``NESTLEARN_CMS_KEEP_EVERY``,
``1``: one ``SGDMLPStep`` per chunk, every start weight saved).

The kernel runs whole chunks from a chunk boundary; ``run_cms_triton`` gives the rest of a chunk
already begun (a carried ``offset``) and a trailing partial chunk to ``run_dual``, so any call is
exact. The first use says so once (a warning naming the switch). Its products are fp32 (``ieee``)
unless the user allowed TF32 matmuls, as for the closed form (``dgd_triton.precision``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace

import torch
from torch import Tensor

from nestlearn import objectives
from nestlearn.loops import triton as kernels
from nestlearn.loops.chunks import hp_tokens, on_whole_chunks
from nestlearn.loops.common import MemoryProblem, MemoryState, detach_tree
from nestlearn.loops.dgd_triton import precision
from nestlearn.loops.dual import forgets_nothing, run_dual

MAX_CHUNK = 64
"""``sgd_mlp.MAX_CHUNK``, repeated here: importing the kernel module imports triton."""


def mode() -> str:
    """``NESTLEARN_CMS_TRITON``: ``auto`` (unset) or ``train`` (1/true/on/yes/train): training
    too; ``infer``: no-grad calls only; ``off`` (0/false/off/no)."""
    value = os.environ.get("NESTLEARN_CMS_TRITON", "auto").strip().lower()
    if value in ("1", "true", "on", "yes", "train"):
        return "train"
    if value in ("0", "false", "off", "no"):
        return "off"
    return "infer" if value == "infer" else "auto"


def trains() -> bool:
    """Training goes through the kernel: ``train`` or ``auto`` (module docstring)."""
    return mode() in ("train", "auto")


def supports(pb: MemoryProblem) -> bool:
    """True where the kernel computes ``pb`` exactly and the user opted in (module docstring); the
    device first, so a CPU problem never looks further."""
    if not (pb.q.is_cuda and mode() != "off" and torch.version.hip is None and kernels.enabled() and kernels.importable()):
        return False
    return shape_ok(pb) and _tensors_ok(pb) and _grad_ok(pb, _tensors(pb))


def shape_ok(pb: MemoryProblem) -> bool:
    """The memory, rule, objective and period of a CMS level (device-independent: the tests use it)."""
    from nestlearn.memories import MLPMemory
    from nestlearn.rules.momentum import Momentum

    arch, rule = pb.arch, pb.rule
    return (type(arch) is MLPMemory and arch.depth == 2 and arch.act == "gelu" and not arch.residual
            and not arch.bias and all(w % 16 == 0 for w in arch.widths)
            and type(rule) is Momentum and not rule.has_momentum and rule.decay_to == "zero"
            and set(pb.hp) <= {"lr", "decay"} and "lr" in pb.hp and forgets_nothing(pb)
            and pb.objective is objectives.l2
            and pb.period % 16 == 0 and 16 <= pb.period <= MAX_CHUNK)


def _tensors(pb: MemoryProblem) -> list[Tensor]:
    return [pb.q, pb.k, pb.v, *(h for h in pb.hp.values() if isinstance(h, Tensor))]


def _tensors_ok(pb: MemoryProblem) -> bool:
    """One CUDA device; fp32, or half precision under CUDA autocast (``loops.run`` then hands the
    executor an fp32 copy of the problem)."""
    ts = _tensors(pb)
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if torch.is_autocast_enabled("cuda") else (torch.float32,)
    return (pb.q.dim() == 4 and all(t.device == pb.q.device and t.dtype in dtypes for t in ts)
            and pb.q.shape[-1] == pb.arch.d_in and pb.v.shape[-1] == pb.arch.d_out)


def _grad_wanted(ts: list[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _grad_ok(pb: MemoryProblem, ts: list[Tensor]) -> bool:
    """No gradient wanted, or the one the kernel's backward computes (``unroll``) unless the user
    kept training on the closed form (``NESTLEARN_TRITON=infer``)."""
    return (pb.grad.kind == "unroll" and kernels.training_enabled() and trains()) or not _grad_wanted(ts)


def run_cms_triton(pb: MemoryProblem, state: MemoryState) -> tuple[Tensor, MemoryState]:
    """``run_dual``'s result, with the whole chunks on the kernel: the rest of a begun chunk first
    and a trailing partial chunk last go to ``run_dual`` (module docstring)."""
    ts = _tensors(pb) + list(state["params"].values())
    if (state["opt"] or not _grad_ok(pb, ts) or set(state["params"]) != {"W0", "W1"}
            or any(t.dtype != torch.float32 or t.device != pb.q.device for t in ts)):
        return run_dual(pb, state)
    pb = replace(pb, hp={**pb.hp, "lr": hp_tokens(pb, "lr")})  # [B, H, T] (an expanded view) so slices cut tokens
    return on_whole_chunks(pb, state, _kernel_said, run_dual)


def _kernel_said(pb: MemoryProblem, state: MemoryState) -> tuple[Tensor, MemoryState]:
    out = _run_kernel(pb, state)
    _say_once()
    return out


def _run_kernel(pb: MemoryProblem, state: MemoryState) -> tuple[Tensor, MemoryState]:
    """Whole chunks from a chunk boundary, one kernel step each, with ``run_segments``' graph cuts
    (``stop`` / ``truncate:N``: only without gradients here, where they change no value). The
    kernel module is imported here: importing it decorates the kernels, which must follow any
    ``TRITON_INTERPRET`` setting."""
    from nestlearn.loops.triton.sgd_mlp import sgd_mlp_step
    from nestlearn.loops.triton.sgd_mlp_rev import scaled_rate

    n, prec = pb.period, precision()
    stop = pb.grad.kind == "stop"
    params, chunks = state["params"], state["chunks"]
    if _rebuilds(pb, state):  # training: one node over the chunks, start weights rebuilt in its backward
        from nestlearn.loops.triton.sgd_mlp_rev import sgd_mlp_chunks

        out = sgd_mlp_chunks(pb.q, pb.k, pb.v, hp_tokens(pb, "lr"), params["W0"], params["W1"], chunk=n,
                             precision=prec, read_start=pb.read_start, scale=pb.token_scale)
        return out.y, MemoryState(params={"W0": out.weights[0], "W1": out.weights[1]}, opt={},
                                  anchor={"W0": out.anchor[0], "W1": out.anchor[1]}, offset=0,
                                  chunks=chunks + pb.q.shape[2] // n)
    anchor = params
    lr = hp_tokens(pb, "lr")
    ys = []
    for t0 in range(0, pb.q.shape[2], n):
        if stop or pb.grad.cuts_at(chunks):
            params = detach_tree(params)
        anchor = params
        chunks += 1
        sl = slice(t0, t0 + n)
        rate = lr[:, :, sl]
        if pb.token_scale:  # the per-token clip / gain cap as a scale of the rate (differentiable: autograd takes it)
            rate = scaled_rate(params["W0"], params["W1"], pb.k[:, :, sl], pb.v[:, :, sl], rate, pb.token_scale)
        y, w0, w1 = sgd_mlp_step(pb.q[:, :, sl], pb.k[:, :, sl], pb.v[:, :, sl], rate, params["W0"],
                                 params["W1"], precision=prec, read_start=pb.read_start, compiled=pb.compiled)
        params = {"W0": w0, "W1": w1}
        ys.append(y)
    y_all = ys[0] if len(ys) == 1 else torch.cat(ys, 2)
    return y_all, MemoryState(params=params, opt={}, anchor=anchor, offset=0, chunks=chunks)


def _rebuilds(pb: MemoryProblem, state: MemoryState) -> bool:
    """Training over two or more chunks (``grad: unroll``, so no cut) with the rebuilt start
    weights not switched off (``NESTLEARN_CMS_KEEP_EVERY=1``): ``sgd_mlp_rev``'s one node, which
    saves the chunks' error signals and every 16th start weights instead of every chunk's
    (module docstring of ``loops/triton/sgd_mlp_rev.py``)."""
    from nestlearn.loops.triton.sgd_mlp_rev import keep_every

    ts = _tensors(pb) + list(state["params"].values())
    return (pb.grad.kind == "unroll" and _grad_wanted(ts) and pb.q.shape[2] >= 2 * pb.period
            and keep_every() > 1)


_said = False


def _say_once() -> None:
    global _said
    if not _said:
        _said = True
        warnings.warn("nestlearn: the CMS levels (SGD on the MLP memory) run on the Triton chunk step "
                      + ("without gradients (NESTLEARN_CMS_TRITON=1 trains through it too)" if mode() == "infer"
                         else "and its fused backward (NESTLEARN_CMS_TRITON=infer: evaluation only)")
                      + "; NESTLEARN_CMS_TRITON=0 or NESTLEARN_TRITON=0 switches it off", stacklevel=3)
