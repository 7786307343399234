"""What a pruning run did, group by group and layer by layer (`PruneReport`), and why a target was out of
reach: the fixed channel groups, widest first, with the reasons the analysis gave and their share of the
model's FLOPs and parameters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from torch import nn

from ..analysis import FlopReport
from ..core.dag import DagModule
from . import surgery
from .channels import ChannelGroups

Measure = Literal["FLOPs", "params", "latency"]
SHOWN_REASONS = 3  # reasons of one fixed group shown in a table row (GroupRow.reasons holds them all)
SHOWN_FIXED = 3  # fixed groups named in the warning of a missed target


@dataclass(frozen=True)
class GroupRow:
    """One channel group: its producers, its width in channel classes (`unit` channels each: an
    attention head's head dim) before and after pruning, its share of the model, why it is fixed."""

    producers: tuple[str, ...]
    width: int
    kept: int | None  # None: not pruned (`torch-dag info --groups`)
    reasons: tuple[str, ...]  # empty: prunable
    flops_share: float  # the FLOPs of the layers whose weights carry its channels, over the model's
    params_share: float
    unit: int = 1

    @property
    def name(self) -> str:
        more = len(self.producers) - 1
        return self.producers[0] + (f" (+{more})" if more else "")

    @property
    def prunable(self) -> bool:
        return not self.reasons

    def state(self) -> str:
        if not self.prunable:
            extra = len(self.reasons) - SHOWN_REASONS
            shown = "; ".join(self.reasons[:SHOWN_REASONS]) + (f"; +{extra} more" if extra > 0 else "")
            return f"fixed: {shown}"
        units = f" ({self.width} units of {self.unit} channels: heads)" if self.unit > 1 else ""
        if self.kept is None:
            return "prunable" + units
        return ("narrowed" if self.kept < self.width else "kept whole") + units


@dataclass(frozen=True)
class LayerRow:
    """One Conv / Linear / norm layer's channel counts (in, out) before and after pruning."""

    vertex: str
    op: str
    before: tuple[int | None, int | None]
    after: tuple[int | None, int | None]


@dataclass(frozen=True)
class PruneReport:
    """What a pruning run chose and reached (`prune(..., return_report=True)`): `str(report)` is a
    one-line summary, `report.table()` lists every channel group and every layer's widths, and
    `report.why()` says why a missed target was out of reach."""

    measure: Measure
    target: float
    reached: float
    round_to: int  # the rounding of widths used: the one asked for, or a finer one when that could not reach the target
    groups: int
    prunable: int
    narrowed: int  # prunable groups that lost channels
    group_rows: tuple[GroupRow, ...] = ()  # every channel group, in the order of their first producer
    layer_rows: tuple[LayerRow, ...] = ()  # every Conv / Linear / norm layer, in DAG order
    tolerance: float = 0.02
    floor: float | None = None  # the ratio the FLOP model predicts with every prunable group at its narrowest
    predicted: float | None = (
        None  # a latency target: the latency table's ratio for the result (reached: measured)
    )
    measured_ms: tuple[float, float] | None = None  # ... and the medians measured, unpruned and pruned

    def __str__(self) -> str:
        predicted = "" if self.predicted is None else f", predicted {self.predicted:.3f}"
        return (
            f"{self.measure} ratio {self.reached:.3f}{' measured' if predicted else ''}{predicted} (target "
            f"{self.target:.3f}); widths rounded to multiples "
            f"of {self.round_to} where a group is that wide; {self.groups} channel groups, {self.prunable} "
            f"prunable, {self.narrowed} narrowed"
        )

    @property
    def missed(self) -> bool:
        return abs(self.reached - self.target) > self.tolerance

    def table(self) -> str:
        """Every channel group (width before -> after, or why it is fixed), then every layer's widths."""
        return "\n".join(
            [str(self), group_table(self.group_rows, self.measure), layer_table(self.layer_rows)]
        )

    def why(self) -> str:
        """Why the target was missed ("" when it was met): the fixed groups that held the ratio up, or
        the coarse steps of the prunable ones."""
        if not self.missed:
            return ""
        head = (
            f"the {self.measure} ratio reached is {self.reached:.3f}, outside {self.target:.3f} +- "
            f"{self.tolerance:.3f}: "
        )
        fixed = [row for row in self.group_rows if not row.prunable]
        reachable = self.floor is not None and self.floor <= self.target + self.tolerance
        if self.reached < self.target or not fixed or reachable:
            return head + (
                "removing channels in order of importance has no step closer (few, wide channels); "
                "try another criterion or target, or --round-to 1"
            )
        return head + fixed_groups_text(fixed, self.measure, len(self.group_rows), self.floor)


def fixed_groups_text(fixed: list[GroupRow], measure: Measure, total: int, floor: float | None) -> str:
    """The fixed groups, widest first, with their shares and reasons, and what to do about them."""
    widest = sorted(fixed, key=lambda r: (-r.width * r.unit, -r.flops_share))
    named = "; ".join(
        f"{row.name} ({row.width * row.unit} channels, {_share(row, measure):.0%} of the "
        f"{'params' if measure == 'params' else 'FLOPs'}): "
        f"{row.reasons[0]}" + (f" (+{len(row.reasons) - 1} more reasons)" if len(row.reasons) > 1 else "")
        for row in widest[:SHOWN_FIXED]
    )
    rest = len(widest) - SHOWN_FIXED
    at_narrowest = (
        ""
        if floor is None
        else f" With every prunable group at its narrowest (min_channels, max_removed) the {measure} "
        f"ratio is about {floor:.3f}."
    )
    return (
        f"{len(fixed)} of {total} channel groups are fixed and keep their width; widest: {named}"
        f"{f'; and {rest} more' if rest > 0 else ''}.{at_narrowest} prune(..., return_report=True)[1].table() "
        "or `torch-dag prune --report` lists every group; protect fewer vertices, add a channel rule "
        "(pruning/rules) for the op a reason names, lower min_channels, or ask for a reachable target"
    )


def _share(row: GroupRow, measure: Measure) -> float:
    return row.params_share if measure == "params" else row.flops_share


def group_rows(
    groups: ChannelGroups, counted: FlopReport, removed: np.ndarray | None = None
) -> tuple[GroupRow, ...]:
    """A row per channel group; `removed` (a mask over channel ids, true at the class roots removed)
    gives the widths kept. A group's share counts every layer whose weights carry its channels (that
    surgery would slice with it), read or written."""
    found = groups.groups()
    owner = np.full(groups.size, -1, dtype=np.int64)
    for index, group in enumerate(found):
        owner[np.asarray(group.channels, dtype=np.int64)] = index
    flops, params = np.zeros(len(found)), np.zeros(len(found))
    for name, role in groups.roles.items():
        sides = [role.in_ids, role.out_ids, *(ids for _, ids in role.flop_shares)]
        ids = [np.asarray(s, dtype=np.int64) for s in sides if s is not None and len(s)]
        if not ids:
            continue
        touched = np.unique(owner[groups.root(np.concatenate(ids))])
        touched = touched[touched >= 0]
        flops[touched] += counted.flops.get(name, 0)
        params[touched] += counted.params.get(name, 0)
    total_flops, total_params = max(counted.total_flops, 1), max(counted.total_params, 1)
    return tuple(
        GroupRow(
            tuple(group.producers),
            len(group.channels),
            None if removed is None else int((~removed[np.asarray(group.channels, dtype=np.int64)]).sum()),
            tuple(group.reasons),
            float(flops[index] / total_flops),
            float(params[index] / total_params),
            group.unit,
        )
        for index, group in enumerate(found)
    )


def layer_rows(before: DagModule, after: DagModule | None = None) -> tuple[LayerRow, ...]:
    """The (in, out) channel counts of every Conv / Linear / norm layer of `before`, and of the vertex of
    the same name in `after` (surgery keeps the names)."""
    rows = []
    for vertex in before:
        widths = layer_widths(vertex.module)
        if widths is None:
            continue
        now = layer_widths(after[vertex.name].module) if after is not None and vertex.name in after else None
        rows.append(LayerRow(vertex.name, vertex.op, widths, now or widths))
    return tuple(rows)


def layer_widths(module: object) -> tuple[int | None, int | None] | None:
    """(in, out) channels of a layer that holds channels (its surgery layout), None for any other op."""
    if not isinstance(module, nn.Module):
        return None
    found = surgery.layout(module)
    if found is None:
        return None
    if found.counts is not None:
        return found.counts(module)
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() >= 2:  # (out, in)
        return int(weight.shape[1]), int(weight.shape[0])
    for attr in ("num_features", "num_channels", "normalized_shape"):  # a norm: one width, in and out
        value = getattr(module, attr, None)
        if value is not None:
            width = int(value[-1] if isinstance(value, tuple | list) else value)
            return width, width
    return None, None


def group_table(rows: Iterable[GroupRow], measure: Measure = "FLOPs") -> str:
    rows = list(rows)
    pruned = any(row.kept is not None for row in rows)
    lines = [
        f"channel groups: {len(rows)}, {sum(r.prunable for r in rows)} prunable "
        f"(width in channels; FLOPs / params: the share of the layers whose weights carry them)",
        f"  {'group':32s} {'width':>7s}{' -> kept' if pruned else ''} {'FLOPs':>6s} {'params':>6s}  state",
    ]
    for row in rows:
        kept = f" -> {row.kept * row.unit:4d}" if pruned and row.kept is not None else ""
        lines.append(
            f"  {row.name[:32]:32s} {row.width * row.unit:7d}{kept} {row.flops_share:6.1%} "
            f"{row.params_share:6.1%}  {row.state()}"
        )
    return "\n".join(lines)


def layer_table(rows: Iterable[LayerRow]) -> str:
    lines = [f"layers: channels (in, out) before -> after\n  {'layer':32s} {'op':12s} {'before':>13s}  after"]
    for row in rows:
        before, after = _pair(row.before), _pair(row.after)
        lines.append(
            f"  {row.vertex[:32]:32s} {row.op[:12]:12s} {before:>13s}  {after if after != before else '='}"
        )
    return "\n".join(lines)


def _pair(widths: tuple[int | None, int | None]) -> str:
    return ", ".join("-" if w is None else str(w) for w in widths)
