"""`prune`: remove channels to reach a global FLOPs (or params) target, whatever the architecture."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal, cast, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.utils import _pytree as pytree

from ..analysis import FlopReport, count_flops
from ..analysis.flops import flops_from_values
from ..core.dag import DagModule, evaluating
from ..core.errors import DagError
from ..core.ops import Parameter
from ..core.options import check_option, choices
from ..core.progress import show_progress
from ..passes.prepare import Prepared, as_inputs, check_fraction, prepare
from . import surgery
from .channels import ChannelGroups, Group
from .compensate import compensate
from .flop_model import FlopModel
from .groups import AttentionMode, channel_groups, check_protected
from .measured import CostModel, CostTable, Measured, meet_measured
from .report import Measure, PruneReport, group_rows, layer_rows

Criterion = Literal["l1", "l2", "bn_scale", "taylor", "random"]
Compensation = Literal["lstsq", "mean", "none"]
TARGETS = ("flops_ratio", "params_ratio", "kmapp", "latency_ratio")
DEFAULT_ROUND_TO = 8  # without a latency table to say what the device prefers


@dataclass(frozen=True)
class PruneConfig:
    """Settings of one pruning run."""

    criterion: Criterion = "l2"  # taylor needs calibration batches
    # kept widths are multiples of this where a group is wide enough (fast kernels); None: the latency
    # table's choice for its device with a latency target, else DEFAULT_ROUND_TO
    round_to: int | None = None
    min_channels: int = 1  # never keep fewer channels in a group
    tolerance: float = 0.02  # |achieved ratio - target| allowed
    attention: AttentionMode = "heads"
    seed: int = 0
    max_removed: float = 1.0  # the largest fraction of any group's channels removed
    compensate: Compensation = "lstsq"  # with calibration batches, make up for removed inputs

    def __post_init__(self) -> None:
        check_option("criterion", self.criterion, choices(Criterion), what="importance criterion")
        check_option("attention", self.attention, choices(AttentionMode), what="attention mode")
        check_option("compensate", self.compensate, choices(Compensation), what="compensation")
        if not 0 < self.max_removed <= 1:
            raise DagError(
                f"max_removed is a fraction of a group's channels in (0, 1], got {self.max_removed}"
            )


def channel_scores(
    dag: DagModule,
    groups: ChannelGroups,
    criterion: Criterion,
    seed: int = 0,
    calibration: Iterable | None = None,
    loss: Callable[[Any], torch.Tensor] | None = None,
) -> dict[int, float]:
    """Importance of each channel class, summed over every member that holds weights for it: for `l1`
    and `l2`, the magnitude of everything that goes with the channel (its producers' output rows and
    biases, its norms' affine entries, its consumers' input columns, tied parameters such as a class
    token), the whole group's view of it, as in Molchanov et al. (2019) and Fang et al. (2023).
    `taylor` needs `calibration` (an iterable of input tuples or tensors), see `taylor_scores`."""
    check_option("criterion", criterion, choices(Criterion), what="importance criterion")
    if criterion == "taylor":
        if calibration is None:
            raise DagError("the taylor criterion needs calibration batches (prune(..., calibration=batches))")
        return taylor_scores(dag, groups, calibration, loss)
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return {root: float(rng.random()) for g in groups.groups() for root in g.channels}
    if criterion == "bn_scale":  # a norm's role has the ids of its input
        norms = [(role, dag[name].module) for name, role in groups.roles.items()]
        return _summed(
            groups.size,
            [
                (groups.root(cast(np.ndarray, role.in_ids)), module.weight.detach().abs())
                for role, module in norms
                if role.axis is None and isinstance(module, _BatchNorm) and module.affine
            ],
        )
    parts = []
    for tensor, axis, roots in weight_members(dag, groups):
        flat = tensor.detach().movedim(axis, 0).reshape(tensor.shape[axis], -1)
        parts.append((roots, flat.abs().sum(1) if criterion == "l1" else flat.square().sum(1)))
    return _summed(groups.size, parts)


def weight_members(dag: DagModule, groups: ChannelGroups) -> list[tuple[torch.Tensor, int, np.ndarray]]:
    """Every parameter that holds weights for channels, as (parameter, axis, class root of each position
    along that axis): the tensors surgery slices (a grouped conv's input axis: one group's positions)
    and the parameters tied to a group (`Parameter` vertices)."""
    members: list[tuple[torch.Tensor, int, np.ndarray]] = []
    for name, role in groups.roles.items():
        module = dag[name].module
        if role.axis is not None:  # a tied tensor's role has its ids with its axis
            if isinstance(module, Parameter):
                members.append((module.weight, role.axis, groups.root(cast(np.ndarray, role.in_ids))))
            continue
        ids = {"in": role.in_ids, "out": role.out_ids}
        if role.in_ids is not None and surgery.kind(module) == "Grouped":
            ids["in_group"] = role.in_ids.reshape(cast(_ConvNd, module).groups, -1)[0]
        for attr, axis, side in surgery.SLICES.get(surgery.kind(module) or "", []):
            tensor, selected = module._parameters.get(attr), ids.get(side)
            if tensor is not None and selected is not None and tensor.dim() > axis:
                members.append((tensor, axis, groups.root(selected)))
    return members


def taylor_scores(
    dag: DagModule,
    groups: ChannelGroups,
    calibration: Iterable,
    loss: Callable[[Any], torch.Tensor] | None = None,
) -> dict[int, float]:
    """First-order Taylor importance of each channel class (Molchanov et al., 2019): per batch, the
    sum over every weight the class owns, in every member, of weight x gradient (the first-order
    change of the loss if the channel were removed), squared and summed over batches.

    `loss(outputs)` defaults to the cross-entropy against the model's own top-1 for logits (N x C), else
    half the mean square of the outputs. Runs in eval mode; the DAG's `.grad`s are left untouched."""
    loss = loss or _self_supervised_loss
    members = weight_members(dag, groups)
    params = list({id(p): p for p, _, _ in members}.values())
    frozen = [p for p in params if not p.requires_grad]
    scores: dict[int, float] = defaultdict(float)
    try:
        for p in frozen:
            p.requires_grad_(True)
        with evaluating(dag):
            _taylor_batches(dag, calibration, loss, params, members, scores)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return dict(scores)


def _taylor_batches(
    dag: DagModule,
    calibration: Iterable,
    loss: Callable[[Any], torch.Tensor],
    params: list,
    members: list,
    scores: dict[int, float],
) -> None:
    for batch in calibration:
        batch = as_inputs(batch)
        grads = torch.autograd.grad(loss(dag(*batch)), params, allow_unused=True)
        by_id = {id(p): g for p, g in zip(params, grads)}
        per_batch: dict[int, float] = defaultdict(float)
        for p, axis, roots in members:
            grad = by_id[id(p)]
            if grad is None:
                continue
            change = (p.detach() * grad).movedim(axis, 0).reshape(p.shape[axis], -1).sum(1)
            for root, value in zip(roots.tolist(), change.double().tolist()):
                per_batch[root] += value
        for root, value in per_batch.items():
            scores[root] += value * value


def _self_supervised_loss(outputs: Any) -> torch.Tensor:
    leaves = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(leaves) == 1 and leaves[0].dim() == 2 and leaves[0].shape[1] > 1:
        logits = leaves[0]
        return F.cross_entropy(logits, logits.argmax(1))
    if not leaves:
        raise TypeError(
            "the taylor criterion's default loss needs a floating-point tensor among the outputs: "
            "give channel_scores a loss"
        )
    terms = [0.5 * t.square().mean() for t in leaves]
    return sum(terms[1:], terms[0])


def _summed(size: int, parts: list[tuple[np.ndarray, torch.Tensor]]) -> dict[int, float]:
    """The score of each channel class: the sum of the values given for it, in order, over every
    (class root of each position, value of each position) pair; classes given no value are absent."""
    total, given = np.zeros(size), np.zeros(size, dtype=bool)
    for roots, values in parts:
        np.add.at(total, roots, values.double().numpy())
        given[roots] = True
    roots = np.flatnonzero(given)
    return dict(zip(roots.tolist(), total[roots].tolist()))


def _removal_order(groups: list[Group], scores: dict[int, float]) -> list[tuple[int, int]]:
    """(group index, class root) from least to most important, scores normalized per group so that
    groups of different layers compare; ties broken by position, so equal scores still order."""
    order: list[tuple[float, int, int, int]] = []  # (normalized score, group index, position, root)
    for index, group in enumerate(groups):
        values = np.array([scores.get(r, 0.0) for r in group.channels])
        normalized = values / max(values.mean(), 1e-12)
        order.extend(
            (float(v), index, position, root)
            for position, (v, root) in enumerate(zip(normalized, group.channels))
        )
    order.sort()
    return [(index, root) for _, index, _, root in order]


def _removed_roots(
    groups: list[Group],
    order: list[tuple[int, int]],
    remove: int,
    config: PruneConfig,
    owners: dict[int, list[int]],
    scores: dict[int, float],
) -> set[int]:
    """The `remove` least important channels, within each group's minimum and rounding, and never
    every channel a producer makes (a concat joins producers that each need one). Anything not
    returned here is kept, including channels outside every group."""
    candidates: dict[int, list[int]] = defaultdict(list)
    for index, root in order[:remove]:
        candidates[index].append(root)
    removed: set[int] = set()
    for index, group in enumerate(groups):
        size = len(group.channels)
        keep = max(
            size - len(candidates[index]),
            min(config.min_channels, size),
            math.ceil(size * (1 - config.max_removed) - 1e-9),
        )
        # a class of several channels side by side (an attention head): round the classes so that the
        # layers' widths are multiples of round_to; strided ones (grouped convs) round the classes themselves
        round_to = config.round_to or DEFAULT_ROUND_TO
        step = round_to // math.gcd(round_to, group.unit)
        if step > 1 and size >= step:
            keep = min(size, max(step, math.ceil(keep / step) * step))
        removed.update(candidates[index][: size - keep])
    for roots in owners.values():
        if removed.issuperset(roots):
            removed.discard(max(roots, key=lambda r: scores.get(r, 0.0)))
    return removed


@overload
def prune(
    dag: DagModule,
    flops_ratio: float | None = ...,
    example_inputs: tuple | torch.Tensor | None = ...,
    *,
    params_ratio: float | None = ...,
    kmapp: float | None = ...,
    latency_ratio: float | None = ...,
    latency_table: CostTable | None = ...,
    config: PruneConfig = ...,
    calibration: Iterable | None = ...,
    protected: Iterable[str] = ...,
    progress: bool = ...,
    return_report: Literal[False] = ...,
) -> DagModule: ...


@overload
def prune(
    dag: DagModule,
    flops_ratio: float | None = ...,
    example_inputs: tuple | torch.Tensor | None = ...,
    *,
    params_ratio: float | None = ...,
    kmapp: float | None = ...,
    latency_ratio: float | None = ...,
    latency_table: CostTable | None = ...,
    config: PruneConfig = ...,
    calibration: Iterable | None = ...,
    protected: Iterable[str] = ...,
    progress: bool = ...,
    return_report: Literal[True],
) -> tuple[DagModule, PruneReport]: ...


def prune(
    dag: DagModule,
    flops_ratio: float | None = None,
    example_inputs: tuple | torch.Tensor | None = None,
    *,
    params_ratio: float | None = None,
    kmapp: float | None = None,
    latency_ratio: float | None = None,
    latency_table: CostTable | None = None,
    config: PruneConfig = PruneConfig(),
    calibration: Iterable | None = None,
    protected: Iterable[str] = (),
    progress: bool = False,
    return_report: bool = False,
) -> DagModule | tuple[DagModule, PruneReport]:
    """A smaller DagModule with about `flops_ratio` of the FLOPs (fvcore convention), or `params_ratio`
    of the parameters, or a `kmapp` (FLOPs per input pixel / 1000) of its own, channels removed by
    importance across every prunable channel group; the input DAG is left untouched. With
    `latency_ratio` and a `latency_table` (`td.latency_table`, built on this DAG for the device, dtype
    and batch that matter) widths are chosen on the table's predicted latency, then the result is
    measured against the original there and the choice corrected (up to `MEASURED_ROUNDS` times); the
    report's `reached` is the measured ratio and `predicted` the table's, and widths are rounded as the
    table prefers unless `config.round_to` says otherwise.

    The least important channels (scores normalized within each group) go first; the number removed
    is bisected until the target is met within `config.tolerance`. A DAG with nested DagModules (from
    `passes.nest`) is flattened first, and the result is flat. `example_inputs` default to random
    inputs of the shapes the DAG was converted with; `calibration` batches feed the taylor criterion and
    then make up for what the pruned layers lost (`config.compensate`: least squares by default).
    With `return_report`, returns `(pruned, PruneReport)`: the ratio reached, the rounding used, every
    channel group's width before and after (or why it is fixed) and every layer's widths (`.table()`).
    `protected` vertices keep their channels; a name that is no vertex raises. A missed target warns,
    naming the fixed groups that held the ratio up and their reasons.
    """
    # channels cross block boundaries: a nested DAG is pruned flat; calibration is read twice (taylor,
    # then compensation), so it is listed
    targets = dict(zip(TARGETS, (flops_ratio, params_ratio, kmapp, latency_ratio)))
    prep = prepare(
        dag,
        example_inputs,
        calibration,
        targets=targets,
        fractions=("flops_ratio", "params_ratio", "latency_ratio"),
    )
    config = with_rounding(config, prep.target, latency_table)
    dag, inputs = prep.dag, prep.example_inputs
    protected = check_protected(dag, protected)
    with torch.no_grad():
        values = dag.run_collecting(*inputs)  # one forward serves the FLOP count and the groups
    counted = flops_from_values(dag, values, inputs)
    target = target_ratio(prep, counted)
    groups = channel_groups(dag, inputs, protected, values=values, attention=config.attention)
    del values
    scores = channel_scores(dag, groups, config.criterion, config.seed, prep.calibration)
    cost = latency_table.cost_model(groups) if latency_table is not None else None
    search = WidthSearch(dag, groups, inputs, config, counted, prep.target or "flops_ratio", scores, cost)
    found = search.run(target, progress)
    measured = None
    if latency_table is not None:
        found, measured = meet_measured(search, found, target, latency_table, progress)
    if config.compensate != "none" and prep.calibration is not None:
        compensate(
            dag,
            found.pruned,
            groups,
            search.keep(found.removed),
            prep.calibration,
            config.compensate,
            progress,
        )
    report = search.report(found, target, measured)
    warn_if_off(report, config)
    return (found.pruned, report) if return_report else found.pruned


def with_rounding(config: PruneConfig, target: str | None, table: CostTable | None) -> PruneConfig:
    """`config` with its rounding settled: the table's with a latency target, else the default; a table
    without a latency target, or a latency target without a table, is an error."""
    if (target == "latency_ratio") != (table is not None):
        raise DagError(
            "a latency target needs a latency table and a latency table a latency target: "
            "prune(dag, latency_ratio=0.5, latency_table=td.latency_table(dag, inputs, batch_size=...))"
        )
    if table is not None and table.attention != config.attention:
        raise DagError(
            f"the latency table was built with attention={table.attention!r}, the config asks for "
            f"{config.attention!r}: build the table with the same attention mode"
        )
    if config.round_to is not None:
        return config
    return replace(config, round_to=table.round_to if table is not None else DEFAULT_ROUND_TO)


def target_ratio(prep: Prepared, counted: FlopReport) -> float:
    """The target as a ratio of the model's FLOPs (or params): a kmapp over the model's own kmapp."""
    target, value = prep.goal
    if target != "kmapp":
        return value
    if counted.kmapp is None:
        raise DagError("a kmapp target needs an image input (N x C x H x W) to count pixels")
    ratio = value / counted.kmapp
    check_fraction(f"kmapp={value:g} over the model's own {counted.kmapp:.4g}", ratio)
    return ratio


def warn_if_off(report: PruneReport, config: PruneConfig) -> None:
    """Say when the target was missed, and why (the fixed groups that held the ratio up), or met only at
    a finer rounding of widths (at prune's caller)."""
    if report.missed:
        warnings.warn(f"prune: {report.why()}", stacklevel=3)
    elif config.round_to is not None and report.round_to != config.round_to:
        warnings.warn(
            f"prune: widths rounded to multiples of {report.round_to} instead of {config.round_to}, the "
            f"{report.measure} target {report.target:.3f} being out of reach otherwise (reached "
            f"{report.reached:.3f})",
            stacklevel=3,
        )


@dataclass(frozen=True)
class Found:
    """One candidate: the pruned DAG, the ratio it measures, its removal mask and rounding of widths."""

    pruned: DagModule
    ratio: float
    removed: np.ndarray  # over channel ids, true at the class roots removed
    round_to: int


class WidthSearch:
    """Which channels to remove for a target: the removal order bisected on the FLOP model's prediction
    (FLOPs and params of convs, linears and norms scale with their kept channel fractions), then on
    measurements where ops outside the model move the ratio; at finer roundings of widths when needed."""

    def __init__(
        self,
        dag: DagModule,
        groups: ChannelGroups,
        inputs: tuple,
        config: PruneConfig,
        counted: FlopReport,
        target: str,
        scores: dict[int, float],
        cost: CostModel | None = None,
    ):
        self.dag, self.groups, self.inputs, self.config, self.counted = dag, groups, inputs, config, counted
        self.by_params, self.scores = target == "params_ratio", scores
        self.measure: Measure = "params" if self.by_params else "latency" if cost is not None else "FLOPs"
        self.prunable = [g for g in groups.groups() if g.prunable]
        self.order = _removal_order(self.prunable, scores)
        self.model = cost or FlopModel(groups, counted.params if self.by_params else counted.flops)
        self.owners = must_keep(groups)

    def run(self, target: float, progress: bool) -> Found:
        """The best candidate at the configured rounding; when the target is out of reach there, the
        rounding is halved (8 -> 4 -> 2 -> 1): rounding widths makes the reachable ratios coarse."""
        roundings = [self.config.round_to or DEFAULT_ROUND_TO]
        while roundings[-1] > 1:
            roundings.append(roundings[-1] // 2)
        bar = show_progress(total=len(roundings), desc="prune", unit="try", disable=not progress)
        for round_to in roundings:
            found = self.at_rounding(target, round_to)
            bar.update()
            bar.set_postfix_str(f"{self.measure} ratio {found.ratio:.3f}, widths rounded to {round_to}")
            if abs(found.ratio - target) <= self.config.tolerance:
                break
        bar.close()
        return found

    def at_rounding(self, target: float, round_to: int) -> Found:
        tolerance = self.config.tolerance / 2
        order, remove = _fit(
            self.order, lambda o, k: self.model.ratio(self.removed(o, k, round_to)), target, tolerance
        )
        found = self.build(order, remove, round_to)
        if (
            abs(found.ratio - target) > tolerance and self.measure != "latency"
        ):  # ops outside the model moved it
            remove = _bisect(len(order), lambda k: self.build(order, k, round_to).ratio, target)
            found = self.build(order, remove, round_to)
        return found

    def removed(self, order: list[tuple[int, int]], remove: int, round_to: int) -> np.ndarray:
        """A mask over channel ids, true at the class roots removed."""
        mask = np.zeros(self.groups.size, dtype=bool)
        rounded = replace(self.config, round_to=round_to)
        mask[list(_removed_roots(self.prunable, order, remove, rounded, self.owners, self.scores))] = True
        return mask

    def keep(self, removed: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return lambda ids: ~removed[self.groups.root(ids)]

    def build(self, order: list[tuple[int, int]], remove: int, round_to: int) -> Found:
        removed = self.removed(order, remove, round_to)
        pruned = surgery.apply(self.dag, self.groups, self.keep(removed))
        if self.measure == "latency":  # predicted here; measured once chosen (`meet_measured`)
            ratio = self.model.ratio(removed)
        elif self.by_params:
            ratio = sum(p.numel() for p in pruned.parameters()) / self.counted.total_params
        else:
            ratio = count_flops(pruned, *self.inputs).total_flops / self.counted.total_flops
        return Found(pruned, ratio, removed, round_to)

    def report(self, found: Found, target: float, measured: Measured | None = None) -> PruneReport:
        kept, full = _out_widths(found.pruned), _out_widths(self.dag)
        narrowed = sum(1 for g in self.prunable if any(p in kept and kept[p] != full[p] for p in g.producers))
        return PruneReport(
            self.measure,
            target,
            found.ratio if measured is None else measured.ratio,
            found.round_to,
            len(self.groups.groups()),
            len(self.prunable),
            narrowed,
            group_rows(self.groups, self.counted, found.removed),
            layer_rows(self.dag, found.pruned),
            self.config.tolerance,
            self.model.ratio(self.removed(self.order, len(self.order), 1)),
            *(() if measured is None else (found.ratio, measured.ms)),
        )


def _out_widths(dag: DagModule) -> dict[str, int]:
    """The output width (the weight's first dimension) of each vertex with a weight."""
    weights = {v.name: getattr(v.module, "weight", None) for v in dag}
    return {name: weight.shape[0] for name, weight in weights.items() if weight is not None}


def must_keep(groups: ChannelGroups) -> dict[int, list[int]]:
    """The class roots of each id set that must keep a channel: every producer's, every part of a split."""
    sets = [*groups.producers.values(), *(p for role in groups.roles.values() for p in role.parts)]
    return {i: sorted({int(r) for r in groups.root(ids)}) for i, ids in enumerate(sets)}


def _fit(
    order: list[tuple[int, int]],
    ratio_of: Callable[[list[tuple[int, int]], int], float],
    target: float,
    tolerance: float,
    skips: int = 16,
) -> tuple[list[tuple[int, int]], int]:
    """The removal order and the number removed from its front whose ratio is closest to `target`.

    When even the closest number misses by more than `tolerance`, one removal jumps over the target: a
    wide class (an attention head whose embedding width goes with it) or a group's rounding step. That
    entry is kept instead and the rest of the order bisected again, up to `skips` times."""
    remove = _bisect(len(order), lambda k: ratio_of(order, k), target)
    for _ in range(skips):
        ratio = ratio_of(order, remove)
        jump = remove - 1 if ratio < target else remove  # removing order[jump] crosses the target
        if abs(ratio - target) <= tolerance or not 0 <= jump < len(order):
            break
        order = order[:jump] + order[jump + 1 :]
        remove = _bisect(len(order), partial(ratio_of, order), target)
    return order, remove


def _bisect(n: int, ratio_of: Callable[[int], float], target: float) -> int:
    """The number of channels to remove (0..n) whose FLOPs ratio is closest to `target`."""
    low, high, best, best_gap = 0, n, 0, float("inf")
    while low <= high:
        middle = (low + high) // 2
        ratio = ratio_of(middle)
        if abs(ratio - target) < best_gap:
            best, best_gap = middle, abs(ratio - target)
        if ratio > target:
            low = middle + 1
        else:
            high = middle - 1
    return best
