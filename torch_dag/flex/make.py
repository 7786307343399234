"""`make_flexible`: one pass that turns every prunable channel group into nested, weight-shared widths.

The channel groups and importance scores are the pruning analysis's. First each prunable group's
channels are sorted by importance (physically, in every member: a function-preserving permutation,
checked on the example inputs), so a level that keeps the top k channels of a group keeps the first k
of each run of that group's channels along an axis: a prefix in a plain chain or residual stream, one
per query/key/value or per conv group. Levels are nested and each keeps the best channels of its size.
Every vertex that holds weights for a prunable group becomes a `FlexModule` whose level i reads the
kept channels; call templates that spell widths out (split sizes, slice bounds) get one per level.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..analysis.activations import conv_geometry, input_rows
from ..analysis.flops import flops_from_values
from ..core.compare import compare_outputs
from ..core.dag import DagModule, Vertex, evaluating
from ..core.errors import DagError
from ..core.template import to_json
from ..passes.factorize_solve import MIN_ROWS_PER_INPUT, Moment, shrinkage
from ..passes.prepare import (
    HOLD_OUT_EVERY,
    CalibrationSplit,
    Part,
    Prepared,
    as_inputs,
    check_fraction,
    prepare,
    split_calibration,
)
from ..pruning import surgery
from ..pruning.channels import ChannelGroups, Group
from ..pruning.compensate import MAX_LSTSQ, RIDGE
from ..pruning.flop_model import FlopModel
from ..pruning.groups import channel_groups
from ..pruning.prune import channel_scores, must_keep
from .model import FlexDagModule, is_flex
from .modules import FlexModule
from .widths import (
    FlexConfig,
    Keep,
    WidthPlan,
    at_widths,
    holds_channels,
    keep_mask,
)


def make_flexible(
    dag: DagModule,
    levels: Sequence[float | Sequence[float | int]] = (0.25, 0.5, 1.0),
    example_inputs: tuple | torch.Tensor | None = None,
    *,
    flops_ratios: Sequence[float] | None = None,
    config: FlexConfig = FlexConfig(),
    calibration: Iterable | None = None,
    protected: Iterable[str] = (),
) -> FlexDagModule:
    """A flexible copy of `dag` with one level per entry of `levels` (narrowest first): a width fraction
    for every prunable group, or a vector of widths (one per group, fractions or channel counts); or,
    with `flops_ratios`, levels whose widths (one fraction for all groups) keep those FLOPs ratios.
    The input DAG is left untouched; at a level of full widths the outputs equal the input's (unless
    `config.compensate` trades that for better narrow levels)."""
    if config.compensate != "none" and calibration is None:
        raise DagError(f"FlexConfig(compensate={config.compensate!r}) needs calibration batches")
    for ratio in flops_ratios or ():
        check_fraction("a FLOPs ratio (flops_ratios)", float(ratio))
    prep = prepare(dag, example_inputs, calibration)  # calibration is read by scores and compensation
    dag, inputs, protected = copy.deepcopy(prep.dag), prep.example_inputs, list(protected)
    with torch.no_grad():
        values = dag.run_collecting(*inputs)
    groups = channel_groups(dag, inputs, protected, values=values, attention=config.attention)
    dag, plan, ranking = _ranked(dag, groups, config, prep)
    model = FlopModel(groups, flops_from_values(dag, values, inputs).flops)
    del values
    if flops_ratios is not None:
        levels = [_fraction_for(plan, model, float(t)) for t in flops_ratios]
    removed = _level_removed(plan, levels)
    _check_growing(plan, model, removed, levels)
    keeps = [keep_mask(plan.groups, r) for r in removed]
    flex = _flexible_copy(dag, groups, keeps, protected, config, ranking)
    cast(dict, flex.width_info)["rounding"] = plan.roundings()
    flex._width_plan = plan
    if config.compensate == "lstsq":
        compensate_levels(flex, prep.calibration or ())  # not empty: checked above
    return flex


def _ranked(
    dag: DagModule, groups: ChannelGroups, config: FlexConfig, prep: Prepared
) -> tuple[DagModule, WidthPlan, list[np.ndarray]]:
    """Each prunable group's channels ranked by importance (and, with `config.reorder`, `dag` with them
    sorted so); the plan of widths and, per group, the positions of its classes best first."""
    prunable = [g for g in groups.groups() if g.prunable]
    if not prunable:
        raise DagError("no prunable channel group: nothing can be made flexible " + groups.summary()[:300])
    scores = channel_scores(dag, groups, config.criterion, config.seed, prep.calibration)
    if config.reorder:
        dag, scores = _reorder(dag, groups, prunable, scores, prep.example_inputs)
    ranking = [np.argsort([-scores.get(r, 0.0) for r in g.channels], kind="stable") for g in prunable]
    plan = WidthPlan(
        groups,
        prunable,
        [np.asarray(g.channels)[r] for g, r in zip(prunable, ranking)],
        must_keep(groups),
        config,
    )
    return dag, plan, ranking


def _level_removed(plan: WidthPlan, levels: Sequence[float | Sequence[float | int]]) -> list[np.ndarray]:
    """Per level, the mask of the channel classes it drops, nested: a level keeps at most what the next
    one keeps. Each group's widths are rounded as finely as it takes to keep its levels apart
    (`WidthPlan.choose_rounding`); a rounding finer than `config.round_to` is warned about."""
    if not levels:
        raise DagError("give at least one level")
    widths = [[w] * len(plan.prunable) if isinstance(w, (int, float)) else list(w) for w in levels]
    rounding = plan.choose_rounding(widths)
    finer = [(g.producers[0], r) for g, r in zip(plan.prunable, rounding) if r < plan.config.round_to]
    if finer:
        named = ", ".join(f"{name}: {r}" for name, r in finer[:8])
        warnings.warn(
            f"make_flexible: {len(finer)} of {len(rounding)} channel groups are too narrow for widths "
            f"rounded to multiples of {plan.config.round_to} at these levels (two levels would be one) "
            f"and round finer ({named}{', ...' if len(finer) > 8 else ''}); the rounding of every group "
            "is in width_info['rounding']",
            stacklevel=3,
        )
    removed = [plan.removed(plan.counts(w)) for w in widths]
    for i in range(len(removed) - 2, -1, -1):
        removed[i] |= removed[i + 1]
    return removed


def _check_growing(
    plan: WidthPlan,
    model: FlopModel,
    removed: list[np.ndarray],
    levels: Sequence[float | Sequence[float | int]],
) -> None:
    """Refuse levels whose FLOPs do not grow strictly from each to the next (two levels that are one
    model, or a narrower level after a wider one)."""
    flops = [model.total * model.ratio(r) for r in removed]
    if all(a < b for a, b in itertools.pairwise(flops)):
        return
    shown = ", ".join(
        f"level {i} ({_describe_level(w)}): {f / 1e6:.3f} MFLOPs"
        for i, (w, f) in enumerate(zip(levels, flops))
    )
    raise DagError(
        f"make_flexible: the levels' FLOPs do not grow strictly ({shown}), even with widths rounded per "
        f"group to {sorted(set(plan.roundings()))} (min_channels={plan.config.min_channels}): give "
        "levels further apart, fewer levels, or a smaller FlexConfig.min_channels"
    )


def _describe_level(widths: float | Sequence[float | int]) -> str:
    if isinstance(widths, (int, float)):
        return f"width {widths:g}"
    return f"widths {[round(float(w), 3) for w in widths][:6]}{' ...' if len(widths) > 6 else ''}"


def _flexible_copy(
    dag: DagModule,
    groups: ChannelGroups,
    keeps: list[Keep],
    protected: list[str],
    config: FlexConfig,
    ranking: list[np.ndarray],
) -> FlexDagModule:
    """`dag` with a `FlexModule` (one skeleton per level) for every vertex that holds weights for a
    prunable group, and per-level arguments for the call templates that spell widths out; its
    `width_info` holds what `WidthPlan.rebuild` needs to redo the analysis after loading."""
    vertices, level_args, full_args = [], {}, {}
    for vertex in dag:
        role = groups.roles.get(vertex.name)
        module = vertex.module
        if role is not None and holds_channels(module, role):
            module = FlexModule(module, *zip(*(at_widths(module, role, keep) for keep in keeps)))
        args, kwargs = vertex.args, {**vertex.kwargs, **(role.keywords if role else {})}
        if role is not None and role.rewrite is not None:
            level_args[vertex.name] = [(role.rewrite(keep), kwargs) for keep in keeps]
            full = role.rewrite(lambda ids: np.ones(len(ids), dtype=bool))
            full_args[vertex.name] = [to_json(list(full)), {k: to_json(v) for k, v in kwargs.items()}]
        vertices.append(Vertex(vertex.name, module, args, kwargs, dict(vertex.meta)))
    width_info = {
        "protected": protected,
        "config": config.__dict__.copy(),
        "full_args": full_args,
        "ranking": [r.tolist() for r in ranking],
    }
    flex = FlexDagModule(dag.input_names, vertices, dag.output, dag.input_meta, level_args, width_info)
    flex.train(dag.training)
    return flex


def compensate_levels(flex: FlexDagModule, calibration: Iterable) -> None:
    """Re-solve, in place, the shared weights of every Conv2d / Linear that loses input channels at some
    level: each output's weights become the least-squares best fit, summed over the levels it is part of
    (the top level included), of the layer's full outputs from the inputs that level keeps. Inputs are
    recorded at the top level on the calibration batches, split into fitting and held-out ones as
    `prepare.split_calibration` does (a conv's k x k patches; two float64 matrices of (inputs + 1)^2 per
    layer). A ridge pulls towards the layer's own weights, as in pruning's `lstsq` compensation (stronger
    with fewer fitting rows); a layer keeps the re-solved weights only where their held-out error summed
    over the levels is not worse than its own weights'. The narrow levels gain what that gives a
    separately pruned model, and the top level moves off the input model's outputs by the same trade.
    Grouped convs, other padding modes, layers with over `MAX_LSTSQ` inputs and (with one warning)
    layers with fewer fitting rows than `MIN_ROWS_PER_INPUT` x their inputs are left as they are."""
    layers = {v.name: v.module for v in flex if is_flex(v.module) and _solvable(v.module)}
    if not layers:
        return
    batches = tuple(as_inputs(b) for b in calibration)
    if not batches:
        raise DagError("compensation needs at least one calibration batch (the calibration given is empty)")
    split = split_calibration(batches)
    moments = _record_levels(flex, layers, split)
    short = {n: m for n, m in moments.items() if m.fit_rows < MIN_ROWS_PER_INPUT * _width(layers[n])}
    for name, module in layers.items():
        if name not in short:
            _solve_shared(module, moments[name])
    if short:
        _warn_short_levels(layers, short, split)


def _width(module: FlexModule) -> int:
    """The inputs of one output of the layer, and a constant with a bias."""
    return cast(torch.Tensor, module.weight)[0].numel() + (module.bias is not None)


def _record_levels(
    flex: FlexDagModule, layers: dict[str, FlexModule], split: CalibrationSplit
) -> dict[str, Moment]:
    """Each layer's input moments at the top level, on the fitting and the held-out rows."""
    moments = {name: Moment(_width(module)) for name, module in layers.items()}
    part: list[Part] = ["fit"]

    def recorder(name: str, geometry: tuple | None, bias: bool) -> Callable:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            rows = input_rows(args[0], geometry).double()
            rows = torch.cat([rows, rows.new_ones(len(rows), 1)], 1) if bias else rows
            moments[name].add(rows, part[0])

        return record

    was = flex.current_level()
    flex.set_level_use(flex.max_level())
    hooks = [
        m.register_forward_hook(recorder(n, conv_geometry(m.full), m.bias is not None))
        for n, m in layers.items()
    ]
    try:
        with evaluating(flex), torch.no_grad():
            for part[0], batch in split.parts():
                flex(*batch)
    finally:
        for handle in hooks:
            handle.remove()
        if was is not None:
            flex.set_level_use(was)
    return moments


def _warn_short_levels(
    layers: dict[str, FlexModule], short: dict[str, Moment], split: CalibrationSplit
) -> None:
    """One warning naming the layers left as they are for want of fitting rows, and what would do."""
    needs = sorted(
        ((split.batches_for(MIN_ROWS_PER_INPUT * _width(layers[n]), m.rows), n) for n, m in short.items()),
        reverse=True,
    )
    named = ", ".join(
        f"{n} ({short[n].fit_rows} fitting rows of {MIN_ROWS_PER_INPUT * _width(layers[n])})"
        for _, n in needs[:5]
    )
    warnings.warn(
        f"make_flexible: {len(short)} of {len(layers)} compensated layers have fewer fitting calibration "
        f"rows than {MIN_ROWS_PER_INPUT} x their inputs and keep their weights (the data-free choice): "
        f"{named}{', ...' if len(short) > 5 else ''}; {needs[0][0]} calibration batches like these would "
        f"be enough for all (every {HOLD_OUT_EVERY}th is held out)",
        stacklevel=3,
    )


def _solvable(module: FlexModule) -> bool:
    full = module.full
    if not (
        isinstance(full, nn.Linear)
        or (isinstance(full, nn.Conv2d) and full.groups == 1 and full.padding_mode == "zeros")
    ):
        return False
    weight = cast(torch.Tensor, module.weight)
    loses = any(
        len(index) < weight.shape[1]
        for cuts in module.cuts[:-1]
        for axis, index in cuts.get("weight", [])
        if axis == 1
    )
    return loses and weight[0].numel() + 1 <= MAX_LSTSQ


def _solve_shared(module: FlexModule, moment: Moment) -> None:
    """`compensate_levels` for one layer, from the moments of its full-width input rows: fitted on the
    fitting rows, kept where the held-out error summed over the levels is not worse."""
    weight, bias = cast(torch.Tensor, module.weight), cast("torch.Tensor | None", module.bias)
    full = weight.detach().double().reshape(len(weight), -1)
    if bias is not None:
        full = torch.cat([full, bias.detach().double()[:, None]], 1)
    gram = moment.fit()
    energy = (
        float(gram.diagonal()[: weight[0].numel()].mean()) or 1.0
    )  # (inputs that are all zero: any scale)
    alpha = shrinkage(moment.fit_rows, len(gram))
    ridge = torch.full((len(gram),), (RIDGE + alpha / (1 - alpha)) * energy, dtype=gram.dtype)
    if bias is not None:
        ridge[-1] = 0  # the constant is free
    narrower = _level_reads(module, gram.dtype)
    bands: dict[tuple[bool, ...], list[int]] = {}  # outputs by the levels they are part of
    for row in range(len(weight)):
        bands.setdefault(tuple(bool(outputs[row]) for _, outputs in narrower), []).append(row)
    solved = full.clone()
    for levels, rows in bands.items():
        target = full[rows].T
        lhs, rhs = gram + ridge.diag(), gram @ target + ridge[:, None] * target  # the top level, the ridge
        for (read, _), part in zip(narrower, levels):
            if part:
                lhs = lhs + read[:, None] * gram * read[None, :]
                rhs = rhs + read[:, None] * (gram @ target)
        solved[rows] = torch.linalg.solve(lhs, rhs).T
    if not moment.counts[-1]:
        return  # nothing held out to judge by: the data-free choice
    held = moment.held()
    if _level_error(solved, full, held, narrower) > _level_error(full, full, held, narrower):
        return
    with torch.no_grad():
        weight.copy_(solved[:, : weight[0].numel()].reshape(weight.shape))
        if bias is not None:
            bias.copy_(solved[:, -1])


def _level_reads(module: FlexModule, dtype: torch.dtype) -> list[tuple[torch.Tensor, np.ndarray]]:
    """Per level below the top: which columns (inputs x positions, the constant) it reads, which
    outputs it has."""
    weight = cast(torch.Tensor, module.weight)
    positions, bias = weight[0, 0].numel(), module.bias is not None
    narrower = []
    for cuts in module.cuts[:-1]:
        axes = dict(cuts.get("weight", []))
        inputs, outputs = np.zeros(weight.shape[1], bool), np.zeros(len(weight), bool)
        inputs[axes.get(1, slice(None))] = True
        outputs[axes.get(0, slice(None))] = True
        columns = np.append(np.repeat(inputs, positions), [True] * bias)
        narrower.append((torch.from_numpy(columns).to(dtype), outputs))
    return narrower


def _level_error(
    weights: torch.Tensor,
    full: torch.Tensor,
    held: torch.Tensor,
    narrower: list[tuple[torch.Tensor, np.ndarray]],
) -> float:
    """The squared error of `weights`' outputs against `full`'s on the held-out rows (moment `held`),
    summed over the top level and the levels below it (each reading its columns, for its outputs)."""
    levels = [(torch.ones(len(held), dtype=held.dtype), np.ones(len(full), bool)), *narrower]
    total = 0.0
    for read, outputs in levels:
        diff = (weights * read - full)[torch.from_numpy(outputs)]
        total += float(((diff @ held) * diff).sum())
    return total


def _reorder(
    dag: DagModule,
    groups: ChannelGroups,
    prunable: list[Group],
    scores: dict[int, float],
    example_inputs: tuple,
) -> tuple[DagModule, dict[int, float]]:
    """`dag` with each prunable group's channels sorted by importance, and the scores of the classes at
    their new places. Along an axis, a group's channels lie in runs (a residual stream: one run; the
    query, key and value of attention: one each; a grouped conv's inputs: one per group); each run is
    sorted, so every level keeps the first channels of each run (contiguous slices, cheap deltas). The
    result is checked on `example_inputs`; a group whose order the graph does not carry (the rules tie
    its channels, but an op in between shuffles them) keeps its channels in place."""
    rank = {}
    for index, group in enumerate(prunable):
        best_first = sorted(group.channels, key=lambda root: -scores.get(root, 0.0))
        rank.update({root: (index, k) for k, root in enumerate(best_first)})

    def reordered(allowed: set[int]) -> DagModule:
        cache: dict[bytes, np.ndarray] = {}

        def order(ids: np.ndarray) -> np.ndarray:
            key = ids.tobytes()
            if key not in cache:
                cache[key] = _sorted_runs(groups.root(ids), rank, allowed)
            return cache[key]

        return surgery.permute(dag, groups, order)

    reference = _outputs(dag, example_inputs)

    def agrees(candidate: DagModule) -> bool:
        return compare_outputs(reference, _outputs(candidate, example_inputs), rtol=1e-4)[0]

    everything = allowed = set(range(len(prunable)))
    candidate = reordered(allowed)
    if not agrees(candidate):
        allowed = {g for g in everything if agrees(reordered({g}))}
        candidate = reordered(allowed)
        if not agrees(candidate):
            allowed, candidate = set(), dag
        kept = [prunable[g].producers[0] for g in sorted(everything - allowed)]
        warnings.warn(
            f"{len(kept)} channel groups keep their channel order (an op between their members "
            f"moves channels): {', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}",
            stacklevel=3,
        )
    moved = dict(scores)
    for ids in groups.producers.values():  # the class now at position j had the score of the one at order[j]
        roots = groups.root(ids)
        order = _sorted_runs(roots, rank, allowed)
        for new, old in zip(roots.tolist(), roots[order].tolist()):
            if new in rank:
                moved[new] = scores.get(old, 0.0)
    return candidate, moved


def _sorted_runs(roots: np.ndarray, rank: dict[int, tuple[int, int]], allowed: set[int]) -> np.ndarray:
    """Positions along an axis of class `roots`, each run of one group's classes sorted by rank. A run is
    made of blocks (a class over side-by-side positions: an attention head) and ends where the group
    changes or a class comes back (the next head's positions, the next conv group)."""
    order = np.arange(len(roots))
    blocks: list[tuple[int, int, int]] = []  # (start, stop, root) of side-by-side positions of one class
    for position, root in enumerate(roots.tolist()):
        if blocks and blocks[-1][2] == root and blocks[-1][1] == position:
            blocks[-1] = (blocks[-1][0], position + 1, root)
        else:
            blocks.append((position, position + 1, root))
    run: list[tuple[int, int, int]] = []
    seen: set[int] = set()

    def flush() -> None:
        if len(run) > 1:
            start = run[0][0]
            placed = sorted(run, key=lambda block: rank[block[2]][1])
            order[start : run[-1][1]] = np.concatenate([np.arange(a, b) for a, b, _ in placed])
        run.clear()
        seen.clear()

    for block in blocks:
        key = rank.get(block[2])
        if key is None or key[0] not in allowed:
            flush()
            continue
        if run and (rank[run[0][2]][0] != key[0] or block[2] in seen):
            flush()
        run.append(block)
        seen.add(block[2])
    flush()
    return order


def _outputs(dag: DagModule, inputs: tuple) -> Any:
    was = dag.training
    dag.eval()
    try:
        with torch.no_grad():
            return dag(*inputs)
    finally:
        dag.train(was)


def _fraction_for(plan: WidthPlan, model: FlopModel, target: float) -> float:
    """The width fraction (the same for every group) whose predicted FLOPs ratio is closest to `target`."""
    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        ratio = model.ratio(plan.removed(plan.counts([max(middle, 1e-6)] * len(plan.prunable))))
        low, high = (middle, high) if ratio < target else (low, middle)
    return max(high, 1e-6)
