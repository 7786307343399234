"""Supernet training: one set of weights trained for every sub-network of a searchable DAG.

    report = td.nas.train_supernet(sdag, loader, epochs=1, lr=1e-3)

Each batch runs the sandwich of sub-networks (the largest, the smallest and `n` random ones: widths and
op choices together), and their gradients accumulate into the shared weights before one optimizer step
(the sandwich rule of slimmable and once-for-all networks; `flex.sandwich_step` does it for levels).
The largest learns from the labels (or from `teacher`); the others, with `distill`, from the largest's
detached outputs (in-place distillation). Batches are what `td.finetune` takes; the optimizer, the cosine
schedule, the loss and the data-parallel setup (run under `torchrun`, DDP, every rank's share of the
batches, the same sub-networks drawn on every rank) are `td.finetune`'s.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..core.dag import DagModule
from ..core.errors import DagError
from ..core.progress import show_progress
from ..finetuning.config import FinetuneConfig, FinetuneReport, Optimizer
from ..finetuning.distill import make_optimizer
from ..finetuning.distributed import (
    average_buffers,
    default_device,
    join_process_group,
    mean_over_ranks,
    shard,
)
from ..finetuning.losses import distillation_loss, logits, to_device, unpack
from .search import choose
from .space import dump_chosen, export_subnet, largest, mutables, sample, smallest

Choice = dict[str, Any]  # {mutable name: its choice}, as td.nas.dump_chosen gives


def train_supernet(
    sdag: DagModule,
    data: Iterable[Any],
    *,
    steps: int | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: Optimizer = "adamw",
    weight_decay: float = 0.0,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    teacher: torch.nn.Module | None = None,
    sandwich: tuple[bool, bool, int] = (True, True, 2),
    distill: bool = True,
    temperature: float = 1.0,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
) -> FinetuneReport:
    """Train the searchable `sdag` in place on `data` for `epochs` passes, or `steps` optimizer steps
    (passes repeat as needed: then `data` must be re-iterable). `sandwich` is (the largest, the smallest,
    how many random sub-networks) per batch. The largest sub-network's loss is `loss_fn(logits, labels)`
    (default cross entropy) on batches with labels; with `teacher` (frozen) it is the distillation loss
    `td.finetune` uses (KL at `temperature`, plus the labels' loss half and half where there are labels);
    batches without labels and no teacher are distilled from a frozen copy of the largest sub-network as
    it was before training. The sub-networks are left at their largest choice, in eval mode."""
    config = FinetuneConfig(
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        temperature=temperature,
        label_loss=loss_fn or torch.nn.functional.cross_entropy,
        device=device,
        seed=seed,
        progress=progress,
    )
    plan = _plan(sdag, data, steps, sandwich, distill)
    world, rank, owns_group = join_process_group(config.device)
    run = _setup(sdag, data, config, plan, teacher, world)
    report = FinetuneReport(steps=0, total_steps=0, world_size=world)
    start = time.perf_counter()
    bar = show_progress(total=run.total, desc="supernet", unit="step", disable=not progress or rank != 0)
    try:
        for epoch, batches in _passes(data, run, rank, world):
            losses = []
            for batch, random_draws in batches:
                losses.append(_step(run, batch, random_draws))
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}")
            report.epoch_losses.append(mean_over_ranks(losses, run.device, world))
            report.steps += len(losses)
        average_buffers(sdag, world)
    finally:
        bar.close()
        choose(sdag, plan.largest)
        sdag.eval()
        if owns_group:
            dist.destroy_process_group()
    report.total_steps, report.seconds = report.steps, time.perf_counter() - start
    return report


@dataclass(frozen=True)
class _Plan:
    """What each step trains: the fixed ends of the sandwich and how many random sub-networks."""

    largest: Choice
    smallest: Choice | None
    random: int
    include_largest: bool
    distill: bool
    steps: int | None


@dataclass
class _Run:
    sdag: DagModule
    model: torch.nn.Module  # the supernet, wrapped in DDP across ranks
    teacher: torch.nn.Module | None
    opt: torch.optim.Optimizer
    config: FinetuneConfig
    plan: _Plan
    device: torch.device
    total: int | None
    done: int = 0


def _plan(sdag: DagModule, data: Iterable[Any], steps: int | None, sandwich: tuple, distill: bool) -> _Plan:
    found = mutables(sdag)
    if not found:
        raise DagError(
            "train_supernet needs a searchable DAG: this one has no mutables (make them with "
            "td.nas.make_mutable, or td.make_flexible for widths)"
        )
    if (
        not isinstance(sandwich, (tuple, list))
        or len(sandwich) != 3
        or not isinstance(sandwich[2], int)
        or sandwich[2] < 0
        or not (sandwich[0] or sandwich[1] or sandwich[2])
    ):
        raise ValueError(
            f"sandwich must be (largest: bool, smallest: bool, random sub-networks: int >= 0) and train "
            f"at least one sub-network per batch, got {sandwich!r}"
        )
    if distill and not sandwich[0]:
        raise ValueError(
            "distill=True teaches every sub-network from the largest one's outputs: keep the largest in "
            "the sandwich (sandwich[0] = True) or pass distill=False"
        )
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if steps is not None and iter(data) is data:
        raise ValueError("steps= repeats passes over data: pass a re-iterable (a DataLoader, a list)")
    smallest_choice = smallest(sdag) if sandwich[1] else None
    return _Plan(largest(sdag), smallest_choice, sandwich[2], bool(sandwich[0]), distill, steps)


def _setup(
    sdag: DagModule,
    data: Iterable[Any],
    config: FinetuneConfig,
    plan: _Plan,
    teacher: torch.nn.Module | None,
    world: int,
) -> _Run:
    if config.epochs > 1 and plan.steps is None and iter(data) is data:
        raise ValueError(
            "data is a one-pass iterator; pass a re-iterable (a DataLoader, a list) for epochs > 1"
        )
    device = torch.device(config.device) if config.device is not None else default_device(sdag, world)
    if teacher is not None and any(p is q for p in teacher.parameters() for q in sdag.parameters()):
        raise ValueError("the teacher shares weights with the supernet; give a frozen copy (export_subnet)")
    initial = dump_chosen(sdag)
    reference = teacher
    if reference is None and not _has_labels(data):
        reference = export_subnet(sdag, plan.largest)  # distilled from the largest as it was
        choose(sdag, initial)
    if reference is not None:
        reference.to(device).eval()
    sdag.to(device).train()
    model: torch.nn.Module = sdag
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            sdag,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # a sub-network leaves the others' weights unused
        )
    opt = make_optimizer([p for p in sdag.parameters() if p.requires_grad], config)
    per_pass = len(data) // world if isinstance(data, Sized) else None
    if per_pass == 0:
        raise ValueError(
            f"data gives no batch to each of the {world} processes: training would run zero steps"
        )
    total = plan.steps if plan.steps is not None else (per_pass * config.epochs if per_pass else None)
    return _Run(sdag, model, reference, opt, config, plan, device, total)


def _has_labels(data: Iterable[Any]) -> bool:
    """Whether the first batch carries a target (a re-iterable is not consumed; a one-pass iterator is
    peeked by `_passes` instead, so this only answers for re-iterables)."""
    if iter(data) is data:
        return True  # decided per batch: a label-free batch without a teacher is refused there
    for batch in data:
        return unpack(batch)[2] is not None
    return False


def _passes(data: Iterable[Any], run: _Run, rank: int, world: int) -> Iterator[tuple[int, Iterator]]:
    """(pass number, that pass's (batch, random sub-networks) pairs) until the epochs or steps are done."""
    plan = run.plan
    epoch = 0
    while (plan.steps is None and epoch < run.config.epochs) or (
        plan.steps is not None and run.done < plan.steps
    ):
        torch.manual_seed(run.config.seed + epoch)  # the same data order on every rank
        rng = random.Random(run.config.seed * 7919 + epoch)  # the same sub-networks on every rank
        batches = shard(iter(data), rank, world)
        if plan.steps is not None:
            batches = _take(batches, plan.steps - run.done)
        first = next(batches, None)
        if first is None:
            raise ValueError(f"pass {epoch} over data gives no batch: training would run zero steps")
        yield (
            epoch,
            ((b, [sample(run.sdag, rng) for _ in range(plan.random)]) for b in _chain(first, batches)),
        )
        epoch += 1


def _take(batches: Iterator[Any], n: int) -> Iterator[Any]:
    for index, batch in enumerate(batches):
        if index >= n:
            return
        yield batch


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _step(run: _Run, batch: Any, random_draws: list[Choice]) -> float:
    """One optimizer step: every sub-network of the sandwich on `batch`; their summed loss."""
    plan, config = run.plan, run.config
    if run.total:
        for group in run.opt.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * min(run.done / run.total, 1.0)))
    inputs, kwargs, target = unpack(to_device(batch, run.device))
    expected = None
    if run.teacher is not None:
        with torch.no_grad():
            expected = run.teacher(*inputs, **kwargs)
    elif target is None:
        raise DagError("a batch has no labels and no teacher was given: pass teacher= to train_supernet")
    subnets = ([plan.largest] if plan.include_largest else []) + ([plan.smallest] if plan.smallest else [])
    run.opt.zero_grad(set_to_none=True)
    total, top = 0.0, None
    for index, choice in enumerate(subnets + random_draws):
        choose(run.sdag, choice)
        out = run.model(*inputs, **kwargs)
        if top is not None and plan.distill:  # in-place distillation from the largest
            loss = distillation_loss(out, top, None, config)
        elif expected is not None:
            loss = distillation_loss(out, expected, target, config)
        else:
            loss = config.label_loss(logits(out), target)
        if index == 0 and plan.include_largest:
            top = _detached(out)
        loss.backward()
        total += loss.item()
    run.opt.step()
    run.done += 1
    return total


def _detached(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, dict):
        return {k: _detached(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_detached(v) for v in out)
    return out
