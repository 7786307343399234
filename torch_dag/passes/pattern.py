"""One small matcher for every pass: a pattern describes a vertex and its neighbourhood.

    conv_bn_relu = op("ReLU", inputs=[op("BatchNorm2d", inputs=[op(CONVS)], only_user=True)])
    lonely_conv = op(CONVS, where=lambda v, g: not any(g[u].op in NORMS for u in g.users(v.name)))
    for m in find(dag, conv_bn_relu): ...      # m.vertex is the ReLU, m["..."] the captured ones
    why_not(dag, conv_bn_relu, "layer1_0_relu")  # -> "input 0: op is Conv2d, expected one of BatchNorm2d"

A failed match says why, so users can debug their own patterns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..core.dag import DagModule, Vertex
from ..core.template import Ref, unique_refs
from .editor import Editor

CONVS = frozenset({"Conv1d", "Conv2d", "Conv3d"})
LINEARS = frozenset({"Linear"})
BATCH_NORMS = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d"})
NORMS = BATCH_NORMS | {"LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "RMSNorm",
                       "LocalResponseNorm"}
ACTIVATIONS = frozenset({"ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "CELU", "SELU", "GELU", "SiLU", "Mish",
                         "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Hardtanh", "Softplus", "Softsign",
                         "Tanhshrink", "Hardshrink", "Softshrink", "Threshold", "LogSigmoid", "GLU"})
DROPOUTS = frozenset({"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"})
# ops that read only a tensor's metadata (shape checks): they do not count as readers of its values
METADATA_READERS = frozenset({"size", "dim", "numel", "dtype_of", "device_of"})

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

    ops: frozenset[str] | None = None
    where: Check | None = None
    inputs: tuple[Pattern | None, ...] | None = None
    only_user: bool = False  # nothing but the vertex above reads this one's values (shape queries aside)
    name: str | None = None  # capture key in the match (default: the op set)


def op(ops: str | Iterable[str] | None = None, *, where: Check | None = None,
       inputs: Iterable[Pattern | None] | None = None, only_user: bool = False, name: str | None = None) -> Pattern:
    """A pattern: `ops` an op name or a set of names (None for any), `where(vertex, view)` an extra
    check, `inputs` patterns for the vertex's tensor inputs in order (None = anything)."""
    if isinstance(ops, str):
        ops = frozenset({ops})
    elif ops is not None:
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


def try_match(pattern: Pattern, vertex: Vertex, view: GraphView, user: str | None = None
              ) -> tuple[Match | None, str]:
    """Match `pattern` at `vertex`; return (match, "") or (None, the reason it failed)."""
    if pattern.ops is not None and vertex.op not in pattern.ops:
        return None, f"{vertex.name}: op is {vertex.op}, expected one of {', '.join(sorted(pattern.ops))}"
    if pattern.only_user and user is not None and view.value_users(vertex.name) != [user]:
        return None, f"{vertex.name}: read by {view.value_users(vertex.name)}, not only by {user}"
    if pattern.where is not None and not pattern.where(vertex, view):
        return None, f"{vertex.name}: the where-check is false"
    captured = {pattern.name or vertex.op: vertex}
    if pattern.inputs is not None:
        names = _tensor_inputs(vertex)
        if len(names) < len(pattern.inputs):
            return None, f"{vertex.name}: has {len(names)} tensor inputs, the pattern needs {len(pattern.inputs)}"
        for i, (sub, input_name) in enumerate(zip(pattern.inputs, names)):
            if sub is None:
                continue
            if input_name not in view.by_name:
                return None, f"{vertex.name}: input {i} is the DAG input {input_name!r}"
            found, reason = try_match(sub, view[input_name], view, user=vertex.name)
            if found is None:
                return None, f"input {i} of {reason}" if not reason.startswith("input") else reason
            captured.update(found.captured)
    return Match(vertex, captured), ""


def find(graph: Graph, pattern: Pattern) -> list[Match]:
    """Every match of `pattern`, in vertex order."""
    view = GraphView(graph)
    return [m for v in view.by_name.values() for m, _ in [try_match(pattern, v, view)] if m is not None]


def why_not(graph: Graph, pattern: Pattern, vertex_name: str) -> str | None:
    """None if `pattern` matches at `vertex_name`, else the reason it does not."""
    view = GraphView(graph)
    return try_match(pattern, view[vertex_name], view)[1] or None


def any_op(*sets: Iterable[str]) -> frozenset[str]:
    out: set[str] = set()
    for s in sets:
        out.update(s)
    return frozenset(out)


__all__ = ["ACTIVATIONS", "BATCH_NORMS", "CONVS", "DROPOUTS", "LINEARS", "METADATA_READERS", "NORMS", "GraphView", "Match",
           "Pattern", "any_op", "find", "op", "try_match", "why_not"]
