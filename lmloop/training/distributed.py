"""The processes of a training run: rank, world size and device from `torchrun`'s environment,
the process group (gloo on CPU, NCCL on CUDA), and the two collectives the loop uses."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmloop.errors import UserError


@dataclass
class Dist:
    """This process's place in the run; one process: rank 0 of a world of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist(device: str) -> Dist:
    """The process's rank and device (`device`: auto, cpu, cuda or cuda:N), joining the process
    group when `torchrun` started more than one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for, but no CUDA device is available")
    if want == "cuda":
        want = f"cuda:{local}" if world > 1 else "cuda"
    dev = torch.device(want)
    if world > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def close_dist(d: Dist) -> None:
    """Leave the process group, if this run joined one."""
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """`x` summed over every process, in place."""
    if d.world > 1:
        dist.all_reduce(x)
    return x


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()
