"""Distillation finetuning: train a compressed DagModule (pruned, factorized, flexible) towards the model
it was made from.

    report = td.finetune(student, teacher, loader, epochs=1, lr=1e-3, checkpoint="run.ckpt")

The loss of a batch is the KL divergence between the teacher's and the student's output distributions
at a temperature (logit distillation), plus, where the batch has labels, the task loss, weighted
`alpha` : `1 - alpha`; plus, optionally, feature matching on vertices both DAGs have (a pruned model
keeps its vertex names): the mean squared error of the student's value to the teacher's, over the
teacher's variance. A flexible student trains all its levels together, each batch at the largest, the
smallest and one random middle level (the sandwich rule), every level distilled from the teacher.

Scaling out: run the same program under `torchrun --nproc_per_node N`. `finetune` then joins the
process group (gloo on CPU, nccl on GPU), wraps the student in DistributedDataParallel and gives rank r
every N-th batch starting at r, so each rank iterates the same data (seeded identically) but trains on
its own share; gradients are averaged, and every rank ends with the same weights.

Checkpoints are a folder: `student.dag` (written by `td.save`) and `state.safetensors` (optimizer state
and the position in the data; JSON metadata, no pickle). With `resume=True` (the default) a run
pointed at an existing checkpoint continues from it: the same batches, the same learning-rate
schedule, as if it had not stopped. (Each epoch starts by seeding torch's global generator, which a
shuffling DataLoader draws its order from; a loader given a generator of its own keeps that order
instead, the same on every rank but not replayed on resume.)
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..core.dag import DagModule, Ref, Vertex
from ..core.errors import DagError
from ..core.progress import show_progress
from ..flex.model import FlexDagModule
from .checkpoint import check_checkpoint_paths, load_checkpoint, resume_from, save_checkpoint
from .config import FinetuneConfig, FinetuneReport
from .distributed import average_buffers, default_device, join_process_group, mean_over_ranks, shard
from .losses import distillation_loss, to_device, unpack


def finetune(
    student: DagModule,
    teacher: torch.nn.Module,
    data: Iterable[Any],
    *,
    config: FinetuneConfig | None = None,
    **options: Any,
) -> FinetuneReport:
    """Train `student` in place towards `teacher` (frozen, in eval mode) on `data`. The teacher never
    changes: modules the student shares with it (as a factorized model shares the layers it left alone)
    are first replaced in the student by copies. Settings are a `FinetuneConfig`, or its fields as
    keyword arguments (which, given with `config`, replace those fields of it).

    `data` is re-iterable (a DataLoader, a list) when `epochs > 1`; a batch is an input tensor, an
    `(inputs, target)` pair (inputs a tensor or a tuple of tensors, target labels for `label_loss` or
    None), or a dict of keyword inputs whose "labels" entry, if any, is the target. Outputs that are
    dicts or tuples are distilled through their "logits" entry or their first element.

    `optimizer` is "adamw" or "sgd" (with `momentum`); `schedule` "cosine" (to zero over the run, when
    `data` has a length) or "constant". `features` names vertices of both DAGs whose values are
    matched (weight `feature_weight`). `freeze_bn` keeps the batch norms' statistics as they are (they run
    in eval mode; their affine weights still train): for finetuning sets too small or too narrow to
    re-estimate them. `checkpoint` is a folder written every `checkpoint_every` steps
    (0: at the end of each epoch) and at the end. The student is left in eval mode."""
    config = replace(config, **options) if config is not None else FinetuneConfig(**options)
    _check_run(student, data, config)
    if config.checkpoint is not None:  # refused before anything changes
        check_checkpoint_paths(Path(config.checkpoint))
    world, rank, owns_group = join_process_group(config.device)
    run = _setup(student, teacher, data, config, world, rank)
    start_epoch, skip = 0, 0
    source = resume_from(run.checkpoint) if run.checkpoint is not None and config.resume else None
    if source is not None:
        run.done, start_epoch, skip = load_checkpoint(source, student, run.opt)
    report = FinetuneReport(steps=0, total_steps=run.done, world_size=world, resumed_at=run.done)
    start = time.perf_counter()
    bar = show_progress(
        total=run.total,
        initial=run.done,
        desc="finetune",
        unit="step",
        disable=not config.progress or rank != 0,
    )
    try:
        _train(run, data, report, bar, start_epoch, skip)
    finally:
        bar.close()
        if run.flex is not None:
            run.flex.set_level_use(run.flex.max_level())
        student.eval()
        if owns_group:
            dist.destroy_process_group()
    report.total_steps, report.seconds = run.done, time.perf_counter() - start
    return report


@dataclass
class _Run:
    """The moving parts of one finetuning run."""

    student: DagModule
    model: torch.nn.Module  # what trains: the student, tapped for features, wrapped in DDP across ranks
    teacher: torch.nn.Module  # tapped for features
    opt: torch.optim.Optimizer
    config: FinetuneConfig
    device: torch.device
    world: int
    rank: int
    flex: FlexDagModule | None  # the student, when it is flexible
    total: int | None  # optimizer steps of the whole run, when `data` has a length
    checkpoint: Path | None
    done: int = 0  # optimizer steps so far, with those of a resumed checkpoint


def _check_run(student: DagModule, data: Iterable[Any], config: FinetuneConfig) -> None:
    if config.epochs > 1 and iter(data) is data:
        raise ValueError(
            "data is a one-pass iterator; pass a re-iterable (a DataLoader, a list) for epochs > 1"
        )
    if config.features and isinstance(student, FlexDagModule):
        raise ValueError(
            "feature matching needs one width; a flexible student is distilled on its outputs only"
        )


def _setup(
    student: DagModule,
    teacher: torch.nn.Module,
    data: Iterable[Any],
    config: FinetuneConfig,
    world: int,
    rank: int,
) -> _Run:
    """Separate the student from the teacher, put both on the device in their modes, make the optimizer."""
    device = torch.device(config.device) if config.device is not None else default_device(student, world)
    flex = student if isinstance(student, FlexDagModule) else None
    separate_from_teacher(student, teacher)
    student.to(device).train()
    if config.freeze_bn:
        for module in student.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    teacher.to(device).eval()
    tapped_student, tapped_teacher = _tap(student, teacher, config.features)
    model = tapped_student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            tapped_student,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=flex is not None,
        )  # a level leaves the other levels' norm parameters unused
    opt = make_optimizer([p for p in student.parameters() if p.requires_grad], config)
    steps_per_epoch = len(data) // world if isinstance(data, Sized) else None
    if steps_per_epoch == 0:
        raise ValueError(_no_steps(data, world))
    total = steps_per_epoch * config.epochs if steps_per_epoch else None
    checkpoint = Path(config.checkpoint) if config.checkpoint is not None else None
    return _Run(student, model, tapped_teacher, opt, config, device, world, rank, flex, total, checkpoint)


def make_optimizer(params: list[torch.nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    """The optimizer `config` names over `params` (what `finetune`, `train_prune` and supernet training
    use)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _train(
    run: _Run, data: Iterable[Any], report: FinetuneReport, bar: Any, start_epoch: int, skip: int
) -> None:
    """The epochs from `start_epoch` (its first `skip` steps done before a checkpoint), with checkpoints."""
    config = run.config
    for epoch in range(start_epoch, config.epochs):
        losses = _epoch(run, data, report, bar, epoch, skip if epoch == start_epoch else 0)
        report.epoch_losses.append(mean_over_ranks(losses, run.device, run.world))
        if run.checkpoint is not None and not config.checkpoint_every:
            save_checkpoint(run.checkpoint, run.student, run.opt, run.done, epoch + 1, 0, run.rank, run.world)
    average_buffers(run.student, run.world)
    if run.checkpoint is not None and config.checkpoint_every and run.done % config.checkpoint_every:
        save_checkpoint(run.checkpoint, run.student, run.opt, run.done, config.epochs, 0, run.rank, run.world)


def _epoch(
    run: _Run, data: Iterable[Any], report: FinetuneReport, bar: Any, epoch: int, skip: int
) -> list[float]:
    """One epoch's steps (the first `skip` only replayed); the loss of each."""
    config = run.config
    torch.manual_seed(config.seed + epoch)  # the same data order on every rank, and on resume
    rng = random.Random(config.seed * 7919 + epoch)  # the same sandwich levels on every rank
    losses = []
    index = -1
    for index, batch in enumerate(shard(iter(data), run.rank, run.world)):
        if index < skip:  # done before the checkpoint
            if run.flex is not None:
                _sandwich_levels(run.flex, rng)  # the level draws stay in step
            continue
        loss = _step(run, batch, rng)
        run.done += 1
        report.steps += 1
        losses.append(loss)
        bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
        bar.update(1)
        if run.checkpoint is not None and config.checkpoint_every and run.done % config.checkpoint_every == 0:
            save_checkpoint(
                run.checkpoint, run.student, run.opt, run.done, epoch, index + 1, run.rank, run.world
            )
    if index < 0:
        raise ValueError(f"epoch {epoch}: {_no_steps(data, run.world)}")
    return losses


def _no_steps(data: Iterable[Any], world: int) -> str:
    """Why `data` gives no optimizer step: the refusal's reason (nothing would train; the loss is nan)."""
    why = f"data gives no batch{f' to each of the {world} processes' if world > 1 else ''}"
    loader = data if isinstance(data, torch.utils.data.DataLoader) else None
    if loader is not None and loader.drop_last and isinstance(loader.dataset, Sized):
        why += (
            f" (a DataLoader of {len(loader.dataset)} samples in batches of {loader.batch_size}, dropping "
            "the last incomplete one)"
        )
    return f"{why}: finetuning would run zero steps; give more data or smaller batches"


def _step(run: _Run, batch: Any, rng: random.Random) -> float:
    """One optimizer step on `batch` (at each sandwich level of a flexible student); its summed loss."""
    config = run.config
    if config.schedule == "cosine" and run.total:
        for group in run.opt.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * min(run.done / run.total, 1.0)))
    inputs, kwargs, target = unpack(to_device(batch, run.device))
    with torch.no_grad():
        expected = run.teacher(*inputs, **kwargs)
    run.opt.zero_grad(set_to_none=True)
    loss = 0.0
    flex = run.flex
    for level in _sandwich_levels(flex, rng) if flex is not None else [None]:
        if flex is not None and level is not None:
            flex.set_level_use(level)
        term = distillation_loss(run.model(*inputs, **kwargs), expected, target, config)
        term.backward()
        loss += term.item()
    run.opt.step()
    return loss


def separate_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """Give `student` its own copies of the modules and tensors it shares with `teacher` (a factorized
    model keeps the layers it left alone as the very modules of its input): training moves the student
    only. What two parts of the student share stays shared."""
    if student is teacher:
        raise ValueError("the student is the teacher itself; distill a compressed copy of it")
    theirs = {id(x) for x in (*teacher.modules(), *teacher.parameters(), *teacher.buffers())}

    def shared(module: torch.nn.Module) -> bool:
        return any(id(x) in theirs for x in (*module.modules(), *module.parameters(), *module.buffers()))

    memo: dict[int, Any] = {}
    if isinstance(student, DagModule):  # its vertices hold the modules too: swap whole vertices
        copies = [
            Vertex(v.name, copy.deepcopy(v.module, memo), v.args, dict(v.kwargs), dict(v.meta))
            for v in student
            if shared(v.module)
        ]
        if copies:
            student.replace_vertices(copies)
        return

    def unshare(module: torch.nn.Module) -> None:  # the teacher's own modules are copied, never entered
        stores: tuple[dict[str, Any], ...] = (module._modules, module._parameters, module._buffers)
        for store in stores:
            for name, value in store.items():
                if value is not None and id(value) in theirs:
                    store[name] = copy.deepcopy(value, memo)
                elif isinstance(value, torch.nn.Module):
                    unshare(value)

    unshare(student)


def _tap(
    student: DagModule, teacher: torch.nn.Module, features: Sequence[str]
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The student and teacher as they are, or, with `features`, views of them (sharing every module)
    that also return the named vertices' values."""
    if not features:
        return student, teacher
    if not isinstance(teacher, DagModule):
        raise TypeError(
            "feature matching needs the teacher as a DagModule (its vertices are matched by name)"
        )
    for dag, who in ((student, "student"), (teacher, "teacher")):
        missing = [n for n in features if n not in dag]
        if missing:
            raise DagError(f"feature vertices {missing} are not in the {who}")

    def tapped(dag: DagModule) -> DagModule:
        return DagModule(
            dag.input_names, dag.vertices, (dag.output, {n: Ref(n) for n in features}), dag.input_meta
        )

    return tapped(student), tapped(teacher)


def _sandwich_levels(flex: FlexDagModule, rng: random.Random) -> list[int]:
    top = flex.max_level()
    levels = [top, 0] + ([rng.randint(1, top - 1)] if top > 1 else [])
    return list(dict.fromkeys(levels))
