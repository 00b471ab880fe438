"""Several processes, one training run: torchrun + torch.distributed (DDP for adapters, FSDP2 for full).

Conventions, the same on 1 or N processes:
* `--batch-size` is the GLOBAL batch: each optimizer step sees the same examples whatever the
  number of processes; rank r takes every world-th example of each batch. Adding GPUs makes a run
  faster, not different.
* The loss is normalised by the global number of trained tokens (not per rank): padding and masking
  differ between shards, and a per-rank mean would weight their tokens differently.
* Only rank 0 logs and writes files; writes are atomic, so a crash never leaves a half adapter.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    waiting_group: object = None  # main_first's barriers: gloo, with a timeout long enough for a model download

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        return indices[self.rank :: self.world]

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        # NCCL (the GPU backend) reduces only tensors on the GPU; gloo (CPU runs) only those in memory.
        device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self, group=None) -> None:
        if self.enabled:
            torch.distributed.barrier(group=group)

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first, then the first process of each other machine, then the rest: work that
        fills a cache (downloading or converting the model, the replay answers) is done once per machine, by one
        process, instead of by every rank at once into the same folder. A cache the machines share is filled by
        rank 0 and read by all."""
        turn = 0 if self.is_main else 1 if self.local_rank == 0 else 2
        for t in range(3):
            if t == turn:
                yield
            self.barrier(self.waiting_group)


def init_distributed() -> Dist:
    """Join the process group torchrun set up (RANK/WORLD_SIZE/LOCAL_RANK); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend=backend)
    # The other ranks wait in main_first while rank 0 downloads or converts the model and generates the replay
    # answers: for a large model far longer than the 10 minutes after which a collective fails. Those waits get
    # their own group with a longer timeout; training's collectives keep the short one, so a hang there still ends.
    waiting = torch.distributed.new_group(backend="gloo", timeout=timedelta(hours=3))
    return Dist(rank, world, local_rank, waiting)


def wrap_for_training(loss_module: torch.nn.Module, dist: Dist, fsdp: bool, layers) -> torch.nn.Module:
    """DDP for adapters and small full fine-tunes; FSDP2 (fully_shard) shards parameters, gradients and
    optimizer state layer by layer, for full fine-tunes whose training state does not fit one device (each
    process has loaded the whole model first: the model itself must fit)."""
    if not dist.enabled:
        return loss_module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        return fully_shard(loss_module)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(loss_module, device_ids=device_ids)


def shutdown(dist: Dist) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
