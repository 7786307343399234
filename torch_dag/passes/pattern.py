"""One small matcher for every pass: a pattern describes a vertex and its neighbourhood.

    conv_bn_relu = op("ReLU", inputs=[op("BatchNorm2d", inputs=[op(CONVS)], only_user=True)])
    lonely_conv = op(CONVS, where=lambda v, g: not any(g[u].op in NORMS for u in g.users(v.name)))
    for m in find(dag, conv_bn_relu): ...      # m.vertex is the ReLU, m["..."] the captured ones
    why_not(dag, conv_bn_relu, "layer1_0_relu")  # -> "input 0: op is Conv2d, expected one of BatchNorm2d"

A failed match says why, so users can debug their own patterns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TypeVar

from ..core.dag import DagModule, Vertex
from ..core.editor import Editor
from ..core.functions import FUNCTIONS
from ..core.template import Ref, unique_refs
from ..core.traits import Trait, has_trait, registered_ops

_T = TypeVar("_T")


class OpSet(AbstractSet[str]):
    """The registered ops having any one of `traits` (only module ops, not function ops, with
    `modules_only`): a read-only set of op names, read from the trait registry at each use, so an op
    registered later belongs to it as soon as it is registered."""

    def __init__(self, *traits: Trait, modules_only: bool = False):
        self.traits = traits
        self.modules_only = modules_only

    def __contains__(self, op: object) -> bool:
        if not isinstance(op, str) or (self.modules_only and op in FUNCTIONS):
            return False
        return any(has_trait(op, trait) for trait in self.traits)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(op for op in registered_ops() if op in self))

    def __len__(self) -> int:
        return sum(1 for op in registered_ops() if op in self)

    @classmethod
    def _from_iterable(cls, ops: Iterable[_T]) -> frozenset[_T]:
        """`CONVS | {"Linear"}` and the other set operators give a plain frozenset (of today's ops)."""
        return frozenset(ops)

    def __hash__(self) -> int:
        return self._hash()

    def __repr__(self) -> str:
        kind = "module ops" if self.modules_only else "ops"
        return f"OpSet({kind} with any of {', '.join(map(repr, self.traits))}: {', '.join(self)})"


# the op families passes match on, derived from the traits each op declares where it is registered
CONVS = OpSet(Trait.CONV, modules_only=True)
LINEARS = OpSet(Trait.LINEAR, modules_only=True)
BATCH_NORMS = OpSet(Trait.BATCH_NORM, modules_only=True)
NORMS = OpSet(Trait.NORM, modules_only=True)
ACTIVATIONS = OpSet(Trait.ACTIVATION, modules_only=True)
DROPOUTS = OpSet(Trait.DROPOUT, modules_only=True)
# ops that read only a tensor's metadata (shape checks): they do not count as readers of its values
METADATA_READERS = OpSet(Trait.METADATA)

Graph = Editor | DagModule
Check = Callable[[Vertex, "GraphView"], bool]


class GraphView:
    """Read-only neighbourhood queries over a DagModule or an Editor, with users cached."""

    def __init__(self, graph: Graph):
        self.graph = graph
        vertices = list(graph)
        self.by_name = {v.name: v for v in vertices}
        self._users: dict[str, list[str]] = {}
        for vertex in vertices:
            for name in vertex.predecessors:
                self._users.setdefault(name, []).append(vertex.name)
        for name in unique_refs(graph.output):
            self._users.setdefault(name, []).append("<output>")

    def __getitem__(self, name: str) -> Vertex:
        return self.by_name[name]

    def users(self, name: str) -> list[str]:
        return self._users.get(name, [])

    def value_users(self, name: str) -> list[str]:
        """Readers of `name`'s values: users other than shape/dtype queries."""
        return [u for u in self.users(name) if u == "<output>" or self[u].op not in METADATA_READERS]


@dataclass(frozen=True)
class Pattern:
    """Matches a vertex by op and neighbourhood. Build with `op(...)`."""

    ops: AbstractSet[str] | None = None  # a frozenset of names, or an OpSet (read at match time)
    where: Check | None = None
    inputs: tuple[Pattern | None, ...] | None = None
    only_user: bool = False  # nothing but the vertex above reads this one's values (shape queries aside)
    name: str | None = None  # capture key in the match (default: the op set)


def op(
    ops: str | Iterable[str] | None = None,
    *,
    where: Check | None = None,
    inputs: Iterable[Pattern | None] | None = None,
    only_user: bool = False,
    name: str | None = None,
) -> Pattern:
    """A pattern: `ops` an op name or a set of names (None for any; an `OpSet` is read at match time),
    `where(vertex, view)` an extra check, `inputs` patterns for the vertex's tensor inputs in order
    (None = anything)."""
    if isinstance(ops, str):
        ops = frozenset({ops})
    elif ops is not None and not isinstance(ops, OpSet):
        ops = frozenset(ops)
    return Pattern(ops, where, tuple(inputs) if inputs is not None else None, only_user, name)


@dataclass
class Match:
    vertex: Vertex
    captured: dict[str, Vertex]

    def __getitem__(self, key: str) -> Vertex:
        return self.captured[key]


def _tensor_inputs(vertex: Vertex) -> list[str]:
    return [a.name for a in vertex.args if isinstance(a, Ref)]


def try_match(
    pattern: Pattern, vertex: Vertex, view: GraphView, user: str | None = None, *, explain: bool = True
) -> tuple[Match | None, str]:
    """Match `pattern` at `vertex`; return (match, "") or (None, the reason it failed: "" unless
    `explain`, as listing an `OpSet` reads the whole registry)."""
    if pattern.ops is not None and vertex.op not in pattern.ops:
        expected = ", ".join(sorted(pattern.ops)) if explain else "..."
        return None, f"{vertex.name}: op is {vertex.op}, expected one of {expected}"
    if pattern.only_user and user is not None and view.value_users(vertex.name) != [user]:
        return None, f"{vertex.name}: read by {view.value_users(vertex.name)}, not only by {user}"
    if pattern.where is not None and not pattern.where(vertex, view):
        return None, f"{vertex.name}: the where-check is false"
    captured = {pattern.name or vertex.op: vertex}
    if pattern.inputs is not None:
        names = _tensor_inputs(vertex)
        if len(names) < len(pattern.inputs):
            return (
                None,
                f"{vertex.name}: has {len(names)} tensor inputs, the pattern needs {len(pattern.inputs)}",
            )
        for i, (sub, input_name) in enumerate(zip(pattern.inputs, names)):
            if sub is None:
                continue
            if input_name not in view.by_name:
                return None, f"{vertex.name}: input {i} is the DAG input {input_name!r}"
            found, reason = try_match(sub, view[input_name], view, user=vertex.name, explain=explain)
            if found is None:
                return None, f"input {i} of {reason}" if not reason.startswith("input") else reason
            captured.update(found.captured)
    return Match(vertex, captured), ""


def find(graph: Graph, pattern: Pattern) -> list[Match]:
    """Every match of `pattern`, in vertex order."""
    view = GraphView(graph)
    matches = (try_match(pattern, v, view, explain=False)[0] for v in view.by_name.values())
    return [m for m in matches if m is not None]


def why_not(graph: Graph, pattern: Pattern, vertex_name: str) -> str | None:
    """None if `pattern` matches at `vertex_name`, else the reason it does not."""
    view = GraphView(graph)
    return try_match(pattern, view[vertex_name], view)[1] or None


def any_op(*sets: Iterable[str]) -> frozenset[str]:
    out: set[str] = set()
    for s in sets:
        out.update(s)
    return frozenset(out)


__all__ = [
    "ACTIVATIONS",
    "BATCH_NORMS",
    "CONVS",
    "DROPOUTS",
    "LINEARS",
    "METADATA_READERS",
    "NORMS",
    "GraphView",
    "Match",
    "OpSet",
    "Pattern",
    "any_op",
    "find",
    "op",
    "try_match",
    "why_not",
]
