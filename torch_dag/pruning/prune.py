"""`prune`: remove channels to reach a global FLOPs (or params) target, whatever the architecture."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from tqdm import tqdm

from ..analysis import count_flops
from ..analysis.flops import flops_from_values
from ..core.dag import DagModule, evaluating
from ..core.errors import DagError
from ..core.ops import Parameter, is_dag_module
from ..passes.factorize import conv_geometry, row_gram
from ..passes.hierarchy import flatten
from . import surgery
from .channels import ChannelGroups, Group
from .groups import channel_groups


@dataclass(frozen=True)
class PruneConfig:
    """Settings of one pruning run."""

    criterion: str = "l2"  # l1 | l2 | bn_scale | taylor (needs calibration batches) | random
    round_to: int = 8  # kept widths are multiples of this (where the group is wide enough): fast kernels
    min_channels: int = 1  # never keep fewer channels in a group
    tolerance: float = 0.02  # |achieved ratio - target| allowed
    attention: str = "heads"  # heads: remove whole attention heads; head_dim: the same positions of every head
    seed: int = 0
    max_removed: float = 1.0  # the largest fraction of any group's channels removed
    compensate: str = "lstsq"  # with calibration batches, make up for removed inputs: lstsq | mean | none

    def __post_init__(self) -> None:
        if self.compensate not in ("lstsq", "mean", "none"):
            raise DagError(f"unknown compensation {self.compensate!r}: use lstsq, mean or none")
        if not 0 < self.max_removed <= 1:
            raise DagError(f"max_removed is a fraction of a group's channels in (0, 1], got {self.max_removed}")


@dataclass(frozen=True)
class PruneReport:
    """What a pruning run chose and reached (`prune(..., return_report=True)`)."""

    measure: str  # "FLOPs" or "params"
    target: float
    reached: float
    round_to: int  # the rounding of widths used: the one asked for, or a finer one when that could not reach the target
    groups: int
    prunable: int
    narrowed: int  # prunable groups that lost channels

    def __str__(self) -> str:
        return (f"{self.measure} ratio {self.reached:.3f} (target {self.target:.3f}); widths rounded to multiples "
                f"of {self.round_to} where a group is that wide; {self.groups} channel groups, {self.prunable} "
                f"prunable, {self.narrowed} narrowed")


def channel_scores(dag: DagModule, groups: ChannelGroups, criterion: str, seed: int = 0,
                   calibration: Iterable | None = None, loss: Callable[[Any], torch.Tensor] | None = None
                   ) -> dict[int, float]:
    """Importance of each channel class, summed over every member that holds weights for it: for `l1`
    and `l2`, the magnitude of everything that goes with the channel (its producers' output rows and
    biases, its norms' affine entries, its consumers' input columns, tied parameters such as a class
    token), the whole group's view of it, as in Molchanov et al. (2019) and Fang et al. (2023).
    `taylor` needs `calibration` (an iterable of input tuples or tensors), see `taylor_scores`."""
    if criterion == "taylor":
        if calibration is None:
            raise DagError("the taylor criterion needs calibration batches (prune(..., calibration=batches))")
        return taylor_scores(dag, groups, calibration, loss)
    if criterion == "random":
        rng = np.random.default_rng(seed)
        return {root: float(rng.random()) for g in groups.groups() for root in g.channels}
    if criterion == "bn_scale":
        norms = [(role, dag[name].module) for name, role in groups.roles.items()]
        return _summed(groups.size, [(groups.root(role.in_ids), module.weight.detach().abs())
                                     for role, module in norms if role.axis is None
                                     and isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine])
    if criterion not in ("l1", "l2"):
        raise DagError(f"unknown importance criterion {criterion!r}: use l1, l2, bn_scale, taylor or random")
    parts = []
    for tensor, axis, roots in weight_members(dag, groups):
        flat = tensor.detach().movedim(axis, 0).reshape(tensor.shape[axis], -1)
        parts.append((roots, flat.abs().sum(1) if criterion == "l1" else flat.square().sum(1)))
    return _summed(groups.size, parts)


def weight_members(dag: DagModule, groups: ChannelGroups) -> list[tuple[torch.Tensor, int, np.ndarray]]:
    """Every parameter that holds weights for channels, as (parameter, axis, class root of each position
    along that axis): the tensors surgery slices (a grouped conv's input axis: one group's positions)
    and the parameters tied to a group (`Parameter` vertices)."""
    members = []
    for name, role in groups.roles.items():
        module = dag[name].module
        if role.axis is not None:
            if isinstance(module, Parameter):
                members.append((module.weight, role.axis, groups.root(role.in_ids)))
            continue
        ids = {"in": role.in_ids, "out": role.out_ids}
        if role.in_ids is not None and surgery.kind(module) == "Grouped":
            ids["in_group"] = role.in_ids.reshape(module.groups, -1)[0]
        for attr, axis, side in surgery.SLICES.get(surgery.kind(module) or "", []):
            tensor = module._parameters.get(attr)
            if tensor is not None and ids.get(side) is not None and tensor.dim() > axis:
                members.append((tensor, axis, groups.root(ids[side])))
    return members


def taylor_scores(dag: DagModule, groups: ChannelGroups, calibration: Iterable,
                  loss: Callable[[Any], torch.Tensor] | None = None) -> dict[int, float]:
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


def _taylor_batches(dag: DagModule, calibration: Iterable, loss: Callable[[Any], torch.Tensor], params: list,
                    members: list, scores: dict[int, float]) -> None:
    for batch in calibration:
        batch = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
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
    return sum(0.5 * t.square().mean() for t in leaves)


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
    order = []
    for index, group in enumerate(groups):
        values = np.array([scores.get(r, 0.0) for r in group.channels])
        normalized = values / max(values.mean(), 1e-12)
        order.extend((float(v), index, position, root)
                     for position, (v, root) in enumerate(zip(normalized, group.channels)))
    order.sort()
    return [(index, root) for _, index, _, root in order]


def _removed_roots(groups: list[Group], order: list[tuple[int, int]], remove: int, config: PruneConfig,
                   owners: dict[int, list[int]], scores: dict[int, float]) -> set[int]:
    """The `remove` least important channels, within each group's minimum and rounding, and never
    every channel a producer makes (a concat joins producers that each need one). Anything not
    returned here is kept, including channels outside every group."""
    candidates: dict[int, list[int]] = defaultdict(list)
    for index, root in order[:remove]:
        candidates[index].append(root)
    removed: set[int] = set()
    for index, group in enumerate(groups):
        size = len(group.channels)
        keep = max(size - len(candidates[index]), min(config.min_channels, size),
                   math.ceil(size * (1 - config.max_removed) - 1e-9))
        # a class of several channels side by side (an attention head): round the classes so that the
        # layers' widths are multiples of round_to; strided ones (grouped convs) round the classes themselves
        step = config.round_to // math.gcd(config.round_to, group.unit)
        if step > 1 and size >= step:
            keep = min(size, max(step, math.ceil(keep / step) * step))
        removed.update(candidates[index][: size - keep])
    for roots in owners.values():
        if removed.issuperset(roots):
            removed.discard(max(roots, key=lambda r: scores.get(r, 0.0)))
    return removed


def prune(dag: DagModule, flops_ratio: float | None = None, example_inputs: tuple | torch.Tensor | None = None, *,
          params_ratio: float | None = None, kmapp: float | None = None, config: PruneConfig = PruneConfig(),
          calibration: Iterable | None = None, protected: Iterable[str] = (), progress: bool = False,
          return_report: bool = False) -> DagModule | tuple[DagModule, PruneReport]:
    """A smaller DagModule with about `flops_ratio` of the FLOPs (fvcore convention), or `params_ratio`
    of the parameters, or a `kmapp` (FLOPs per input pixel / 1000) of its own, channels removed by
    importance across every prunable channel group; the input DAG is left untouched.

    The least important channels (scores normalized within each group) go first; the number removed
    is bisected until the target is met within `config.tolerance`. A DAG with nested DagModules (from
    `passes.nest`) is flattened first, and the result is flat. `example_inputs` default to random
    inputs of the shapes the DAG was converted with; `calibration` batches feed the taylor criterion and
    then make up for what the pruned layers lost (`config.compensate`: least squares by default).
    With `return_report`, returns `(pruned, PruneReport)`: the ratio reached and the rounding used.
    """
    given = {k: v for k, v in (("flops_ratio", flops_ratio), ("params_ratio", params_ratio), ("kmapp", kmapp))
             if v is not None}
    if len(given) != 1:
        raise DagError(f"give exactly one of flops_ratio, params_ratio, kmapp (got {sorted(given) or 'none'})")
    if example_inputs is None:
        example_inputs = dag.example_inputs()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if calibration is not None:  # read twice (taylor, then compensation): a generator would be spent
        calibration = list(calibration)
    if any(is_dag_module(v.module) for v in dag):  # channels cross block boundaries: prune the flat graph
        dag = flatten(dag)
    with torch.no_grad():
        values = dag.run_collecting(*example_inputs)  # one forward serves the FLOP count and the groups
    report = flops_from_values(dag, values, example_inputs)
    by_params = params_ratio is not None
    if kmapp is not None:
        if report.kmapp is None:
            raise DagError("a kmapp target needs an image input (N x C x H x W) to count pixels")
        flops_ratio = kmapp / report.kmapp
    target = params_ratio if by_params else flops_ratio
    if not 0 < target <= 1:
        raise DagError(f"the target must keep a fraction in (0, 1] of the model, got {target:.4g} "
                       f"({', '.join(f'{k}={v}' for k, v in given.items())})")
    groups = channel_groups(dag, example_inputs, protected, values=values, attention=config.attention)
    del values
    prunable = [g for g in groups.groups() if g.prunable]
    scores = channel_scores(dag, groups, config.criterion, config.seed, calibration)
    order = _removal_order(prunable, scores)
    model = _FlopModel(groups, report.params if by_params else report.flops)

    owners = must_keep(groups)

    def removed_roots(order: list[tuple[int, int]], remove: int, round_to: int) -> np.ndarray:
        """A mask over channel ids, true at the class roots removed."""
        mask = np.zeros(groups.size, dtype=bool)
        rounded = replace(config, round_to=round_to)
        mask[list(_removed_roots(prunable, order, remove, rounded, owners, scores))] = True
        return mask

    def build(order: list[tuple[int, int]], remove: int, round_to: int) -> tuple[DagModule, float, np.ndarray]:
        removed = removed_roots(order, remove, round_to)
        pruned = surgery.apply(dag, groups, lambda ids: ~removed[groups.root(ids)])
        if by_params:
            return pruned, sum(p.numel() for p in pruned.parameters()) / report.total_params, removed
        return pruned, count_flops(pruned, *example_inputs).total_flops / report.total_flops, removed

    what = "params" if by_params else "FLOPs"
    # rounding widths makes the reachable ratios coarse: when the target is out of reach at this
    # rounding, halve it (8 -> 4 -> 2 -> 1) and say so
    roundings = [config.round_to]
    while roundings[-1] > 1:
        roundings.append(roundings[-1] // 2)
    bar = tqdm(total=len(roundings), desc="prune", unit="try", disable=not progress)
    for round_to in roundings:
        # FLOPs (and params) of convs, linears and norms scale with their kept channel fractions: bisect on that
        kept_order, remove = _fit(order, lambda o, k, r=round_to: model.ratio(removed_roots(o, k, r)), target,
                                  config.tolerance / 2)
        best, best_ratio, removed = build(kept_order, remove, round_to)
        if abs(best_ratio - target) > config.tolerance / 2:  # ops outside the model moved it: measure
            remove = _bisect(len(kept_order), lambda k, o=kept_order, r=round_to: build(o, k, r)[1], target)
            best, best_ratio, removed = build(kept_order, remove, round_to)
        bar.update()
        bar.set_postfix_str(f"{what} ratio {best_ratio:.3f}, widths rounded to {round_to}")
        if abs(best_ratio - target) <= config.tolerance:
            break
    bar.close()
    if config.compensate != "none" and calibration is not None:
        compensate(dag, best, groups, lambda ids: ~removed[groups.root(ids)], calibration, config.compensate,
                   progress)
    if abs(best_ratio - target) > config.tolerance:  # removing channels in order of importance skips it
        warnings.warn(f"prune: the {what} ratio reached is {best_ratio:.3f}, outside {target:.3f} +- "
                      f"{config.tolerance:.3f}: removing channels in order of importance has no step closer "
                      "(few, wide channels); try another criterion or target", stacklevel=2)
    elif round_to != config.round_to:
        warnings.warn(f"prune: widths rounded to multiples of {round_to} instead of {config.round_to}, the "
                      f"{what} target {target:.3f} being out of reach otherwise (reached {best_ratio:.3f})",
                      stacklevel=2)
    if not return_report:
        return best
    kept = {v.name: v.module.weight.shape[0] for v in best if getattr(v.module, "weight", None) is not None}
    narrowed = sum(1 for g in prunable if any(p in kept and kept[p] != dag[p].module.weight.shape[0]
                                              for p in g.producers))
    return best, PruneReport(what, target, best_ratio, round_to, len(groups.groups()), len(prunable), narrowed)


def compensate(dag: DagModule, pruned: DagModule, groups: ChannelGroups, keep: Callable[[np.ndarray], np.ndarray],
               calibration: Iterable, how: str = "lstsq", progress: bool = False) -> None:
    """Make up, in place on `pruned`, for the input channels each layer lost, from what they carried on
    the calibration batches (run through the unpruned `dag`).

    `mean`: fold the removed channels' mean contribution into the layer's bias. A removed channel
    rarely carries zero on average (after a ReLU it never does), so dropping it shifts every output of
    the layers that read it; restoring the mean keeps the statistics the following norms and
    activations were trained on. Exact for a constant channel (one whose weights upstream were zero).
    `lstsq`: also re-solve the layer's kept weights so that its outputs, from the kept inputs alone,
    are the least-squares best fit of the unpruned outputs (ridge-regularized; a conv's k x k patches
    are its inputs; one float64 matrix of (inputs + 1)^2 per layer while recording). Convs with groups,
    and layers with over `MAX_LSTSQ` inputs, get `mean`."""
    readers = {}
    for name, role in groups.roles.items():
        module = dag[name].module
        if role.axis is not None or role.in_ids is None or surgery.kind(module) not in ("Conv", "Grouped", "Linear"):
            continue  # a depthwise conv's removed inputs only feed removed outputs
        dropped = ~keep(role.in_ids)
        if dropped.any():
            solve = how == "lstsq" and (isinstance(module, nn.Linear) or (
                isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"))
            readers[name] = _Reader(module, torch.from_numpy(dropped), solve)
    if not readers:
        return
    hooks = [r.module.register_forward_hook(r.record) for r in readers.values()]
    try:
        with evaluating(dag), torch.no_grad():
            for batch in tqdm(calibration, desc="prune: compensation", unit="batch", disable=not progress):
                dag(*((batch,) if isinstance(batch, torch.Tensor) else tuple(batch)))
    finally:
        for handle in hooks:
            handle.remove()
    if any(r.batches == 0 for r in readers.values()):
        raise DagError("compensation needs at least one calibration batch (the calibration given is empty)")
    for name, reader in readers.items():
        role = groups.roles[name]
        out = torch.from_numpy(keep(role.out_ids)) if role.out_ids is not None else slice(None)
        reader.apply(pruned[name].module, out)  # a new module: surgery sliced its inputs


MAX_LSTSQ = 4096  # inputs (channels x kernel positions) up to which a layer's weights are re-solved
RIDGE = 1e-2  # lstsq's pull towards the layer's own weights, relative to its inputs' mean energy


class _Reader:
    """A layer that lost input channels, and what it saw of them on the calibration batches."""

    def __init__(self, module: nn.Module, dropped: torch.Tensor, solve: bool):
        self.module, self.dropped = module, dropped
        self.geometry = conv_geometry(module)
        self.width = module.weight[0].numel() + 1  # the inputs of one output, and a constant
        self.solve = solve and self.width <= MAX_LSTSQ
        self.mean: torch.Tensor | float = 0.0  # summed over batches
        self.gram: torch.Tensor | float = 0.0
        self.batches = 0

    def record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0]
        self.batches += 1
        if self.solve:
            self.gram = self.gram + row_gram(x, self.geometry)
            return
        mask = self.dropped.to(x.device, x.dtype)
        if isinstance(module, nn.Linear):
            part = F.linear(x * mask, module.weight).reshape(-1, module.out_features)
        else:
            part = module._conv_forward(x * mask.view((-1,) + (1,) * (x.dim() - 2)), module.weight, None)
            part = part.transpose(0, 1).reshape(part.shape[1], -1).T
        self.mean = self.mean + part.double().mean(0)

    def apply(self, new: nn.Module, out: torch.Tensor | slice) -> None:
        """Set `new` (the sliced copy of the layer) to the compensated weights of its kept outputs."""
        weight = new.weight
        if self.solve:
            full = self.module.weight.detach().double().reshape(len(self.module.weight), -1)
            bias = self.module.bias.detach().double() if self.module.bias is not None else full.new_zeros(len(full))
            full = torch.cat([full, bias[:, None]], 1)[out]
            positions = self.module.weight[0, 0].numel()
            kept = torch.cat([(~self.dropped).repeat_interleave(positions), torch.tensor([True])])
            gram = self.gram / self.batches
            inner = gram[kept][:, kept]
            # ridge towards the layer's own weights (not towards zero), the constant left free: a strong
            # ridge gives back `mean`
            ridge = RIDGE * inner.diagonal()[:-1].mean() * torch.ones(len(inner), dtype=inner.dtype)
            ridge[-1] = 0
            solved = torch.linalg.solve(inner + ridge.diag(), (full @ gram[:, kept] + full[:, kept] * ridge).T).T
            new.weight = nn.Parameter(solved[:, :-1].reshape(weight.shape).to(weight), requires_grad=weight.requires_grad)
            bias = solved[:, -1]
        else:
            shift = (self.mean / self.batches)[out]
            bias = shift if new.bias is None else new.bias.detach().double() + shift
        new.bias = nn.Parameter(bias.to(weight), requires_grad=weight.requires_grad)


def must_keep(groups: ChannelGroups) -> dict[int, list[int]]:
    """The class roots of each id set that must keep a channel: every producer's, every part of a split."""
    sets = [*groups.producers.values(), *(p for role in groups.roles.values() for p in role.parts)]
    return {i: sorted({int(r) for r in groups.root(ids)}) for i, ids in enumerate(sets)}


def _fit(order: list[tuple[int, int]], ratio_of: Callable[[list[tuple[int, int]], int], float], target: float,
         tolerance: float, skips: int = 16) -> tuple[list[tuple[int, int]], int]:
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
        order = order[:jump] + order[jump + 1:]
        remove = _bisect(len(order), lambda k, o=order: ratio_of(o, k), target)
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


class _FlopModel:
    """Predicted FLOPs after slicing: each sliced vertex's FLOPs times its kept input and output
    channel fractions (exact for convs, linears and norms), attention's products by the shares of
    their FLOPs that shrink with heads or head dims (`Role.flop_shares`); other ops count as unchanged.

    Every fraction is a mean of the removal mask over some class roots: the roots of all of them lie
    end to end in one index array, so that a prediction is a few array operations, not one per vertex."""

    def __init__(self, groups: ChannelGroups, flops: dict[str, int]):
        self.total = sum(flops.values())
        segments: list[np.ndarray] = []

        def segment(roots: np.ndarray) -> int:  # -1: no channels, nothing to remove
            if not len(roots):
                return -1
            segments.append(roots)
            return len(segments) - 1

        sliced: list[int] = []  # FLOPs of each vertex that scales with its kept channel fractions
        sides: list[list[int]] = []  # its input and output segments
        shared: list[tuple[float, int]] = []  # FLOPs that shrink with the removed share of a segment
        for name, role in groups.roles.items():
            if not flops.get(name):
                continue
            if role.flop_shares:
                shared += [(flops[name] * share, segment(groups.root(ids))) for share, ids in role.flop_shares]
                continue
            same = role.out_ids is role.in_ids  # depthwise: one fraction, not two
            sides.append([segment(groups.root(ids)) if ids is not None else -1
                          for ids in (role.in_ids, None if same else role.out_ids)])
            sliced.append(flops[name])
        shared = [(f, s) for f, s in shared if s >= 0]
        lengths = np.array([len(r) for r in segments], dtype=np.int64)
        self._roots = np.concatenate(segments) if segments else np.zeros(0, dtype=np.int64)
        self._starts = np.cumsum(lengths) - lengths
        self._lengths = lengths
        self._sliced = np.array(sliced, dtype=np.float64)
        self._sides = np.array(sides, dtype=np.int64).reshape(-1, 2)
        self._shared = np.array([f for f, _ in shared], dtype=np.float64)
        self._shared_segments = np.array([s for _, s in shared], dtype=np.int64)

    def ratio(self, removed: np.ndarray) -> float:
        """The predicted FLOPs ratio when the class roots where `removed` (a mask over ids) is true go."""
        if not len(self._roots):
            return 1.0
        gone = np.add.reduceat(removed[self._roots].astype(np.float64), self._starts) / self._lengths
        kept = np.append(1 - gone, 1.0)  # index -1: a side without channels keeps everything
        fraction = kept[self._sides[:, 0]] * kept[self._sides[:, 1]]
        lost = self._sliced @ (1 - fraction) + self._shared @ gone[self._shared_segments]
        return float((self.total - lost) / self.total)
