"""The training batches as a step uses them: on its device, one step ahead.

``task.batch_at`` makes a batch on the host (a pure function of the step, so fetching ahead
changes nothing a resume depends on). On a GPU the batch goes through pinned memory with a
non-blocking copy: a copy from pageable memory can make the host wait for the device, which
would stall the host's queuing of the next step. ``prefetch(k + 1)``, called once step ``k`` is
queued, makes batch ``k + 1`` and queues its copy while the device still runs step ``k``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nestlearn.tasks import Batch


class Batches:
    """``get(step)``: this process's rows of training batch ``step`` on ``device`` and the global
    batch's token count (the loss's denominator, at least 1)."""

    def __init__(self, fetch: Callable[[int], Batch], device: torch.device, rank: int = 0, world: int = 1):
        self.fetch, self.device, self.rank, self.world = fetch, device, rank, world
        self._ahead: tuple[int, Batch, float] | None = None

    def get(self, step: int) -> tuple[Batch, float]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == step:
            return ahead[1], ahead[2]
        return self._load(step)

    def prefetch(self, step: int) -> None:
        """Make batch ``step`` now; a failure is left for ``get(step)`` to raise at its own step."""
        try:
            batch, n_tok = self._load(step)
        except Exception:  # noqa: BLE001 - e.g. a TaskError: reported when that step runs
            return
        self._ahead = (step, batch, n_tok)

    def _load(self, step: int) -> tuple[Batch, float]:
        batch = self.fetch(step)
        n_tok = max(float(batch.mask.sum()), 1.0)
        local = batch.shard(self.rank, self.world) if self.world > 1 else batch
        if self.device.type == "cuda":
            local = Batch(*(t.pin_memory().to(self.device, non_blocking=True)
                            for t in (local.inputs, local.targets, local.mask)))
        return local, n_tok


__all__ = ["Batches"]
