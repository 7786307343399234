"""The state of the channel analysis: channel ids along an axis, the union-find that ties them, what
each vertex must slice (roles), and the result (`ChannelGroups`, `Group`)."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np
import torch

from ..core.dag import DagModule, Vertex
from ..core.ops import FunctionOp


@dataclass
class Channels:
    """The channel ids along one axis of a tensor."""

    axis: int
    ids: np.ndarray


class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def make(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx


@dataclass
class Role:
    """How a vertex's weights depend on channel ids: sliced on its input side, output side, or both."""

    vertex: str
    in_ids: np.ndarray | None = None
    out_ids: np.ndarray | None = None
    axis: int | None = None  # for a Parameter/Constant operand: the axis its channels lie on
    # for a vertex whose call spells channel counts out (split sizes, slice bounds): its new args,
    # given keep(ids) -> mask; and the id sets that must each keep a channel (a split's parts)
    rewrite: Callable[[Callable[[np.ndarray], np.ndarray]], tuple] | None = None
    keywords: dict[str, Any] = field(default_factory=dict)  # set on the call (attention's scale, as it was)
    parts: list[np.ndarray] = field(default_factory=list)
    # an op without weights whose FLOPs shrink with channels (attention's products): (share of its FLOPs,
    # the ids that share scales with), for the FLOP model that guides the bisection
    flop_shares: list[tuple[float, np.ndarray]] = field(default_factory=list)


@dataclass
class ChannelGroups:
    """The result of the analysis: classes of tied channels and what each vertex must slice."""

    uf: UnionFind
    roles: dict[str, Role]
    producers: dict[str, np.ndarray]  # vertex -> ids of the channels it creates
    blocked: dict[int, str] = field(default_factory=dict)  # class root -> why it cannot be pruned
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # vertex -> the ids of the channels its output carries (all parts of a tuple end to end): what
    # cost models read to say how much of a vertex's work a removal of channels takes away
    carried: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:  # the analysis is done: every id's class root, once, as an array
        self._roots = np.fromiter(
            (self.uf.find(i) for i in range(len(self.uf.parent))), dtype=np.int64, count=len(self.uf.parent)
        )

    @property
    def size(self) -> int:
        """How many channel ids the analysis made (ids are 0 .. size - 1)."""
        return len(self._roots)

    def root(self, ids: np.ndarray) -> np.ndarray:
        return self._roots[np.asarray(ids, dtype=np.int64)]

    def groups(self) -> list[Group]:
        """Producers whose channels are tied (a residual stream, a plain layer), with their classes."""
        parent = {name: name for name in self.producers}

        def find(n: str) -> str:
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        owner: dict[int, str] = {}
        for name, ids in self.producers.items():
            for root in set(self.root(ids).tolist()):
                if root in owner:
                    parent[find(name)] = find(owner[root])
                else:
                    owner[root] = name
        members: dict[str, list[str]] = defaultdict(list)
        for name in self.producers:
            members[find(name)].append(name)
        groups = []
        for names in members.values():
            roots = sorted({r for n in names for r in self.root(self.producers[n]).tolist()})
            reasons = sorted({self.blocked[r] for r in roots if r in self.blocked})
            # channels of a class side by side (an attention head's head dim; 1 for a grouped conv's
            # in-group position, whose channels are strided): widths count in such blocks
            unit = max(_block(self.root(self.producers[n])) for n in names)
            groups.append(Group(names, roots, reasons, unit))
        return groups

    def summary(self) -> str:
        groups = self.groups()
        prunable = [g for g in groups if g.prunable]
        lines = [f"{len(groups)} channel groups, {len(prunable)} prunable (the search dimension)"]
        for g in groups:
            state = "prunable" if g.prunable else "fixed: " + "; ".join(g.reasons)[:100]
            lines.append(
                f"  {len(g.channels):5d} channels  {', '.join(g.producers[:3])}"
                f"{' ...' if len(g.producers) > 3 else ''}  [{state}]"
            )
        return "\n".join(lines)


def _block(roots: np.ndarray) -> int:
    """The size of the runs of equal class roots along a producer's channels (their gcd)."""
    starts = np.flatnonzero(np.diff(roots)) + 1
    return math.gcd(*np.diff(np.concatenate([[0], starts, [len(roots)]])).tolist())


@dataclass
class Group:
    producers: list[str]
    channels: list[int]  # class roots: one per channel of the group
    reasons: list[str]
    unit: int = 1  # channels per class side by side in a producer (an attention head: its head dim)

    @property
    def prunable(self) -> bool:
        return not self.reasons


Rule = Callable[["Analysis", Vertex, list[Any], Any], Any]


class Analysis:
    """The analysis in progress: the ids made so far and their ties, roles, blocked ids, and what each
    vertex carries (`info`)."""

    def __init__(
        self, dag: DagModule, values: dict[str, Any], protected: Iterable[str], attention: str = "heads"
    ):
        self.dag = dag
        self.attention = attention
        self.values = values
        self.uf = UnionFind()
        self.roles: dict[str, Role] = {}
        self.producers: dict[str, np.ndarray] = {}
        self.blocked_ids: dict[int, str] = {}  # resolved to class roots once all unions are made
        self.protected = set(protected)
        self.info: dict[str, Any] = {}  # vertex -> what it carries (Channels, ShapeOf, Count, tuples of them)

    @functools.cached_property
    def successors(self) -> dict[str, list[str]]:
        """For each vertex, the vertices that read it (rules that look one step ahead: a channel shuffle)."""
        return self.dag.successors()

    def block(self, info: Any, reason: str) -> None:
        for channels in flat_channels(info):
            for i in channels.ids.tolist():
                self.blocked_ids.setdefault(i, reason)

    def produce(self, vertex: Vertex, n: int) -> np.ndarray:
        ids = self.uf.make(n)
        self.producers[vertex.name] = ids
        return ids

    def role(self, vertex: Vertex) -> Role:
        return self.roles.setdefault(vertex.name, Role(vertex.name))


@dataclass
class ShapeOf:
    """The shape of a tensor with tracked channels (`x.shape`): its channel entry is a channel count."""

    channels: Channels


@dataclass
class Count:
    """A channel count read as a number (`C` of `B, C, H, W = x.shape`): after pruning it reads the
    new count, so it is fine where it sizes the same channels again (a reshape that puts them back
    on one axis) and blocks them anywhere else."""

    channels: Channels
    exact: bool = True  # False: a number computed from it (`C // heads`)


def flat_channels(info: Any) -> list[Channels]:
    """Every `Channels` in an info (a tensor's, a shape's or count's, inside tuples)."""
    if isinstance(info, Channels):
        return [info]
    if isinstance(info, (ShapeOf, Count)):
        return [info.channels]
    if isinstance(info, (list, tuple)):
        return [c for item in info for c in flat_channels(item)]
    return []


def numbers(info: Any) -> list[ShapeOf | Count]:
    """The shapes and channel counts in an argument's info."""
    if isinstance(info, (ShapeOf, Count)):
        return [info]
    if isinstance(info, (list, tuple)):
        return [n for item in info for n in numbers(item)]
    return []


def rank_of(value: Any) -> int:
    return value.dim() if isinstance(value, torch.Tensor) else 0


def call_arg(v: Vertex, index: int, name: str, default: Any = None) -> Any:
    """Argument `index` of the call (or keyword `name`), `default` when not given; for a module op
    (`nn.GLU` for `F.glu`) its attribute `name`."""
    if not isinstance(v.module, FunctionOp) and hasattr(v.module, name):
        return getattr(v.module, name)
    if len(v.args) > index:
        return v.args[index]
    return v.kwargs.get(name, default)


def kept_count(keep: Callable[[np.ndarray], np.ndarray], ids: np.ndarray) -> int:
    return int(keep(ids).sum()) if len(ids) else 0


def tie_columns(a: Analysis, table: np.ndarray) -> None:
    """Union the ids of each column of `table` (one row per group: a grouped conv, a GLU's halves)."""
    for row in table[1:]:
        a.uf.union(table[0], row)


def is_index_tensor(value: Any) -> TypeGuard[torch.Tensor]:
    """An integer tensor used as an index (rows of a lookup table), not a boolean mask."""
    return isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool
