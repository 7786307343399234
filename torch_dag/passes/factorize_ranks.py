"""Rank allocation for `factorize`: which rank each layer gets so that the model meets its FLOPs (or
params) target with the least total error, or with one rank fraction for all; and, with `latency=`,
which layers' low-rank pairs are worth having in measured time (`LatencyCheck`)."""

from __future__ import annotations

import heapq
import math
from typing import Literal, cast

import numpy as np
import torch

from ..analysis.latency import compare_latency, device_name, resized
from ..core.dag import DagModule, evaluating
from ..core.errors import DagError
from ..core.progress import show_progress
from .factorize_report import LayerReport, LayerTiming
from .factorize_solve import Layer, pair_like

LATENCY_RUNS = 15  # interleaved rounds in which a layer and its low-rank pair are timed
LATENCY_WARMUP = 2


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


class LatencyCheck:
    """Whether layers' low-rank pairs pay in measured time, for `factorize(..., latency=...)`: each layer
    and its pair at a rank are called alone on an input of the layer's real shape at `batch_size` (the
    example inputs' batch when None; shapes recorded in one forward of the DAG), on `device` in `dtype`
    (None: the layer's own), in interleaved rounds (`compare_latency`); the pair pays where its median
    time is below the whole layer's. Each (layer, rank) is timed once, and every timing is recorded in
    the layer's report."""

    def __init__(
        self,
        dag: DagModule,
        inputs: tuple,
        device: torch.device,
        dtype: torch.dtype | None,
        batch_size: int | None,
        threads: int | None = None,
        progress: bool = False,
    ):
        self.dag, self.inputs = dag, resized(inputs, batch_size)
        self.device, self.dtype, self.threads, self.progress = device, dtype, threads, progress
        self.device_name = device_name(device)
        self.shapes: dict[int, tuple[torch.Size, torch.dtype]] = {}
        self.times: dict[tuple[int, int], tuple[float, float]] = {}

    @property
    def batch(self) -> str:
        first = next((x for x in self.inputs if isinstance(x, torch.Tensor) and x.dim()), None)
        return f"batch {first.shape[0]}" if first is not None else "no batch"

    def paying(self, layers: list[Layer]) -> list[Layer]:
        """The layers whose pair at half their multiply-adds measured faster than they do; the others
        are given the reason (allocation then leaves them out)."""
        self.record(layers)
        kept = []
        for layer in show_progress(
            layers, desc="factorize: latency", unit="layer", disable=not self.progress
        ):
            timing = self.timing(layer, max(1, (layer.max_rank + 1) // 2), "probe")
            if timing.pays:
                kept.append(layer)
            else:
                layer.report.reason = f"latency: {timing} (at half its multiply-adds)"
        return kept

    def checked(self, layers: list[Layer], ranks: list[int | None]) -> list[int | None]:
        """`ranks` with None where the pair at the allocated rank measured no faster than the layer."""
        checked = []
        for layer, rank in zip(layers, ranks):
            if rank is not None and not self.timing(layer, rank, "chosen").pays:
                layer.report.reason = f"latency: {layer.report.timings[-1]} at its allocated rank"
                rank = None
            checked.append(rank)
        return checked

    def timing(self, layer: Layer, rank: int, stage: Literal["probe", "chosen"]) -> LayerTiming:
        """`layer` and its pair at `rank` timed (once per pair), recorded in its report."""
        key = (id(layer.module), rank)
        if key not in self.times:
            shape, dtype = self.shapes[id(layer.module)]
            models = {"whole": layer.module, "pair": pair_like(layer.module, layer.report.shape, rank)}
            measured = compare_latency(
                models,
                (torch.randn(shape, dtype=dtype),),
                device=self.device,
                dtype=self.dtype,
                runs=LATENCY_RUNS,
                warmup=LATENCY_WARMUP,
                threads=self.threads,
            ).latencies
            self.times[key] = measured["whole"].median_ms, measured["pair"].median_ms
        timing = LayerTiming(stage, rank, *self.times[key], self.device_name)
        layer.report.timings.append(timing)
        return timing

    def record(self, layers: list[Layer]) -> None:
        """The shape and dtype of each layer's first input, from one forward at the batch."""
        wanted = {id(layer.module): layer.module for layer in layers if id(layer.module) not in self.shapes}
        if not wanted:
            return

        def hook(module: torch.nn.Module, args: tuple) -> None:
            self.shapes.setdefault(id(module), (args[0].shape, args[0].dtype))

        handles = [module.register_forward_pre_hook(hook) for module in wanted.values()]
        try:
            with evaluating(self.dag), torch.no_grad():
                self.dag(*self.inputs)
        finally:
            for handle in handles:
                handle.remove()

    def note(self, reports: list[LayerReport], missed: str) -> str:
        """What timing changed: layers left out before allocation, and those dropped after it, which
        make the result miss its target (`missed` says by how much)."""
        timed = [r for r in reports if r.timings]
        skipped = [
            r for r in timed if r.rank is None and r.timings[-1].stage == "probe" and not r.timings[-1].pays
        ]
        dropped = [r for r in timed if r.slower_at_chosen_rank]
        parts = [
            f"latency: {len(timed)} layers timed against their low-rank pairs on {self.device_name}, {self.batch}"
        ]
        if skipped:
            parts.append(
                f"{len(skipped)} left whole: their pairs at half the multiply-adds measured no faster"
            )
        if dropped:
            names = ", ".join(r.name for r in dropped[:3]) + (", ..." if len(dropped) > 3 else "")
            parts.append(
                f"{len(dropped)} left whole after allocation ({names}): their pairs at the allocated ranks "
                f"measured no faster, so the target is missed ({missed})"
            )
        return "; ".join(parts)
