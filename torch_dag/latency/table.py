"""`LatencyTable`: a DAG's latency as a function of its channel groups' widths, in microseconds.

Each vertex's time is modelled from the kept fractions of the channels it reads (`a`) and writes (`b`).
Where both vary independently (a conv or linear between two groups): t = c0 + c1 a + c2 b + c3 a b, the
form of its work (a b), memory traffic (a, b) and launch overhead (c0). Where only one varies (element-wise
ops, a = b; a layer reading the image): a piecewise-linear curve through the times measured, which follows
the steps of kernels that change algorithm with the width. A side's fraction is the mean, over the
channel ids it carries, of the kept fraction of the group each id belongs to. The model's latency is
`scale` x the sum of the vertices' times + `offset_us`, both fitted on whole-model measurements (cache
effects and the DAG's own overhead, which timing vertices one by one does not see).

The table is plain JSON (`save` / `load`); `predict` needs no DAG. `cost_model(groups)` gives the form
`prune` bisects on: the predicted ratio of a removal of channels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import DagError
from ..pruning.channels import ChannelGroups

FORMAT = "torch-dag latency table"
VERSION = 1


@dataclass(frozen=True)
class GroupInfo:
    """One channel group as the table knows it: named by its first producer."""

    key: str
    classes: int  # channel classes (an attention head counts once)
    unit: int  # channels per class
    prunable: bool


@dataclass(frozen=True)
class VertexCost:
    """One vertex: its fitted coefficients (microseconds) and the groups its two sides carry."""

    name: str
    op: str
    coef: tuple[float, float, float, float]  # c0 + c1 a + c2 b + c3 a b
    reads: dict[str, int] = field(default_factory=dict)  # group key -> ids of it on the input side
    writes: dict[str, int] = field(default_factory=dict)  # ... on the output side
    along: str = ""  # "reads" or "writes": the time is `curve` over that side's fraction, not `coef`
    curve: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())  # fractions, microseconds


@dataclass
class LatencyTable:
    """A latency model of one DAG on one device, dtype, batch size and thread count."""

    device: str  # the device's name ("cpu: AMD EPYC ...", "NVIDIA H100 80GB HBM3")
    device_type: str  # "cpu", "cuda", ...: what `torch.device` takes to measure again
    torch_version: str
    dtype: str
    batch_size: int
    threads: int
    round_to: int  # the rounding of widths this device prefers (see `rounding.preferred_rounding`)
    attention: str  # the channel analysis' attention mode the groups come from
    groups: list[GroupInfo]
    vertices: list[VertexCost]
    scale: float
    offset_us: float
    measured_us: float  # the unpruned model, measured
    build_seconds: float = 0.0
    fit: dict[str, Any] = field(default_factory=dict)  # probes measured vs predicted, rounding evidence

    def __post_init__(self) -> None:
        keys = [g.key for g in self.groups]
        self._column = {key: i for i, key in enumerate(keys)}
        width = len(keys) + 1  # the last column: sides that carry no channels keep everything
        self._reads = _shares([v.reads for v in self.vertices], self._column, width)
        self._writes = _shares([v.writes for v in self.vertices], self._column, width)
        self._coef = np.array([v.coef for v in self.vertices], dtype=np.float64).reshape(-1, 4)
        self._curves: list[tuple[int, bool, np.ndarray, np.ndarray]] = [
            (i, v.along == "reads", np.asarray(v.curve[0]), np.asarray(v.curve[1]))
            for i, v in enumerate(self.vertices)
            if v.along
        ]

    @property
    def prunable(self) -> list[GroupInfo]:
        return [g for g in self.groups if g.prunable]

    def predict(self, widths: Mapping[str, int | float] | None = None) -> float:
        """Predicted microseconds per call with each named group at a width in channels (an int) or a
        kept fraction (a float in (0, 1]); unnamed groups keep their full width."""
        fractions = np.ones(len(self.groups) + 1)
        for key, width in (widths or {}).items():
            if key not in self._column:
                raise DagError(f"no channel group {key!r} in this latency table (groups: {_some(self)})")
            group = self.groups[self._column[key]]
            if not group.prunable and width != group.classes * group.unit and width != 1.0:
                raise DagError(f"channel group {key!r} is fixed: its width cannot change")
            full = group.classes * group.unit
            fraction = width / full if isinstance(width, (int, np.integer)) else float(width)
            if not 0 < fraction <= 1:
                raise DagError(f"group {key!r}: width {width} is outside (0, {full}] channels")
            fractions[self._column[key]] = fraction
        return self.predict_fractions(fractions)

    def predict_fractions(self, fractions: np.ndarray) -> float:
        """Predicted microseconds with group i at kept fraction `fractions[i]` (the last entry is 1)."""
        return float(self.scale * self._times(fractions).sum() + self.offset_us)

    def per_vertex(self, fractions: np.ndarray | None = None) -> dict[str, float]:
        """Each vertex's predicted microseconds (before the whole-model scale and offset)."""
        fractions = np.ones(len(self.groups) + 1) if fractions is None else fractions
        return dict(zip((v.name for v in self.vertices), self._times(fractions).tolist()))

    def _times(self, fractions: np.ndarray) -> np.ndarray:
        a, b = self._reads @ fractions, self._writes @ fractions
        times = (self._coef * np.stack([np.ones_like(a), a, b, a * b], axis=1)).sum(axis=1)
        for row, on_reads, x, y in self._curves:
            times[row] = _interpolated(a[row] if on_reads else b[row], x, y)
        return np.maximum(times, 0.0)

    def cost_model(self, groups: ChannelGroups) -> LatencyModel:
        """The table read over `groups` (the same DAG's, as `prune` computes them): predicted ratios of
        removals of channels. Raises when the groups are not the ones the table was built on."""
        return LatencyModel(self, groups)

    def matches(self, groups: ChannelGroups) -> str:
        """Why `groups` are not those of the table's DAG ("" when they are)."""
        mine = {g.key: (g.classes, g.prunable) for g in self.groups}
        theirs = {g.producers[0]: (len(g.channels), g.prunable) for g in groups.groups()}
        if mine == theirs:
            return ""
        differ = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
        return f"its channel groups differ from the DAG's (first differences: {differ})"

    def __str__(self) -> str:
        return (
            f"latency table: {len(self.vertices)} vertices, {len(self.prunable)} prunable groups of "
            f"{len(self.groups)}; {self.device}, {self.dtype}, batch {self.batch_size}, {self.threads} "
            f"threads; unpruned {self.measured_us / 1e3:.3f} ms measured, {self.predict() / 1e3:.3f} ms "
            f"predicted; widths rounded to {self.round_to}"
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as JSON (atomically: a temporary file renamed over `path`)."""
        data = {"format": FORMAT, "version": VERSION, **asdict(self)}
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(data, indent=1))
        partial.replace(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        """Read a table `save` wrote; anything else raises, saying what it found."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise DagError(f"cannot read a latency table from {path}: {error}") from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DagError(f"{path} is not a torch-dag latency table")
        if data.get("version") != VERSION:
            raise DagError(
                f"{path}: latency table version {data.get('version')}, this torch-dag reads {VERSION}"
            )
        try:
            data["groups"] = [GroupInfo(**g) for g in data["groups"]]
            data["vertices"] = [
                VertexCost(**{**v, "coef": tuple(v["coef"]), "curve": tuple(map(tuple, v["curve"]))})
                for v in data["vertices"]
            ]
            del data["format"], data["version"]
            return cls(**data)
        except (KeyError, TypeError) as error:
            raise DagError(f"{path}: malformed latency table ({error})") from error


class LatencyModel:
    """A table over one analysis' channel ids: `ratio(removed)` predicts the latency ratio when the class
    roots where the mask `removed` is true go (the interface `prune` bisects on, as on `FlopModel`)."""

    def __init__(self, table: LatencyTable, groups: ChannelGroups):
        why = table.matches(groups)
        if why:
            raise DagError(f"this latency table was built on another DAG: {why}; build one for this DAG")
        self.table = table
        by_key = {g.producers[0]: g for g in groups.groups()}
        self._roots = [np.asarray(by_key[g.key].channels, dtype=np.int64) for g in table.groups]
        self.full = table.predict()

    def fractions(self, removed: np.ndarray) -> np.ndarray:
        kept = [1.0 - removed[roots].mean() if len(roots) else 1.0 for roots in self._roots]
        return np.array([*kept, 1.0])

    def predict_us(self, removed: np.ndarray) -> float:
        return self.table.predict_fractions(self.fractions(removed))

    def ratio(self, removed: np.ndarray) -> float:
        return self.predict_us(removed) / self.full

    def soft_ratio(self, kept: torch.Tensor) -> torch.Tensor:
        """The predicted ratio with each class root kept at a fraction (`kept`, a tensor over channel ids),
        differentiable: the table's prediction at the groups' mean kept fractions, with the gradient of
        its linearization there (finite differences, one per group: the table is piecewise, not torch)."""
        one = kept.new_ones((), dtype=torch.float64)
        fractions = torch.stack(
            [kept[torch.from_numpy(r)].double().mean() if len(r) else one for r in self._roots]
        )
        at = np.append(fractions.detach().numpy(), 1.0)
        base = self.table.predict_fractions(at)
        slopes = []
        for i in range(len(self._roots)):
            moved = at.copy()
            moved[i] += -1e-3 if at[i] > 1e-3 else 1e-3
            slopes.append((self.table.predict_fractions(moved) - base) / (moved[i] - at[i]))
        linear = (torch.tensor(slopes, dtype=torch.float64) * (fractions - fractions.detach())).sum()
        return (base + linear) / self.full


def _interpolated(x: float, knots: np.ndarray, values: np.ndarray) -> float:
    """The piecewise-linear curve through (knots, values) at x, extended by its end segments' slopes."""
    if len(knots) == 1:
        return float(values[0])
    if x < knots[0]:
        return float(values[0] + (x - knots[0]) * (values[1] - values[0]) / (knots[1] - knots[0]))
    if x > knots[-1]:
        return float(values[-1] + (x - knots[-1]) * (values[-1] - values[-2]) / (knots[-1] - knots[-2]))
    return float(np.interp(x, knots, values))


def _shares(sides: list[dict[str, int]], column: dict[str, int], width: int) -> np.ndarray:
    """One row per vertex side: the share of its ids in each group (all on the last column if none)."""
    shares = np.zeros((len(sides), width))
    for row, counts in enumerate(sides):
        total = sum(counts.values())
        if not total:
            shares[row, -1] = 1.0
        for key, n in counts.items():
            shares[row, column[key]] = n / total
    return shares


def _some(table: LatencyTable) -> str:
    keys = [g.key for g in table.prunable]
    return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
