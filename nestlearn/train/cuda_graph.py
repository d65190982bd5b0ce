"""``--cuda-graph``: one training micro-step (forward, loss, backward) captured in a CUDA graph.

Specs with in-context levels launch thousands of small kernels per step (every chunk of every
memory is its own handful of matmuls), so on a GPU a step is bound by kernel launches, not by
arithmetic; replaying the step from a CUDA graph removes the launches (``bench/run.py::graphed``
measures it; docs/benchmarks.md). ``GraphedStep`` does the same for the trainer:

- Static device buffers hold the micro-batch (inputs, targets, mask) and two scalars (the loss
  factor ``world / tokens`` and, under fp16, the GradScaler's scale); each step copies into them
  (``copy_`` / ``fill_``) and replays the graph.
- The first graphed step runs ``warmup`` forward + backward passes on a side stream (CUDA graphs
  need the allocator, cuBLAS and Triton autotuning warmed up; the parameters do not change:
  no optimizer step runs and the gradients are dropped), then captures one pass with every
  ``.grad`` set to ``None``, so the graph *writes* fresh gradients at each replay rather than
  adding to old ones. The graph's gradient tensors are kept here and put back into ``.grad``
  after each replay (the trainer's ``zero_grad(set_to_none=True)`` drops them).
- Gradient accumulation: each micro-batch is one replay; the replayed gradients are summed
  into separate buffers (copy for the first micro-batch, add for the others), exactly what
  eager ``.backward()`` accumulates.
- Autocast (bf16/fp16) is entered inside the capture, with the autocast weight cache off (the
  cast kernels are part of the graph).
- Gradient clipping, the optimizer step, the LR schedule and the GradScaler's unscale / step /
  update run eagerly between replays.

The trainer runs a step eagerly instead when it records the per-level inner-loop stats
(``loops.stats`` fills its tables by Python side effects that a replay does not repeat), when a
batch's shape differs from the captured one, and for evaluation. If the capture itself fails
(an operation a CUDA graph cannot hold, e.g. a host sync in some op), the run says so once and
continues eagerly with the same results. The graph holds no state a checkpoint needs: the
parameters and optimizer state it reads live in the model and the optimizer.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestlearn.tasks import Batch
from nestlearn.train.compiling import describe_error
from nestlearn.train.errors import TrainError

WARMUP_PASSES = 3


class CaptureFailed(Exception):
    """The graph capture failed; ``str`` is the one-line reason (the run continues eagerly)."""


def check_supported(cuda_graph: bool, device: str, world: int, cuda_available: bool | None = None) -> None:
    """Refuse ``--cuda-graph`` where it cannot run: without a CUDA device, or under torchrun.
    (``--carry-state`` is refused by ``TrainConfig.check``.)"""
    if not cuda_graph:
        return
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if device == "cpu" or not cuda_available:
        where = "--device cpu was asked for" if device == "cpu" else "this machine has no CUDA device"
        raise TrainError(f"--cuda-graph: CUDA graphs need a CUDA device, but {where}; drop --cuda-graph "
                         "(--no-cuda-graph when resuming a run that used it) or train on a GPU")
    if world > 1:
        raise TrainError(f"--cuda-graph: not supported with several processes (torchrun started {world}); "
                         "drop --cuda-graph or train in one process")


def _detach(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


class GraphedStep:
    """Forward + loss + backward of one micro-batch of ``model``, captured once and replayed.

    ``run(mb, factor, grad_scale)`` returns ``(tensor([loss sum, correct]), new state)``, both
    static outputs of the graph (overwritten by the next replay), and leaves the micro-batch's
    gradients in the graph's gradient buffers; ``install_grads(i, n)`` then puts the sum over
    micro-batches ``0..i`` into the parameters' ``.grad``. The loss that is differentiated is
    ``loss_sum * factor`` (times ``grad_scale`` when ``scaled``), as in ``Trainer._micro``."""

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None, scaled: bool,
                 warmup: int = WARMUP_PASSES):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.amp_dtype, self.scaled, self.warmup = amp_dtype, scaled, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.replays = 0
        self._batch: tuple[Tensor, Tensor, Tensor] | None = None
        self._factor: Tensor | None = None
        self._scale: Tensor | None = None
        self._out: Tensor | None = None
        self._state: Any = None
        self._grads: list[Tensor | None] = []
        self._acc: list[Tensor | None] | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def fits(self, mb: Batch) -> bool:
        """Can the captured graph run ``mb`` (same shapes and dtypes)? True before capture."""
        if self._batch is None:
            return True
        return all(a.shape == b.shape and a.dtype == b.dtype
                   for a, b in zip(self._batch, (mb.inputs, mb.targets, mb.mask), strict=True))

    # ---------------------------------------------------------------- the captured body
    def _autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype, cache_enabled=False)

    def _body(self) -> tuple[Tensor, Any]:
        assert self._batch is not None and self._factor is not None
        inputs, targets, mask_in = self._batch
        with self._autocast():
            logits, new_state = self.model(inputs, None)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        mask = mask_in.flatten().to(ce.dtype)
        ce_sum = (ce * mask).sum()
        loss = ce_sum * self._factor
        if self._scale is not None:
            loss = loss * self._scale
        loss.backward()
        with torch.no_grad():
            correct = ((logits.argmax(-1).flatten() == targets.flatten()).to(ce.dtype) * mask).sum()
        return torch.stack([ce_sum.detach(), correct]), _detach(new_state)

    def _load(self, mb: Batch, factor: float, grad_scale: Tensor | None) -> None:
        """Copy the micro-batch and the scalars into the static buffers (allocated once)."""
        if self._batch is None:
            self._batch = (torch.empty_like(mb.inputs), torch.empty_like(mb.targets), torch.empty_like(mb.mask))
            self._factor = torch.zeros((), dtype=torch.float32, device=mb.inputs.device)
            if self.scaled:
                self._scale = torch.ones((), dtype=torch.float32, device=mb.inputs.device)
        assert self._factor is not None
        for dst, src in zip(self._batch, (mb.inputs, mb.targets, mb.mask), strict=True):
            dst.copy_(src, non_blocking=True)
        self._factor.fill_(factor)
        if self._scale is not None:
            if grad_scale is None:
                raise ValueError("GraphedStep(scaled=True) needs the GradScaler's scale at every step")
            self._scale.copy_(grad_scale)

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    # ---------------------------------------------------------------- capture and replay
    def capture(self, mb: Batch, factor: float, grad_scale: Tensor | None = None) -> None:
        """Warm up on a side stream, then capture. Raises ``CaptureFailed`` if the capture (not
        the warm-up, which is an ordinary eager pass) fails; the gradients are ``None`` after."""
        if self.graph is not None:
            raise RuntimeError("GraphedStep.capture: already captured")
        self._load(mb, factor, grad_scale)
        device = mb.inputs.device
        main = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(main)
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._drop_grads()
                    self._body()
        finally:
            self._drop_grads()
            main.wait_stream(side)
        # the capture allocates from a private pool: give the warm-up's cached activations back
        # first, or a step that fills half the GPU runs out of memory mid-capture
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        try:
            # the outer stream context puts ``main`` back even where a failed capture's
            # ``capture_end`` raises before ``torch.cuda.graph`` restores the stream itself
            with torch.cuda.stream(main), torch.cuda.graph(graph):
                out, state = self._body()
        except (torch.OutOfMemoryError, KeyboardInterrupt):
            self._drop_grads()
            raise
        except Exception as e:  # noqa: BLE001 - capture failures come in many types
            self._drop_grads()
            raise CaptureFailed(describe_error(e)) from e
        self.graph, self._out, self._state = graph, out, state
        self._grads = [p.grad for p in self.params]
        self._drop_grads()

    def run(self, mb: Batch, factor: float, grad_scale: Tensor | None = None) -> tuple[Tensor, Any]:
        """Replay on ``mb`` (which must ``fit``); captures first if not yet captured."""
        if self.graph is None:
            self.capture(mb, factor, grad_scale)
        assert self.graph is not None and self._out is not None
        if not self.fits(mb):
            raise ValueError("GraphedStep.run: the batch does not fit the captured graph; run it eagerly")
        self._load(mb, factor, grad_scale)
        self.graph.replay()
        self.replays += 1
        return self._out, self._state

    def install_grads(self, i: int, n: int) -> None:
        """After the replay of micro-batch ``i`` of ``n``: with ``n == 1`` the parameters' ``.grad``
        become the graph's gradient buffers; otherwise the replay's gradients are summed into
        accumulation buffers, which become ``.grad`` after the last micro-batch."""
        if n == 1:
            for p, g in zip(self.params, self._grads, strict=True):
                p.grad = g
            return
        if self._acc is None:
            self._acc = [None if g is None else torch.empty_like(g) for g in self._grads]
        pairs = [(a, g) for a, g in zip(self._acc, self._grads, strict=True) if a is not None and g is not None]
        acc, new = [a for a, _ in pairs], [g for _, g in pairs]
        if acc:
            if i == 0:
                torch._foreach_copy_(acc, new)
            else:
                torch._foreach_add_(acc, new)
        if i == n - 1:
            for p, a in zip(self.params, self._acc, strict=True):
                p.grad = a


NOTE = ("--cuda-graph: each step's forward, loss and backward are captured in a CUDA graph at the first "
        "step and replayed; evaluation runs eagerly, and the per-level inner-loop stats (evaluation "
        "steps and the last step) come from one extra no-grad forward")

__all__ = ["GraphedStep", "CaptureFailed", "check_supported", "NOTE", "WARMUP_PASSES"]
