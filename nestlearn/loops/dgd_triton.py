"""The executor row ``dgd_triton``: HOPE's self-modifying memory on the fused Triton kernel
(``loops/triton/dgd_mlp.py``) where it computes exactly what ``dgd_dual`` does, outputs, carried
state and (training) every outer gradient.

It takes a problem when all of these hold (``supports``; anything else runs ``dgd_dual``):

- the tensors live on one CUDA device (NVIDIA: the kernel is untried on ROCm), in fp32 (or half
  precision under autocast: ``loops.run`` casts such problems to fp32 first), and triton is
  installed and not switched off (``NESTLEARN_TRITON=0``);
- no gradient will be asked for (grad mode off, or none of q / k / v / the gates requires one:
  evaluation, generation), or the level's gradient mode is ``unroll`` (training): the kernel then
  runs as ``dgd_mlp.DGDMLPFunction``, whose backward is the fused Triton backward kernel
  (``dgd_mlp_bwd.py``, from the state the forward saved at every chunk), with the recompute of
  groups of chunks through ``dgd_dual`` as its fallback (its docstring). ``first_order``,
  ``stop`` and ``truncate:N`` with gradients stay on ``dgd_dual``; the carried state is checked
  in ``run_dgd_triton`` (the table's ``supports`` sees no state) by the same rule;
- the memory is exactly HOPE's: ``MLPMemory`` of depth 2, ``expand: 1`` (hidden = width),
  ``gelu``, residual, no bias, width a power of two in 16..128; the rule DGD with ``lr`` /
  ``decay`` / ``beta`` hyper-parameters only; the ``l2`` objective; an in-chunk read (not
  ``read: chunk_start``); a period that is a power of two in 16..64 (``tl.dot`` needs 16).

The kernel runs whole chunks from a chunk boundary; ``run_dgd_triton`` gives the rest of a
chunk already begun (a carried ``offset``) and a trailing partial chunk to ``dgd_dual``, so any
call is exact (token-by-token generation stays on the closed form; a whole prompt takes the
kernel). The first use says so once (a warning naming the switch). Its products are fp32
(``ieee``) unless the user allowed TF32 matmuls, as for the closed form (``precision``).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import Tensor

from nestlearn import objectives
from nestlearn.loops import triton as kernels
from nestlearn.loops.chunks import hp_tokens, on_whole_chunks
from nestlearn.loops.common import MemoryProblem, MemoryState
from nestlearn.loops.dgd_dual import run_dgd_dual

WIDTHS = (16, 32, 64, 128)
"""Head widths the kernel takes: powers of two (``tl.arange``), >= 16 (``tl.dot``), <= 128 (four
``D x D`` fp32 matrices held on-chip per program)."""
CHUNKS = (16, 32, 64)
"""Periods (chunk lengths) it takes: the ``n x n`` gate algebra and solve stay small."""
HYPERS = {"lr", "decay", "beta"}


def supports(pb: MemoryProblem) -> bool:
    """True where the kernel computes ``pb`` exactly (module docstring); cheap checks first, so
    a CPU problem never looks further than its device."""
    if not (pb.q.is_cuda and torch.version.hip is None and kernels.enabled() and kernels.importable()):
        return False
    return (_shape_ok(pb) and _tensors_ok(pb) and _grad_ok(pb, _tensors(pb))
            and _size(pb) not in _too_big)


def _shape_ok(pb: MemoryProblem) -> bool:
    """The memory, rule, objective and read HOPE ships (device-independent: the tests use it)."""
    from nestlearn.memories import MLPMemory
    from nestlearn.rules.dgd import DGD

    arch = pb.arch
    return (type(arch) is MLPMemory and arch.depth == 2 and arch.act == "gelu" and arch.residual
            and not arch.bias and arch.d_in == arch.d_out == arch.hidden and arch.d_in in WIDTHS
            and isinstance(pb.rule, DGD) and set(pb.hp) <= HYPERS and "lr" in pb.hp
            and pb.objective is objectives.l2 and not pb.read_start and pb.period in CHUNKS
            and pb.max_gain is None)  # the kernel has the clip, not the gain cap: dgd_dual runs that


def _tensors(pb: MemoryProblem) -> list[Tensor]:
    return [pb.q, pb.k, pb.v, *(h for h in pb.hp.values() if isinstance(h, Tensor))]


def _tensors_ok(pb: MemoryProblem) -> bool:
    """One CUDA device; fp32, or half precision under CUDA autocast (``loops.run`` then hands
    every executor but fla an fp32 copy of the problem)."""
    ts = _tensors(pb)
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if torch.is_autocast_enabled("cuda") else (torch.float32,)
    return (pb.q.dim() == 4 and all(t.device == pb.q.device and t.dtype in dtypes for t in ts)
            and pb.q.shape[-1] == pb.arch.d_in)


def _grad_wanted(ts: list[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _grad_ok(pb: MemoryProblem, ts: list[Tensor]) -> bool:
    """No gradient wanted, or the one the kernel's backward computes (``unroll``) unless the user
    kept training on the closed form (``NESTLEARN_TRITON=infer``)."""
    return (pb.grad.kind == "unroll" and kernels.training_enabled()) or not _grad_wanted(ts)


def _state_tensors(state: MemoryState) -> list[Tensor]:
    return [*state["params"].values(), *state["opt"]["m"].values()]


def run_dgd_triton(pb: MemoryProblem, state: MemoryState) -> tuple[Tensor, MemoryState]:
    """``run_dgd_dual``'s result, with the whole chunks on the kernel: the rest of a begun chunk
    first and a trailing partial chunk last go to ``run_dgd_dual`` (module docstring)."""
    ts = _tensors(pb) + _state_tensors(state)
    if not _grad_ok(pb, ts) or any(t.dtype != torch.float32 or t.device != pb.q.device for t in ts):
        return run_dgd_dual(pb, state)
    # every gate as [B, H, T] (expanded views, no copies) so that slices cut tokens
    pb = replace(pb, hp={n: hp_tokens(pb, n) for n in pb.hp})
    return on_whole_chunks(pb, state, _kernel_or_none, run_dgd_dual)


def _kernel_or_none(pb: MemoryProblem, state: MemoryState) -> tuple[Tensor, MemoryState] | None:
    """``_run_kernel``, or None where the kernel does not fit the device (said once per size)."""
    try:
        out = _run_kernel(pb, state)
    except Exception as exc:  # a device without the shared memory / registers this size needs
        if type(exc).__name__ != "OutOfResources":
            raise
        _too_big.add(_size(pb))
        warnings.warn(f"nestlearn: the fused DGD kernel does not fit this device at width {pb.arch.d_in}, "
                      f"chunk {pb.period} ({exc}); the closed form runs instead", stacklevel=4)
        return None
    _say_once()
    return out


def _size(pb: MemoryProblem) -> tuple[int, int, torch.device]:
    return pb.arch.d_in, pb.period, pb.q.device


_too_big: set[tuple[int, int, torch.device]] = set()
"""Sizes whose launch ran out of resources on a device (the shared memory grows with width and
chunk: ~60 KB at 64 / 16, ~150 KB at 128 / 16, ~210 KB at 64 / 64 on sm_90): refused after."""


def _run_kernel(pb: MemoryProblem, state: MemoryState) -> tuple[Tensor, MemoryState]:
    """Whole chunks from a chunk boundary on ``dgd_mlp`` (the kernel, differentiable where a
    gradient is wanted; imported here: importing the kernel module decorates it, which must
    follow any ``TRITON_INTERPRET`` setting)."""
    from nestlearn.loops.triton.dgd_mlp import dgd_mlp

    p, m = state["params"], state["opt"]["m"]
    lr, decay, beta = hp_tokens(pb, "lr"), hp_tokens(pb, "decay"), hp_tokens(pb, "beta")
    out = dgd_mlp(pb.q, pb.k, pb.v, lr, decay, beta, (p["W0"], p["W1"]), (m["W0"], m["W1"]),
                  chunk=pb.period, clip=pb.clip, precision=precision(), compiled=pb.compiled)
    new = MemoryState(params={"W0": out.weights[0], "W1": out.weights[1]},
                      opt={"m": {"W0": out.momenta[0], "W1": out.momenta[1]}},
                      anchor={"W0": out.anchor[0], "W1": out.anchor[1]}, offset=0,
                      chunks=state["chunks"] + pb.q.shape[2] // pb.period)
    return out.y, new


def precision() -> str:
    """The kernel's ``tl.dot`` precision: fp32 (``ieee``) unless the user allowed TF32 matmuls
    (``torch.set_float32_matmul_precision("high")`` or lower), as the closed form's matmuls would."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


_said = False


def _say_once() -> None:
    global _said
    if not _said:
        _said = True
        warnings.warn("nestlearn: DGD on the MLP memory runs on the fused Triton kernels, forward and backward "
                      "(NESTLEARN_TRITON=infer trains through the closed form instead; NESTLEARN_TRITON=0 "
                      "switches the kernels off)", stacklevel=3)
