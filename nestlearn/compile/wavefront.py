"""The blocks of a model as a wavefront over segments of the sequence.

A block reads its input sequence left to right and carries its in-context state (fast weights,
momenta, a convolution's tail, an attention cache) from one call to the next, so running it on
the segments of a sequence one after another, carrying the state, equals running it on the
whole sequence (``tests/test_wavefront.py`` checks every shipped spec in float64). Block
``b + 1``'s segment ``s`` then needs only block ``b``'s segment ``s`` and its own segment
``s - 1``. With ``n`` segments and depth ``L`` the work forms ``n + L - 1`` diagonals, and the
blocks of one diagonal are independent:

    diagonal:   0       1        2        3  ...
    block 0:   (0,0)   (0,1)    (0,2)    (0,3)
    block 1:           (1,0)    (1,1)    (1,2)
    block 2:                    (2,0)    (2,1)

**On CUDA each block runs on its own stream by default.** The stream path once gave different
gradients (an H200, 2026-12-06: 0.59 of the largest entry for HOPE in bf16; the graphed path on
an H100: 6.6e-4 relative in fp32). ``_Handoff`` records each gradient on the stream that reads it,
and since then ``python -m bench.wavefront_check`` has found the stream path, eager and captured
in a CUDA graph, equal to the one-stream order to the digit in fp32 on two H100 machines
(2026-12-07; HOPE 2.91e-5 from the block loop either way, Titans-MAL 6.5e-6). The bf16 figure of
0.59 at HOPE's full size is the same for the one-stream order: it is the reordering in bf16, not
the streams (on the CPU HOPE's bf16 block loop is itself 0.70 of the largest entry away from its
fp32 gradients, and the wavefront 0.63; ``python -m bench.wavefront`` prints both).
``NESTLEARN_WAVEFRONT_STREAMS=0`` runs the same diagonal order on the caller's stream instead
(no overlap). Two debugging switches go with it: ``NESTLEARN_WAVEFRONT_SYNC=1`` synchronises the
device after every block-segment, and ``NESTLEARN_WAVEFRONT_HANDOFF=0`` drops ``_Handoff``.
``python -m bench.wavefront_check`` runs each way against the block loop and prints where the
differences start.

With the streams, each block runs on its own stream, and a segment waits on an event for the block below
it. A launch-bound model (HOPE's chunk recurrences: chains of small kernels, persistent kernels
with one program per (batch, head)) then keeps up to ``L`` blocks' work in flight at once, both
eagerly and inside a captured CUDA graph, where the streams become parallel branches. Autograd
runs each backward op on its forward op's stream, so the backward overlaps the same way. On
the CPU the same order runs serially. The math is the same either way; only the order of
independent work changes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class BlockStreams:
    """One CUDA stream per block, made once per device (a captured graph replays the streams
    it was captured with, so they must not change between calls)."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, list[torch.cuda.Stream]] = {}

    def get(self, device: torch.device, n: int) -> list[torch.cuda.Stream]:
        have = self._by_device.setdefault(device, [])
        while len(have) < n:
            have.append(torch.cuda.Stream(device=device))
        return have[:n]


def run_wavefront(blocks: Sequence[nn.Module], h: Tensor, state: dict[str, Any], segment: int,
                  streams: BlockStreams) -> tuple[Tensor, dict[str, Any]]:
    """``blocks`` applied in turn to ``h [B, T, D]`` from ``state`` (keyed by block index as a
    string), computed over segments of ``segment`` tokens in wavefront order. Returns the last
    block's output and every block's final state, as the plain loop over blocks would."""
    pieces = list(h.split(segment, 1))
    states: list[Any] = [state.get(str(b)) for b in range(len(blocks))]
    if h.device.type == "cuda" and streams_enabled():
        return _streamed_outside_dynamo()(blocks, pieces, states, streams)
    n, depth = len(pieces), len(blocks)
    outs: list[list[Tensor]] = [[] for _ in range(depth)]
    for d in range(n + depth - 1):
        for b in range(max(0, d - n + 1), min(depth, d + 1)):
            x = pieces[d - b] if b == 0 else outs[b - 1][d - b]
            y, states[b] = blocks[b](x, states[b])
            outs[b].append(y)
    return torch.cat(outs[-1], 1), {str(b): st for b, st in enumerate(states)}


def streams_enabled() -> bool:
    """On unless ``NESTLEARN_WAVEFRONT_STREAMS`` is 0/false/off/no (module docstring)."""
    return os.environ.get("NESTLEARN_WAVEFRONT_STREAMS", "1").strip().lower() not in ("0", "false", "off", "no")


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "on", "yes")


class _Handoff(torch.autograd.Function):
    """Identity where a tensor crosses from the stream that made it (``producer``) to the one
    that reads it. In the backward the gradient flows the other way: it is made on the reader's
    stream and read by the producer's backward, and autograd orders the two streams but does not
    tell the caching allocator, which could hand the gradient's memory to new work on the
    reader's stream while the producer's stream still reads it (pytorch/pytorch#33909). The
    backward records the gradient on the producer's stream, so its memory waits for that use.
    A candidate fix for the stream path's gradient fault (module docstring). On an H100 the eager
    stream path matched the one-stream order with and without it, so it is not shown to be needed;
    the graphed path's difference remains either way."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, producer: torch.cuda.Stream) -> Tensor:
        ctx.producer = producer
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        if grad.is_cuda:
            grad.record_stream(ctx.producer)
        return grad, None


def _handoff(x: Tensor, producer: torch.cuda.Stream, on: bool) -> Tensor:
    """``x`` through ``_Handoff`` where it takes part in autograd and ``on``
    (``NESTLEARN_WAVEFRONT_HANDOFF=0`` leaves it out, to compare)."""
    if not (on and x.requires_grad and torch.is_grad_enabled()):
        return x
    return _Handoff.apply(x, producer)  # type: ignore[no-any-return]


@functools.cache
def _streamed_outside_dynamo() -> Callable[..., tuple[Tensor, dict[str, Any]]]:
    """``_streamed`` kept out of dynamo (its stream and event calls; ``--compile`` without
    ``--cuda-graph``). Wrapped at the first CUDA call, not at import: ``torch.compiler.disable``
    imports dynamo, and with it triton, which must not happen before a test sets
    ``TRITON_INTERPRET``, nor cost every ``import nestlearn`` its import time."""
    return torch.compiler.disable(_streamed)


def _streamed(blocks: Sequence[nn.Module], pieces: list[Tensor], states: list[Any],
              streams: BlockStreams) -> tuple[Tensor, dict[str, Any]]:
    """The CUDA wavefront: block b on stream b, each segment after the block below's."""
    n, depth = len(pieces), len(blocks)
    outs: list[list[Tensor]] = [[] for _ in range(depth)]
    device = pieces[0].device
    ambient = torch.cuda.current_stream(device)
    lanes = streams.get(device, depth)
    for lane in lanes:  # every block's stream starts after what was queued before this call
        lane.wait_stream(ambient)
    ready: list[list[torch.cuda.Event]] = [[] for _ in range(depth)]
    sync_each = _flag("NESTLEARN_WAVEFRONT_SYNC", "0")
    handoff = _flag("NESTLEARN_WAVEFRONT_HANDOFF", "1")
    for d in range(n + depth - 1):
        for b in range(max(0, d - n + 1), min(depth, d + 1)):
            s, lane = d - b, lanes[b]
            if b > 0:
                lane.wait_event(ready[b - 1][s])
            x = pieces[s] if b == 0 else outs[b - 1][s]
            # made on another stream (the caller's, block b-1's) and read -- or saved for the
            # backward -- on this one: its memory is not reused before this stream is done with it
            x.record_stream(lane)
            if s == 0:
                _record_tree(states[b], lane)  # the caller's initial state
            with torch.cuda.stream(lane):
                y, states[b] = blocks[b](_handoff(x, ambient if b == 0 else lanes[b - 1], handoff), states[b])
                done = torch.cuda.Event()
                done.record(lane)
            if sync_each:  # debugging: every block-segment finished before the next is queued
                torch.cuda.synchronize(device)
            outs[b].append(y)
            ready[b].append(done)
    for lane in lanes:  # the caller's stream continues once every block is done
        ambient.wait_stream(lane)
    for y in outs[-1]:  # what the caller's stream reads: the last block's output and the states
        y.record_stream(ambient)
    for st in states:
        _record_tree(st, ambient)
    last = [_handoff(y, lanes[-1], handoff) for y in outs[-1]]
    return torch.cat(last, 1), {str(b): st for b, st in enumerate(states)}


def _record_tree(tree: Any, stream: torch.cuda.Stream) -> None:
    """``record_stream`` on every CUDA tensor of a state tree (they are freed on ``stream``)."""
    for leaf in torch.utils._pytree.tree_leaves(tree):
        if isinstance(leaf, Tensor) and leaf.is_cuda:
            leaf.record_stream(stream)
