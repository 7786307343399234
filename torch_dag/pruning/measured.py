"""A latency target met in measured time: the widths chosen on a latency table's prediction are measured
against the original on the table's device, dtype and batch, and the target handed to the search is
corrected by what the measurement says (the table's error is mostly a scale near the target), up to
`MEASURED_ROUNDS` measurements; the attempt measured closest to the target is kept.

The latency table itself lives above pruning (`torch_dag.latency`); pruning sees it through `CostTable`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..analysis.latency import compare_latency
from ..core.progress import show_progress

if TYPE_CHECKING:
    from .channels import ChannelGroups
    from .prune import Found, WidthSearch

MEASURED_ROUNDS = 3


class CostModel(Protocol):
    """Predicted ratio of a model's cost after removing the class roots where `removed` is true."""

    def ratio(self, removed: np.ndarray) -> float: ...


class CostTable(Protocol):
    """What prune reads of a latency table (`torch_dag.latency.LatencyTable`)."""

    attention: str
    round_to: int
    device_type: str
    dtype: str
    batch_size: int

    def cost_model(self, groups: ChannelGroups) -> CostModel: ...


@dataclass(frozen=True)
class Measured:
    ratio: float  # median of the per-round ratios, pruned over original
    ms: tuple[float, float]  # medians, original and pruned


def measure(search: WidthSearch, found: Found, table: CostTable) -> Measured:
    """The original and `found`'s pruned DAG timed side by side on the table's device, dtype and batch."""
    comparison = compare_latency(
        {"original": search.dag, "pruned": found.pruned},
        search.inputs,
        device=table.device_type,
        dtype=table.dtype,
        batch_size=table.batch_size,
    )
    times = comparison.latencies
    return Measured(
        comparison.ratio("pruned", "original"), (times["original"].median_ms, times["pruned"].median_ms)
    )


def meet_measured(
    search: WidthSearch, found: Found, target: float, table: CostTable, progress: bool
) -> tuple[Found, Measured]:
    """The candidate whose measured latency ratio is closest to `target`, and its measurement."""
    tried: list[tuple[Found, Measured]] = []
    bar = show_progress(total=MEASURED_ROUNDS, desc="prune: measure", unit="run", disable=not progress)
    for attempt in range(MEASURED_ROUNDS):
        measured = measure(search, found, table)
        tried.append((found, measured))
        bar.update()
        bar.set_postfix_str(f"predicted {found.ratio:.3f}, measured {measured.ratio:.3f}")
        if abs(measured.ratio - target) <= search.config.tolerance or attempt == MEASURED_ROUNDS - 1:
            break
        aim = found.ratio * target / measured.ratio  # the predicted ratio that should measure at target
        found = search.run(min(aim, 1.0), progress=False)
    bar.close()
    return min(tried, key=lambda pair: abs(pair[1].ratio - target))
