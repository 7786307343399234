"""Data parallelism under torchrun: the process group, each rank's share of the batches, and what
DDP does not keep equal across ranks (norm statistics, mean losses)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist


def join_process_group(device: str | torch.device | None) -> tuple[int, int, bool]:
    """(world size, rank, whether this call created the process group): under torchrun (WORLD_SIZE > 1)
    the group is joined here unless the caller already did."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, False
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_world_size(), dist.get_rank(), True


def default_device(student: torch.nn.Module, world: int) -> torch.device:
    if world > 1 and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    parameter = next(student.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def shard(batches: Iterator[Any], rank: int, world: int) -> Iterator[Any]:
    """Rank r's share: batches r, r + world, r + 2 world, ...; a last incomplete round is dropped, so
    every rank takes the same number of steps (DDP needs each step on all ranks)."""
    if world == 1:
        yield from batches
        return
    round_: list[Any] = []
    for batch in batches:
        round_.append(batch)
        if len(round_) == world:
            yield round_[rank]
            round_ = []


def average_buffers(module: torch.nn.Module, world: int) -> None:
    """Norm statistics averaged over the ranks (DDP keeps parameters equal, not buffers: each rank's
    last forward updated its own), so every rank holds the same model."""
    if world > 1:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer.div_(world)


def mean_over_ranks(values: list[float], device: torch.device, world: int) -> float:
    total = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else float("nan")
