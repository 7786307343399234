"""Training-aware pruning: `train_prune` learns which channels to remove while the weights train.

    pruned = td.train_prune(dag, loader, flops_ratio=0.5, steps=2000)

`method="gates"` (the default) puts a learned gate on every channel class of every prunable channel
group (`gates.py`) and trains gates and weights together: the loss is the distillation from the teacher
(the unpruned model by default; plus the labels' loss where batches have labels), a budget term on the
cost the gates predict (the expected FLOPs, params or kmapp ratio from pruning's own FLOP model with each
class counted at its gate's open fraction, or a latency table's prediction) away from the target, and a
polarizing term that splits the gates towards 0 and 1, growing over the run, while the gates' temperature
falls (their logits are multiplied by up to `sharpen`), so that the gates end shut or open and removing the
shut ones changes little. The gates are then folded into the
layers and the classes ranked by their gates; pruning's chooser removes the lowest to the target (the
same bisection, rounding and report as `td.prune`) with its surgery.

`method="group_lasso"` trains with a group-lasso penalty over every member of each class instead
(`group_lasso.py`) and removes the classes with the smallest learned norms, by the same chooser.

Training runs like `td.finetune`'s (its `FinetuneConfig`: optimizer, learning rate, temperature,
labels' weight, device, DDP under torchrun, checkpoints of the gated model every `checkpoint_every`
steps and resume).
"""

from __future__ import annotations

import copy
import itertools
import math
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch
import torch.distributed as dist

from ..analysis.flops import count_flops
from ..core.dag import DagModule
from ..core.errors import DagError
from ..core.options import check_option, choices
from ..core.progress import show_progress
from ..passes.prepare import prepare
from ..pruning.flop_model import FlopModel
from ..pruning.groups import channel_groups, check_protected
from ..pruning.measured import CostTable, meet_measured
from ..pruning.prune import (
    TARGETS,
    PruneConfig,
    PruneReport,
    WidthSearch,
    channel_scores,
    target_ratio,
    warn_if_off,
    with_rounding,
)
from .batchnorm import recalibrate_batchnorm
from .checkpoint import check_checkpoint_paths, load_checkpoint, resume_from, save_checkpoint
from .config import FinetuneConfig, _check_number
from .distill import make_optimizer, separate_from_teacher
from .distributed import average_buffers, default_device, join_process_group, shard
from .gates import Gated, fold_gates, insert_gates, shut_gates
from .group_lasso import GroupNorms
from .losses import distillation_loss, to_device, unpack

Method = Literal["gates", "group_lasso"]


@dataclass(frozen=True)
class TrainPruneConfig:
    """Settings of `train_prune`: the training (`finetune`'s settings; `epochs` is unused, `steps`
    counts), the removal (`prune`'s settings: rounding, tolerance, attention mode...) and the terms."""

    method: Method = "gates"
    training: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(progress=False))
    pruning: PruneConfig = PruneConfig()
    block: int = 1  # channel classes per gate
    gate_lr: float = 0.1  # the gates' learning rate (the weights' is training.lr)
    opened: float = 0.9  # every gate's open fraction at the start
    budget_weight: float = 5.0  # the predicted cost's distance from the target, over the target
    polarize_weight: float = 10.0  # minus the gates' mean distance from their mean, ramped up over the run
    sharpen: float = 30.0  # the gates' inverse temperature at the end of the run (1 at its start)
    recalibrate: int = 16  # batches of the data the batchnorms of the result are re-estimated on (0: none)
    lasso_weight: float = 1e-3  # group lasso: the sum of classes' norms, ramped up over the first half

    def __post_init__(self) -> None:
        check_option(
            "method", self.method, choices(Method), what="training-aware pruning method", error=ValueError
        )
        _check_number("block", self.block, "an integer >= 1 (channel classes per gate)", integer=True, low=1)
        for name in ("gate_lr", "budget_weight", "polarize_weight", "lasso_weight"):
            _check_number(name, getattr(self, name), "a finite number >= 0", low=0.0)
        _check_number("recalibrate", self.recalibrate, "an integer >= 0 (batches)", integer=True, low=0)
        _check_number("sharpen", self.sharpen, "a finite number >= 1 (1: no annealing)", low=1.0)
        if not 0.0 < self.opened < 1.0:
            raise ValueError(
                f"opened (the gates' open fraction at the start) must be in (0, 1), got {self.opened}"
            )


@dataclass
class TrainPruneReport:
    """What `train_prune` did: the removal's `PruneReport` (ratio reached, every group and layer), the
    training steps and time, the mean loss terms of the last tenth of the steps, and where the method
    left the cost (gates: the ratio their open fractions predict and how many gates ended below 1/2)."""

    prune: PruneReport
    method: str
    steps: int
    seconds: float
    losses: dict[str, float]
    predicted: float | None = None  # gates: the cost ratio with the gates above 1/2 open, the rest removed
    closed: int = 0  # gates: below 1/2 at the end
    gates: int = 0
    resumed_at: int = 0
    # gates: the trained gated DAG with the gates of the removed classes shut, which computes what the
    # pruned DAG computes (with one class per gate); it shares the trained layers
    gated: DagModule | None = None

    @property
    def reached(self) -> float:
        return self.prune.reached

    def table(self) -> str:
        terms = ", ".join(f"{k} {v:.4g}" for k, v in self.losses.items())
        lines = [
            f"train-prune ({self.method}): {self.steps} steps in {self.seconds:.1f} s; last losses: {terms}"
        ]
        if self.method == "gates":
            lines.append(
                f"gates: {self.closed} of {self.gates} closed, predicting a {self.prune.measure} ratio of "
                f"{self.predicted:.3f}"
            )
        return "\n".join([*lines, self.prune.table()])


@overload
def train_prune(
    dag: DagModule,
    data: Iterable[Any],
    flops_ratio: float | None = ...,
    teacher: torch.nn.Module | None = ...,
    steps: int = ...,
    method: Method | None = ...,
    latency_table: CostTable | None = ...,
    *,
    params_ratio: float | None = ...,
    kmapp: float | None = ...,
    latency_ratio: float | None = ...,
    example_inputs: tuple | torch.Tensor | None = ...,
    protected: Iterable[str] = ...,
    config: TrainPruneConfig | None = ...,
    return_report: Literal[False] = ...,
) -> DagModule: ...


@overload
def train_prune(
    dag: DagModule,
    data: Iterable[Any],
    flops_ratio: float | None = ...,
    teacher: torch.nn.Module | None = ...,
    steps: int = ...,
    method: Method | None = ...,
    latency_table: CostTable | None = ...,
    *,
    params_ratio: float | None = ...,
    kmapp: float | None = ...,
    latency_ratio: float | None = ...,
    example_inputs: tuple | torch.Tensor | None = ...,
    protected: Iterable[str] = ...,
    config: TrainPruneConfig | None = ...,
    return_report: Literal[True],
) -> tuple[DagModule, TrainPruneReport]: ...


def train_prune(
    dag: DagModule,
    data: Iterable[Any],
    flops_ratio: float | None = None,
    teacher: torch.nn.Module | None = None,
    steps: int = 1000,
    method: Method | None = None,
    latency_table: CostTable | None = None,
    *,
    params_ratio: float | None = None,
    kmapp: float | None = None,
    latency_ratio: float | None = None,
    example_inputs: tuple | torch.Tensor | None = None,
    protected: Iterable[str] = (),
    config: TrainPruneConfig | None = None,
    return_report: bool = False,
) -> DagModule | tuple[DagModule, TrainPruneReport]:
    """A smaller, plain DagModule at `flops_ratio` of the FLOPs (or `params_ratio`, `kmapp`, or
    `latency_ratio` with a `latency_table`), its channels chosen while training `steps` optimizer steps
    on `data` (batches as `td.finetune` takes them, cycled when shorter than `steps`); see the module's
    docstring. `dag` and `teacher` are left untouched; `teacher` defaults to `dag` itself. `method`
    overrides `config.method`. With `return_report`, returns `(pruned, TrainPruneReport)`."""
    config = config or TrainPruneConfig()
    config = replace(config, method=method) if method is not None else config
    _check_number("steps", steps, "an integer >= 1 (optimizer steps)", integer=True, low=1)
    targets = dict(zip(TARGETS, (flops_ratio, params_ratio, kmapp, latency_ratio)))
    prep = prepare(
        dag, example_inputs, targets=targets, fractions=("flops_ratio", "params_ratio", "latency_ratio")
    )
    pconfig = with_rounding(config.pruning, prep.target, latency_table)
    student, inputs = copy.deepcopy(prep.dag), prep.example_inputs
    with torch.no_grad():
        counted = count_flops(student, *inputs)
    target = target_ratio(prep, counted)
    groups = channel_groups(student, inputs, check_protected(student, protected), attention=pconfig.attention)
    if not any(g.prunable for g in groups.groups()):
        raise DagError(
            "train_prune: no prunable channel group (see `torch-dag info --groups`): nothing to remove"
        )
    measure = prep.target or "flops_ratio"
    table_cost = latency_table.cost_model(groups) if latency_table is not None else None
    cost = table_cost or FlopModel(groups, counted.params if measure == "params_ratio" else counted.flops)
    trainer = _Trainer(config, steps, target, student, groups, cost, latency_table)
    trained, scores, stats = trainer.run(teacher if teacher is not None else dag, data)
    search = WidthSearch(trained, groups, inputs, pconfig, counted, measure, scores, table_cost)
    found = search.run(target, config.training.progress)
    measured = None
    if latency_table is not None:
        found, measured = meet_measured(search, found, target, latency_table, config.training.progress)
    if trainer.gated is not None:
        stats["gated"] = shut_gates(trainer.gated, found.removed)
    if config.recalibrate:  # statistics of the final widths, not those the run last moved towards
        _recalibrate(data, config.recalibrate, [found.pruned, stats.get("gated")])
    report = TrainPruneReport(search.report(found, target, measured), config.method, **stats)
    warn_if_off(report.prune, pconfig)
    return (found.pruned, report) if return_report else found.pruned


def _recalibrate(data: Iterable[Any], count: int, models: list[DagModule | None]) -> None:
    """The batchnorm statistics of `models` re-estimated on the first `count` batches of `data`."""
    batches = [unpack(b)[0] for b in itertools.islice(data, count)]
    if not batches:
        warnings.warn(
            "train_prune: the data gave no batch to re-estimate the batchnorm statistics on (a one-pass "
            "iterator, spent by training); they are the training run's last (give a re-iterable)",
            stacklevel=3,
        )
    for model in models if batches else []:
        if model is not None:
            recalibrate_batchnorm(model, batches)


class _Trainer:
    """One training run of a method: the model that trains (the gated student, or the student), its
    regularizer, and what the removal ranks classes by once it is done."""

    def __init__(
        self,
        config: TrainPruneConfig,
        steps: int,
        target: float,
        student: DagModule,
        groups: Any,
        cost: Any,
        table: CostTable | None,
    ):
        self.config, self.steps, self.target, self.student, self.groups = (
            config,
            steps,
            target,
            student,
            groups,
        )
        self.gated: Gated | None = None
        if config.method == "gates":
            self.gated = insert_gates(student, groups, config.block, config.opened)
            self.budget = cost.soft_ratio  # the FLOP model's, or the latency table's
            self.model = self.gated.dag
        else:
            self.norms = GroupNorms(student, groups)
            self.model = student

    def regularizer(self, progress: float) -> dict[str, torch.Tensor]:
        """The method's terms at `progress` (0 .. 1) through the run."""
        config = self.config
        if self.gated is None:
            return {"lasso": config.lasso_weight * min(1.0, 2 * progress) * self.norms.penalty()}
        opened = self.gated.opened()
        ratio = self.budget(self.gated.per_root(opened).cpu()).to(opened.device)
        return {
            "budget": config.budget_weight * (ratio - self.target).abs().float() / self.target,
            "polarize": config.polarize_weight * progress * _spread(opened),
        }

    def run(self, teacher: torch.nn.Module, data: Iterable[Any]) -> tuple[DagModule, dict[int, float], dict]:
        """Train; the trained plain DAG (gates folded), each prunable class's score, the report's figures."""
        training = self.config.training
        if training.checkpoint is not None:
            check_checkpoint_paths(Path(training.checkpoint))
        home = next(self.student.parameters()).device
        world, rank, owns_group = join_process_group(training.device)
        device = (
            torch.device(training.device)
            if training.device is not None
            else default_device(self.model, world)
        )
        separate_from_teacher(self.model, teacher)
        self.model.to(device).train()
        if training.freeze_bn:
            for module in self.model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        teacher.to(device).eval()
        model: torch.nn.Module = self.model
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        opt = self._optimizer()
        done = 0
        source = resume_from(Path(training.checkpoint)) if training.checkpoint and training.resume else None
        if source is not None:
            done = load_checkpoint(source, self.model, opt)[0]
        resumed, start = done, time.perf_counter()
        history: list[dict[str, float]] = []
        bar = show_progress(
            total=self.steps,
            initial=done,
            desc=f"train-prune ({self.config.method})",
            unit="step",
            disable=not training.progress or rank != 0,
        )
        try:
            batches = _cycled(data, rank, world, training.seed, skip=done)
            while done < self.steps:
                history.append(self._step(model, teacher, opt, next(batches), device, done))
                done += 1
                bar.update(1)
                bar.set_postfix_str(", ".join(f"{k} {v:.3f}" for k, v in history[-1].items()))
                if training.checkpoint is not None and (
                    done == self.steps
                    or (training.checkpoint_every and done % training.checkpoint_every == 0)
                ):
                    save_checkpoint(Path(training.checkpoint), self.model, opt, done, 0, done, rank, world)
            average_buffers(self.model, world)
        finally:
            bar.close()
            self.model.eval()
            if owns_group:
                dist.destroy_process_group()
        self.model.to(home)
        stats = {"steps": done - resumed, "seconds": time.perf_counter() - start, "resumed_at": resumed}
        return self._result(history, stats)

    def _optimizer(self) -> torch.optim.Optimizer:
        """`finetune`'s optimizer over the weights, with the gates in a group of their own (own learning
        rate, no weight decay)."""
        training = self.config.training
        gates = [self.gated.logit_tensor()] if self.gated is not None else []
        weights = [p for p in self.model.parameters() if p.requires_grad and all(p is not g for g in gates)]
        opt = make_optimizer(weights, training)
        if gates:
            opt.add_param_group({"params": gates, "lr": self.config.gate_lr, "weight_decay": 0.0})
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
        return opt

    def _step(
        self,
        model: torch.nn.Module,
        teacher: torch.nn.Module,
        opt: torch.optim.Optimizer,
        batch: Any,
        device: torch.device,
        done: int,
    ) -> dict[str, float]:
        """One optimizer step; each loss term's value."""
        training = self.config.training
        scale = 0.5 * (1 + math.cos(math.pi * done / self.steps)) if training.schedule == "cosine" else 1.0
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * scale
        if self.gated is not None:  # the temperature falls: open fractions move towards 0 or 1
            self.gated.set_sharpness(self.config.sharpen ** (done / self.steps))
        inputs, kwargs, target = unpack(to_device(batch, device))
        with torch.no_grad():
            expected = teacher(*inputs, **kwargs)
        task = distillation_loss(model(*inputs, **kwargs), expected, target, training)
        terms = self.regularizer(done / self.steps)
        loss = task + sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"task": task.item(), **{k: v.item() for k, v in terms.items()}}

    def _result(
        self, history: list[dict[str, float]], stats: dict
    ) -> tuple[DagModule, dict[int, float], dict]:
        tail = history[-max(1, len(history) // 10) :]
        stats["losses"] = {k: float(np.mean([h[k] for h in tail])) for k in tail[0]} if tail else {}
        if self.gated is None:
            return self.student, self.norms.scores(), stats
        with torch.no_grad():
            opened = self.gated.opened().detach().cpu()
            per_root = self.gated.per_root(opened)
            hard = self.gated.per_root((opened > 0.5).to(opened.dtype))
            stats.update(
                predicted=float(self.budget(hard)), closed=int((opened < 0.5).sum()), gates=len(opened)
            )
        folded = fold_gates(self.gated)
        return folded, _tie_broken(per_root, channel_scores(folded, self.groups, "l2"), self.groups), stats


def _tie_broken(opened: torch.Tensor, magnitude: dict[int, float], groups: Any) -> dict[int, float]:
    """Each prunable class root's gate, ties (gates that ended equally open, as after a short run) broken
    by the class's l2 magnitude over its group's largest, a thousandth of a gate at most."""
    scores = {}
    for group in groups.groups():
        if group.prunable:
            top = max((magnitude.get(r, 0.0) for r in group.channels), default=0.0) or 1.0
            scores.update({r: float(opened[r]) + 1e-3 * magnitude.get(r, 0.0) / top for r in group.channels})
    return scores


def _spread(opened: torch.Tensor) -> torch.Tensor:
    """The polarizing term (Zhuang et al., 2020): minus the mean distance of the gates from their mean,
    which pushes the gates below it to 0 and those above it to 1 (the budget then sets how many close)
    instead of all of them to the same middle value."""
    return -(opened - opened.mean()).abs().mean()


def _cycled(data: Iterable[Any], rank: int, world: int, seed: int, skip: int) -> Iterator[Any]:
    """This rank's batches, pass after pass over `data` (each pass seeded as `finetune` seeds an epoch),
    the first `skip` (trained on before a checkpoint) left out."""
    seen = 0
    for epoch in itertools.count():
        torch.manual_seed(seed + epoch)
        fresh = 0
        for batch in shard(iter(data), rank, world):
            fresh += 1
            seen += 1
            if seen > skip:
                yield batch
        if fresh == 0:
            raise ValueError(
                f"data gave no batch{' to this process' if world > 1 else ''} after {seen} batches: a one-pass "
                "iterator runs out; give a re-iterable (a DataLoader, a list) or fewer steps"
            )
