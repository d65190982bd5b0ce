"""Fused Triton kernels for the closed-form chunk steps (issue 12), found at run time.

The pure-PyTorch closed forms in ``loops/`` stay the reference and the CPU path; a kernel here
computes exactly the same numbers (within fp32 rounding) with fewer launches. Each kernel module
has its plain reference next to it and is imported only when a problem can run on it, so that
importing ``nestlearn`` never imports triton (and tests can set ``TRITON_INTERPRET=1`` before
the kernels are decorated).

- ``dgd_mlp``: the forward of DGD's chunk recurrence on HOPE's 2-layer MLP memory, one
  persistent program per (batch, head) over all chunks, and ``DGDMLPFunction``, its
  ``autograd.Function`` (``loops/dgd_triton.py`` wires both in), whose backward is
  ``dgd_mlp_bwd``'s fused kernel (the same persistent walk, chunks in reverse, from a checkpoint
  per chunk; ``dgd_mlp_bwd_ref`` is its plain-PyTorch spec), or recomputes groups of chunks
  through ``dgd_dual`` from checkpoints the kernel saves (``backward="recompute"``, and the
  fallback where the backward kernel does not fit the device).
- ``sgd_mlp``: the CMS levels' chunk step (SGD on an in-context MLP), split over programs by
  hidden tiles, four launches per chunk, with ``sgd_mlp_bwd``'s fused backward
  (``loops/cms_triton.py``; ``sgd_mlp_bwd_ref`` is its spec); ``sgd_mlp_rev`` trains over
  many chunks with the chunk-start weights rebuilt in the backward instead of saved.
- ``gen_dgd``: HOPE's generators over a whole call, forward only, one persistent program per
  (batch, head) (``loops/gen_triton.py``; the op's chunk loop is its reference).

``NESTLEARN_TRITON=0`` (or ``false``/``off``/``no``) switches every kernel here off, and
``NESTLEARN_TRITON=infer`` keeps them for evaluation and generation only (training then runs the
compiled closed form: more memory, slower). By default training goes through them too, with the
fused backward: on an H100 (2026-12-06, ``python -m bench.triton_dgd --train``, HOPE's memory at
8 x 2,048, 8 heads of 64) forward + backward ran at 157.0K tokens/s against 31.6K for the closed
form with compiled chunk steps (690 against 1,724 MiB at the peak), every gradient within 3e-6
of eager autograd; the recompute backward ran at 36.7K. (``train``, the earlier opt-in, is still
accepted and means the default.)
"""

from __future__ import annotations

import functools
import importlib.util
import os


def enabled() -> bool:
    """The user's switch: ``NESTLEARN_TRITON`` unset or anything but 0/false/off/no."""
    return os.environ.get("NESTLEARN_TRITON", "1").strip().lower() not in ("0", "false", "off", "no")


def training_enabled() -> bool:
    """Gradients too go through the kernels: on unless ``NESTLEARN_TRITON`` is ``infer`` (or off)."""
    return enabled() and os.environ.get("NESTLEARN_TRITON", "1").strip().lower() != "infer"


@functools.lru_cache(maxsize=1)
def importable() -> bool:
    """triton is installed (checked without importing it: that happens at the first launch)."""
    return importlib.util.find_spec("triton") is not None


def capturing(x: object) -> bool:
    """``x`` is a CUDA tensor and its stream is capturing a CUDA graph: where a kernel is slower
    than the closed form replayed from the graph (the CMS row's compiled steps, the generators),
    the callers keep the closed form."""
    import torch

    return bool(getattr(x, "is_cuda", False)) and torch.cuda.is_current_stream_capturing()
