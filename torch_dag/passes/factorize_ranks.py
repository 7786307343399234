"""Rank allocation for `factorize`: which rank each layer gets so that the model meets its FLOPs (or
params) target with the least total error, or with one rank fraction for all."""

from __future__ import annotations

import heapq
import math
from typing import cast

import numpy as np

from ..core.errors import DagError
from .factorize_solve import Layer


def at_ratio(layers: list[Layer], ratio: float) -> tuple[list[int | None], str]:
    """Every layer at `ratio` of its full rank, where that is below its break-even rank."""
    wanted = [max(1, round(ratio * layer.full_rank)) for layer in layers]
    ranks = [rank if rank <= layer.max_rank else None for layer, rank in zip(layers, wanted)]
    return ranks, f"rank ratio {ratio:g} is at or above this layer's break-even rank"


def _savings(layers: list[Layer], ranks: list[int | None], by_params: bool) -> float:
    return sum(
        layer.cost(by_params) - layer.rank_costs(by_params)[rank - 1]
        for layer, rank in zip(layers, ranks)
        if rank is not None
    )


def _unreachable(layers: list[Layer], needed: float, by_params: bool) -> DagError:
    best = _savings(layers, [1] * len(layers), by_params)
    what = "params" if by_params else "FLOPs"
    return DagError(
        f"the target needs {needed:.4g} fewer {what}, but factorizing all {len(layers)} "
        f"factorizable layers at rank 1 saves only {best:.4g}"
    )


def error_allocation(layers: list[Layer], needed: float, by_params: bool) -> tuple[list[int | None], str]:
    """Ranks minimising the total normalized squared error with at least `needed` saved: each layer
    minimises error + mu * cost on its own, mu bisected (in log space) to the smallest that saves enough."""
    why = "kept whole: at this target no rank was worth its error"
    if needed <= 0:
        return [None] * len(layers), "kept whole: the target needs no reduction"
    if _savings(layers, [1] * len(layers), by_params) < needed:
        raise _unreachable(layers, needed, by_params)
    curves = [(layer.rank_errors(), layer.rank_costs(by_params), layer.cost(by_params)) for layer in layers]
    scale = 1.0 / max(cost for _, _, cost in curves)  # mu in units of "error per largest layer's cost"

    def choose(mu: float) -> list[int | None]:
        ranks = []
        for errors, costs, keep in curves:
            objective = errors + mu * scale * costs
            best = int(np.argmin(objective))
            ranks.append(best + 1 if objective[best] < mu * scale * keep else None)
        return ranks

    low, high = 1e-12, 1.0
    while _savings(layers, choose(high), by_params) < needed:
        high *= 4
    for _ in range(200):
        middle = math.sqrt(low * high)
        if _savings(layers, choose(middle), by_params) >= needed:
            high = middle
        else:
            low = middle
        if high / low < 1 + 1e-9:
            break
    return _spend_slack(layers, choose(high), needed, by_params), why


def _spend_slack(
    layers: list[Layer], ranks: list[int | None], needed: float, by_params: bool
) -> list[int | None]:
    """The Lagrangian allocation saves a little more than needed (layers switch in whole steps):
    give that slack back as extra rank where it removes the most error per unit of cost."""
    ranks = list(ranks)
    slack = _savings(layers, ranks, by_params) - needed
    heap: list[tuple[float, int]] = []  # (-gain, layer index)
    for i, (layer, rank) in enumerate(zip(layers, ranks)):
        if rank is not None and rank < layer.max_rank:
            heapq.heappush(heap, (-_gain(layer, rank, by_params), i))
    while heap:
        _, i = heapq.heappop(heap)
        layer, rank = layers[i], cast(int, ranks[i])  # only layers given a rank enter the heap
        step = layer.per_rank_params if by_params else layer.per_rank_flops
        if step > slack:
            continue
        ranks[i], slack = rank + 1, slack - step
        if rank + 1 < layer.max_rank:
            heapq.heappush(heap, (-_gain(layer, rank + 1, by_params), i))
    return ranks


def _gain(layer: Layer, rank: int, by_params: bool) -> float:
    """Error removed per unit of cost by raising `rank` by one."""
    errors = layer.rank_errors()
    step = layer.per_rank_params if by_params else layer.per_rank_flops
    return (errors[rank - 1] - errors[rank]) / step


def uniform_allocation(layers: list[Layer], needed: float, by_params: bool) -> tuple[list[int | None], str]:
    """One rank fraction for every layer: the largest (on a fine grid) that saves at least `needed`."""
    if needed <= 0:
        return [None] * len(layers), "kept whole: the target needs no reduction"
    for ratio in np.linspace(1.0, 0.0, 2001)[:-1]:
        ranks, why = at_ratio(layers, float(ratio))
        if _savings(layers, ranks, by_params) >= needed:
            return ranks, why
    raise _unreachable(layers, needed, by_params)
