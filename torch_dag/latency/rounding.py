"""Which multiples of channels a device runs at full speed: the rounding of widths a latency table picks.

The DAG is cut to one draw of widths (every prunable group at a fraction drawn once), rounded up to
multiples of 1, 2, 4, ... 32 in turn, and each cut is timed whole, interleaved with the others. Its cost
per FLOP says what the rounding buys: odd widths can cost several times more per FLOP where kernels want
vector blocks (reorders, reference paths), and the rounding is the smallest whose cost per FLOP is within
`WITHIN` of the best. Roundings above a quarter of the width of the group the median channel is in are
not tried: they would leave most channels' groups no width to choose. (The median over channels, not
over groups: many narrow groups, such as squeeze-excitation bottlenecks, hold few of the channels and
little of the time, and a rounding wider than a group leaves that group unrounded anyway.) Whole models
are timed, not single layers, because a width slows its readers as much as its producer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..analysis import count_flops
from ..analysis.latency import compare_latency
from ..core.dag import DagModule

CANDIDATES = (1, 2, 4, 8, 16, 32)
WITHIN = 0.05


def candidates(widths: list[int]) -> list[int]:
    """The roundings worth trying for groups of these widths (in channels): up to a quarter of the width
    of the group the median channel is in."""
    if not widths:
        return [1]
    ordered = np.sort(np.asarray(widths))
    channels = np.cumsum(ordered)
    median = int(ordered[np.searchsorted(channels, channels[-1] / 2)])
    return [r for r in CANDIDATES if r <= max(1, median // 4)]


def preferred_rounding(
    cut: Callable[[int], DagModule],
    roundings: list[int],
    inputs: tuple,
    timed_inputs: tuple,
    device: torch.device,
    *,
    runs: int = 5,
    warmup: int = 1,
) -> tuple[int, dict]:
    """The rounding of widths, and the evidence (each rounding's FLOPs and milliseconds per GFLOP).
    `cut(r)` is the DAG at the drawn widths rounded to multiples of r, on the device in the dtype."""
    if len(roundings) == 1:
        return roundings[0], {"reason": "the channel groups are too narrow to round"}
    cuts = {str(r): cut(r) for r in roundings}
    flops = {r: count_flops(dag, *inputs).total_flops for r, dag in cuts.items()}
    times = compare_latency(cuts, timed_inputs, device=device, runs=runs, warmup=warmup).latencies
    cost = {r: times[r].median_ms / max(flops[r], 1) * 1e9 for r in cuts}
    best = min(cost.values())
    chosen = next(r for r in roundings if cost[str(r)] <= (1 + WITHIN) * best)
    evidence = {
        "ms_per_gflop": {r: round(c, 4) for r, c in cost.items()},
        "flops": flops,
        "median_ms": {r: round(t.median_ms, 3) for r, t in times.items()},
    }
    return chosen, evidence
