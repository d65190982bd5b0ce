"""Data parallelism under ``torchrun``: DistributedDataParallel over gloo (CPU) or NCCL (CUDA).

Every rank builds the same *global* batch (batches are pure functions of the step) and trains
on its own rows; the loss of each row is divided by the global number of counted tokens, so the
averaged gradients equal those of one process on the whole batch.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nestlearn.train.errors import TrainError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(use_cuda: bool) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world = env_world()
    if world <= 1:
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise TrainError(f"torchrun started {world} processes but this machine has "
                             f"{torch.cuda.device_count()} CUDA devices; lower --nproc-per-node")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        except Exception as e:  # noqa: BLE001 - rendezvous problems have many exception types
            raise TrainError(f"could not join the torchrun process group: {e}") from None
    return DistInfo(rank, world, local)


def shutdown(clean: bool = False) -> None:
    """Tear the process group down; after a clean run, first wait for every rank (a rank that
    destroys its gloo group while a peer is still finishing can abort that peer at exit:
    "terminate called without an active exception"). Never wait after an error: the peer may
    be gone."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap(model: nn.Module, info: DistInfo, device: torch.device, unused: bool) -> nn.Module:
    """``model`` in DDP (``unused``: some parameters get no gradient in a step)."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=unused)


def no_sync(model: nn.Module, sync: bool) -> AbstractContextManager[Any]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if sync or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()  # type: ignore[no-any-return,operator]
