"""`latency_table`: time a DAG's vertices at widths pruning can choose, and fit a latency model to them.

The DAG is cut to a few "probes", each channel group at a width drawn between a quarter and all of its
channels, rounded as pruning rounds them (the first probe is the whole model, the second every group at
its narrowest draw). Each probe runs `repeats` timed forward passes vertex by vertex, every vertex timed
where it runs (median over the passes); the probe is also timed whole beside the whole model. A probe
whose vertices' sum and whole time disagree far more than the others' do is timed again once. Each
vertex's coefficients are the least-squares fit of its times to its sides' kept fractions
(`table.VertexCost`), and the whole-model scale and offset the fit of the probes' measured times to the
sums of those fits.
"""

from __future__ import annotations

import copy
import gc
import itertools
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ..analysis.latency import (
    Latency,
    as_dtype,
    compare_latency,
    device_name,
    measure_latency,
    prepared_inputs,
    steady_allocator_on,
    synchronizer,
)
from ..core.dag import DagModule
from ..core.ops import callable_of
from ..core.progress import show_progress
from ..core.template import Ref, iter_refs, map_refs
from ..passes.prepare import prepare
from ..pruning import surgery
from ..pruning.channels import ChannelGroups, Group
from ..pruning.groups import AttentionMode, channel_groups
from ..pruning.prune import DEFAULT_ROUND_TO, must_keep
from .rounding import candidates, preferred_rounding
from .table import GroupInfo, LatencyTable, VertexCost

NARROWEST = 0.25  # the smallest kept fraction a probe draws
ANCHOR = 3.0  # weight of the whole model among the probes in every fit
OUTLIER = 0.2  # a probe whose vertices and whole time disagree by this much more than usual is re-timed
# a probe's timing: its groups' kept fractions, its vertices' microseconds, its latency ratio to the whole
# model timed beside it, and the whole model's microseconds meanwhile
Timing = tuple[np.ndarray, dict[str, float], float, float]
LONG_PASS_S = 0.25  # a forward pass at least this long is timed fewer times (its noise is small against it)


@dataclass(frozen=True)
class Effort:
    """How many times things are timed: `probes` width assignments, `repeats` forward passes of each
    vertex by vertex, `runs` rounds of each probe beside the whole model, `rounding_runs` of each
    rounding's cut (one rounding is chosen among close ones: a little longer), `warmup` untimed calls
    before them."""

    probes: int
    repeats: int
    runs: int
    warmup: int
    rounding_runs: int

    @classmethod
    def for_pass(cls, seconds: float, probes: int | None, repeats: int | None) -> Effort:
        """Short passes are noisy against the timer and the scheduler (a vertex of a few microseconds
        at batch 1): 20 probes of 3 passes and 3 rounds (5 for the rounding), a warm-up call each.
        Passes over `LONG_PASS_S` (a large batch) are not, and dominate the build: 10 probes of 2 passes
        and 2 rounds (3 for the rounding), no warm-up call: a probe is warm from its first pass vertex by
        vertex (untimed), and a rounding's cold first call is the slowest of its 3, which the median drops."""
        if seconds >= LONG_PASS_S:
            return cls(probes or 10, repeats or 2, 2, 0, 3)
        return cls(probes or 20, repeats or 3, 3, 1, 5)


def latency_table(
    dag: DagModule,
    example_inputs: tuple | torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    batch_size: int | None = None,
    probes: int | None = None,
    repeats: int | None = None,
    round_to: int | None = None,
    attention: AttentionMode = "heads",
    seed: int = 0,
    progress: bool = False,
) -> LatencyTable:
    """A latency model of `dag` on `device` in `dtype` at `batch_size` (the example inputs' batch when
    omitted): each vertex timed at `probes` assignments of widths to the channel groups (rounded to
    `round_to`, or to the rounding this device prefers, measured first), fitted, and calibrated on the
    probes' measured latencies. None chooses by how long one forward pass takes (`Effort.for_pass`):
    20 probes of 3 timed passes each, or 10 of 2 where a pass takes over a quarter second.
    `table.predict(widths)` then predicts any assignment in microseconds, `table.save(path)` keeps it,
    and `prune(..., latency_ratio=r, latency_table=table)` prunes to it."""
    start = time.perf_counter()
    prep = prepare(dag, example_inputs)
    dag, inputs = prep.dag, prep.example_inputs
    groups = channel_groups(dag, inputs, attention=attention)
    target = torch.device(device)
    cast = as_dtype(dtype) or next(
        (p.dtype for p in dag.parameters() if p.is_floating_point()), torch.float32
    )
    timed_inputs = prepared_inputs(dag, inputs, batch_size, target, cast)
    batch = batch_size or _batch_of(inputs)
    prunable = [g for g in groups.groups() if g.prunable]
    sides = _sides(dag, groups)
    whole = _on(dag, target, cast)
    effort = Effort.for_pass(_pass_seconds(whole, timed_inputs, synchronizer(target)), probes, repeats)
    bar = show_progress(total=effort.probes + 1, desc="latency table", unit="probe", disable=not progress)
    rng = np.random.default_rng(seed)
    if round_to is None:
        round_to, evidence = _rounding(dag, groups, prunable, inputs, timed_inputs, target, cast, rng, effort)
    else:
        evidence = {"reason": "given"}
    bar.update()
    timings: list[Timing] = []
    faults: list[int | None] = []
    removals: list[np.ndarray] = []  # each probe's removal mask over channel ids

    def timed(index: int) -> Timing:
        removed = removals[index]
        probe = _on(surgery.apply(dag, groups, _keep(groups, removed)), target, cast) if index else whole
        times, ratio, whole_latency = _timed(probe, whole, timed_inputs, target, effort)
        faults.append(whole_latency.page_faults)
        return _fractions(groups, removed), times, ratio, whole_latency.median_ms * 1e3

    for index in range(effort.probes):
        draw = np.ones(len(prunable)) if index == 0 else _draw(rng, len(prunable), narrowest=index == 1)
        removals.append(_removal(groups, prunable, draw, round_to, must_keep(groups)))
        timings.append(timed(index))
        bar.update()
    bar.close()
    retimed = _retime_outliers(timings, timed)
    samples = _without_drift(timings)
    all_groups = groups.groups()
    table = _fitted(dag, all_groups, sides, samples)
    table.update(
        device=device_name(target),
        device_type=target.type,
        torch_version=torch.__version__,
        dtype=str(cast).removeprefix("torch."),
        batch_size=batch,
        threads=torch.get_num_threads(),
        round_to=round_to,
        attention=attention,
        build_seconds=round(time.perf_counter() - start, 2),
    )
    table["fit"]["rounding"] = evidence
    table["fit"]["retimed_probes"] = retimed
    counted = [f for f in faults if f is not None]
    table["fit"]["allocator"] = {  # page faults per call of the whole model: see `steady_allocator`
        "steady_allocator": steady_allocator_on(),
        "page_faults_per_call": max(counted) if counted else None,
    }
    return LatencyTable(**table)


def _timed(
    probe: DagModule, whole: DagModule, inputs: tuple, device: torch.device, effort: Effort
) -> tuple[dict[str, float], float, Latency]:
    """A probe's vertices timed one by one (microseconds each), then the probe timed whole beside the
    whole model: its latency ratio to the whole model and the whole model's latency meanwhile.
    The whole model was warmed by the first probe, this probe by its passes vertex by vertex."""
    times = _time_vertices(probe, inputs, synchronizer(device), effort.repeats)
    runs, warmup = effort.runs, effort.warmup
    if probe is whole:
        return times, 1.0, measure_latency(whole, inputs, device=device, runs=runs, warmup=warmup)
    both = compare_latency({"whole": whole, "probe": probe}, inputs, device=device, runs=runs, warmup=warmup)
    return times, both.ratio("probe", "whole"), both.latencies["whole"]


def _retime_outliers(timings: list[Timing], timed: Callable[[int], Timing]) -> list[int]:
    """Time again, once, each probe whose vertices' sum disagrees with its whole-model time by over
    `OUTLIER` against the other probes' agreement (its time whole over the sum of its vertices, against
    the median of that over the probes): a moment of the machine's noise in one of the two, which the fit
    would otherwise spread over every vertex (worst on the first probe, the whole model, that anchors the
    fit). The timing that agrees better is kept; the probes timed again are returned."""

    def agreement(timing: Timing) -> float:
        _, times, ratio, whole_us = timing
        return ratio * whole_us / max(sum(times.values()), 1e-9)

    typical = statistics.median(agreement(t) for t in timings)
    retimed = []
    for index, timing in enumerate(timings):
        off = abs(np.log(agreement(timing) / typical))
        if off > np.log1p(OUTLIER):
            again = timed(index)
            retimed.append(index)
            if abs(np.log(agreement(again) / typical)) < off:
                timings[index] = again
    return retimed


def _pass_seconds(dag: DagModule, inputs: tuple, sync: Callable[[], None]) -> float:
    """Seconds of one forward pass (after an untimed one): how long this model runs at this batch."""
    with torch.inference_mode():
        dag(*inputs)
        sync()
        begin = time.perf_counter()
        dag(*inputs)
        sync()
    return time.perf_counter() - begin


def _without_drift(timings: list[Timing]) -> list[tuple[np.ndarray, dict[str, float], float]]:
    """(fractions, vertex times, whole-probe microseconds) with the machine's drift taken out: a shared
    machine can run the same model half again slower a few minutes later, so each probe is timed beside
    the whole model, its vertex times scaled by how fast the whole model ran meanwhile against its median
    over the build, and its latency taken as its ratio to the whole model times that median."""
    reference = float(np.median([whole_us for *_, whole_us in timings]))
    samples = []
    for fractions, times, ratio, whole_us in timings:
        drift = whole_us / reference
        samples.append((fractions, {name: t / drift for name, t in times.items()}, ratio * reference))
    return samples


def _rounding(
    dag: DagModule,
    groups: ChannelGroups,
    prunable: list[Group],
    inputs: tuple,
    timed_inputs: tuple,
    device: torch.device,
    dtype: torch.dtype,
    rng: np.random.Generator,
    effort: Effort,
) -> tuple[int, dict]:
    """The rounding of widths this device prefers (`rounding.preferred_rounding`), on one random draw."""
    if not prunable:
        return DEFAULT_ROUND_TO, {"reason": "no prunable channel group"}
    draw, owners = _draw(rng, len(prunable), narrowest=False), must_keep(groups)

    def cut(round_to: int) -> DagModule:
        removed = _removal(groups, prunable, draw, round_to, owners)
        return _on(surgery.apply(dag, groups, _keep(groups, removed)), device, dtype)

    roundings = candidates([len(g.channels) * g.unit for g in prunable])
    runs, warmup = effort.rounding_runs, effort.warmup
    return preferred_rounding(cut, roundings, inputs, timed_inputs, device, runs=runs, warmup=warmup)


def _on(dag: DagModule, device: torch.device, dtype: torch.dtype) -> DagModule:
    """`dag` on the device in the dtype, in eval mode (a copy when anything moves)."""
    tensors = [*dag.parameters(), *dag.buffers()]
    if any(t.device != device or (t.is_floating_point() and t.dtype != dtype) for t in tensors):
        dag = copy.deepcopy(dag).to(device=device, dtype=dtype)
    return dag.eval()


def _batch_of(inputs: tuple) -> int:
    first = next((x for x in inputs if isinstance(x, torch.Tensor) and x.dim()), None)
    return int(first.shape[0]) if first is not None else 1


def _time_vertices(dag: DagModule, inputs: tuple, sync: Callable[[], None], repeats: int) -> dict[str, float]:
    """Each vertex's median microseconds over `repeats` forward passes (after one untimed pass), each
    vertex timed where it runs in the pass: after the vertices before it, allocating as the model does.
    Calling one vertex again and again instead reuses the memory it just freed and finds its inputs in
    cache, and under-counts the memory-bound work that dominates large batches on a CPU."""
    last_read: dict[str, int] = {}
    for index, vertex in enumerate(dag):
        for ref in iter_refs((vertex.args, vertex.kwargs)):
            last_read[ref.name] = index
    kept = {ref.name for ref in iter_refs(dag.output)}
    calls = [callable_of(vertex.module) for vertex in dag]
    samples: dict[str, list[int]] = {vertex.name: [] for vertex in dag}
    values: dict[str, Any] = {}
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            for timed in [False] + [True] * max(1, repeats):
                values.clear()
                values.update(zip(dag.input_names, inputs))
                for index, vertex in enumerate(dag):
                    args = map_refs(vertex.args, lambda r: values[r.name])
                    kwargs = map_refs(vertex.kwargs, lambda r: values[r.name])
                    sync()
                    begin = time.perf_counter_ns()
                    values[vertex.name] = calls[index](*args, **kwargs)
                    sync()
                    if timed:
                        samples[vertex.name].append(time.perf_counter_ns() - begin)
                    for name in {r.name for r in iter_refs((vertex.args, vertex.kwargs))}:
                        if last_read.get(name) == index and name not in kept:
                            del values[name]
    finally:
        gc.enable()
    return {name: statistics.median(times) / 1e3 for name, times in samples.items()}


def _sides(dag: DagModule, groups: ChannelGroups) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The channel ids each vertex reads and writes: a slicing vertex's own sides, else the ids its
    first argument carries and those of its output."""
    empty = np.zeros(0, dtype=np.int64)
    sides = {}
    for vertex in dag:
        role = groups.roles.get(vertex.name)
        reads = role.in_ids if role is not None and role.in_ids is not None else None
        if reads is None:
            first = next((r for r in iter_refs(vertex.args) if isinstance(r, Ref)), None)
            reads = groups.carried.get(first.name, empty) if first is not None else empty
        writes = groups.carried.get(vertex.name)
        if writes is None:
            writes = role.out_ids if role is not None and role.out_ids is not None else empty
        sides[vertex.name] = (groups.root(reads), groups.root(writes))
    return sides


def _draw(rng: np.random.Generator, n: int, narrowest: bool) -> np.ndarray:
    """Kept fractions of `n` groups: uniform in [NARROWEST, 1], or all at NARROWEST."""
    return np.full(n, NARROWEST) if narrowest else rng.uniform(NARROWEST, 1.0, n)


def _removal(
    groups: ChannelGroups,
    prunable: list[Group],
    draw: np.ndarray,
    round_to: int,
    owners: dict[int, list[int]],
) -> np.ndarray:
    """A mask over channel ids, true at the class roots a probe removes: each group's last classes,
    its kept count rounded as `prune` rounds it, every producer and split part keeping one."""
    removed = np.zeros(groups.size, dtype=bool)
    for group, fraction in zip(prunable, draw):
        size = len(group.channels)
        keep = max(1, round(size * fraction))
        step = round_to // np.gcd(round_to, group.unit)
        if step > 1 and size >= step:
            keep = min(size, max(step, -(-keep // step) * step))
        removed[group.channels[keep:]] = True
    for roots in owners.values():
        if removed[roots].all():
            removed[roots[0]] = False
    return removed


def _keep(groups: ChannelGroups, removed: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    return lambda ids: ~removed[groups.root(ids)]


def _fractions(groups: ChannelGroups, removed: np.ndarray) -> np.ndarray:
    """Each group's kept fraction (in `groups.groups()` order), and a last 1 for sides without channels."""
    kept = [1.0 - removed[np.asarray(g.channels)].mean() for g in groups.groups()]
    return np.array([*kept, 1.0])


def _fitted(
    dag: DagModule,
    all_groups: list[Group],
    sides: dict[str, tuple[np.ndarray, np.ndarray]],
    samples: list[tuple[np.ndarray, dict[str, float], float]],
) -> dict[str, Any]:
    """The table's fields from the probes: per-vertex least squares, then the whole-model calibration."""
    group_of = {}
    for index, group in enumerate(all_groups):
        for root in group.channels:
            group_of[root] = index
    roots = _roots_of(all_groups)
    key = [g.producers[0] for g in all_groups]
    vertices = []
    for vertex in dag:
        if vertex.name not in samples[0][1]:
            continue
        reads, writes = (_counts(ids, roots, group_of, key) for ids in sides[vertex.name])
        vertices.append(VertexCost(vertex.name, vertex.op, (0.0, 0.0, 0.0, 0.0), reads, writes))
    infos = [GroupInfo(key[i], len(g.channels), g.unit, g.prunable) for i, g in enumerate(all_groups)]
    draft = LatencyTable("", "", "", "", 1, 1, 1, "", infos, vertices, 1.0, 0.0, 0.0)
    fractions = np.stack([f for f, _, _ in samples], axis=1)  # groups + 1 x probes
    a, b = draft._reads @ fractions, draft._writes @ fractions  # vertices x probes
    fitted = []
    for row, cost in enumerate(vertices):
        y = np.array([times[cost.name] for _, times, _ in samples])
        fitted.append(_vertex_model(cost, a[row], b[row], y))
    vertices = fitted
    draft = LatencyTable("", "", "", "", 1, 1, 1, "", infos, vertices, 1.0, 0.0, 0.0)
    summed = np.array([draft.predict_fractions(fractions[:, p]) for p in range(fractions.shape[1])])
    measured = np.array([m for _, _, m in samples])
    scale, offset = _calibration(summed, measured)
    predicted = scale * summed + offset
    fit = {
        "probes_measured_us": measured.round(1).tolist(),
        "probes_predicted_us": predicted.round(1).tolist(),
        "probes_vertex_sum_us": np.array([sum(t.values()) for _, t, _ in samples]).round(1).tolist(),
    }
    return dict(
        groups=infos,
        vertices=vertices,
        scale=scale,
        offset_us=offset,
        measured_us=float(measured[0]),
        fit=fit,
    )


def _vertex_model(cost: VertexCost, a: np.ndarray, b: np.ndarray, y: np.ndarray) -> VertexCost:
    """A vertex's model from its times `y` at side fractions `a`, `b` over the probes: a curve where one
    side's fraction determines the other's (or neither varies), else the bilinear least squares."""
    if np.allclose(a, b) or np.ptp(a) < 1e-9 or np.ptp(b) < 1e-9:
        along = "reads" if np.ptp(b) < 1e-9 and np.ptp(a) >= 1e-9 else "writes"
        x = np.round(a if along == "reads" else b, 6)
        knots = np.unique(x)
        values = [float(np.mean(y[x == k])) for k in knots]
        return replace(cost, along=along, curve=(tuple(knots.tolist()), tuple(values)))
    x = np.stack([np.ones_like(a), a, b, a * b], axis=1)
    weight = _weights(y)[:, None]
    c0, c1, c2, c3 = (float(c) for c in _nonnegative_least_squares(x * weight, y * weight[:, 0]))
    return replace(cost, coef=(c0, c1, c2, c3))


def _weights(times: np.ndarray) -> np.ndarray:
    """Least-squares weights of the probes' times: relative errors count (a narrow probe as much as a
    wide one), and the whole model (probe 0, every ratio's denominator) `ANCHOR` times as much: kernels
    often run aligned full widths faster than the line through narrower ones."""
    weight = 1 / np.maximum(times, 0.05 * times.max() + 1e-3)
    weight[0] *= ANCHOR
    return weight


def _nonnegative_least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin ||x c - y|| over c >= 0, by trying every subset of free columns (x has a few): an overhead,
    traffic and work are never negative, and without that constraint a few noisy probes can fit a time
    that grows as channels go."""
    best, best_error = np.zeros(x.shape[1]), float(np.square(y).sum())
    for mask in itertools.product((False, True), repeat=x.shape[1]):
        if not any(mask):
            continue
        columns = np.flatnonzero(mask)
        solution = np.linalg.lstsq(x[:, columns], y, rcond=None)[0]
        if (solution < 0).any():
            continue
        error = float(np.square(x[:, columns] @ solution - y).sum())
        if error < best_error:
            best, best_error = np.zeros(x.shape[1]), error
            best[columns] = solution
    return best


def _calibration(summed: np.ndarray, measured: np.ndarray) -> tuple[float, float]:
    """Scale and offset of measured ~ scale x summed + offset, both non-negative (an offset is time the
    DAG spends beyond its vertices), fitted on relative errors as predictions are judged; a plain ratio
    when the probes cannot tell them apart."""
    if len(summed) < 3 or np.ptp(summed) < 0.05 * summed.max() or not summed.sum() > 0:
        return float(measured.sum() / max(summed.sum(), 1e-9)), 0.0
    weight = _weights(measured)
    x = np.stack([summed, np.ones_like(summed)], axis=1) * weight[:, None]
    scale, offset = _nonnegative_least_squares(x, measured * weight)
    if not scale > 0:
        return float(measured.sum() / summed.sum()), 0.0
    return float(scale), float(offset)


def _roots_of(all_groups: list[Group]) -> set[int]:
    return {root for g in all_groups for root in g.channels}


def _counts(ids: np.ndarray, roots: set[int], group_of: dict[int, int], key: list[str]) -> dict[str, int]:
    """How many of `ids` (already class roots) fall in each group, by group key."""
    counts = Counter(group_of[int(r)] for r in ids.tolist() if int(r) in roots)
    return {key[index]: n for index, n in sorted(counts.items())}
