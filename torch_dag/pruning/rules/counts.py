"""Channel counts read as numbers: shape queries make them (`Count`, `ShapeOf`), shape arithmetic carries
them on, and only the ops of SIZED_BY_COUNTS may use them (others block the channels they count)."""

from __future__ import annotations

from typing import Any

from ...core.dag import Vertex
from ..channels import Analysis, Channels, Count, ShapeOf, rank_of


def shape_query(a: Analysis, v: Vertex, inputs: list[Any]) -> Any:
    """`x.shape`, `x.size(d)`, `shape[i]`, `x.numel()`: a channel count read as a number becomes a
    `Count`, which only reshapes and expands may use; other entries are free; a slice of a shape
    over the channels and the element count block them."""
    x = inputs[0]
    if v.op == "size":
        dim = v.args[1] if len(v.args) > 1 else None
        if isinstance(x, Channels) and dim is None:
            return ShapeOf(x)
        if (
            isinstance(x, Channels)
            and isinstance(dim, int)
            and dim % rank_of(a.values[v.args[0].name]) == x.axis
        ):
            return Count(x)
        return None
    if v.op == "numel":
        a.block(x, f"{v.name}: reads the element count")
        return None
    if v.op == "getitem" and isinstance(x, ShapeOf):
        index, rank = v.args[1], len(a.values[v.args[0].name])
        if isinstance(index, int) and index % rank == x.channels.axis:
            return Count(x.channels)
        covered = (
            range(rank)[index]
            if isinstance(index, slice)
            else [index % rank]
            if isinstance(index, int)
            else None
        )
        if covered is None or x.channels.axis in covered:
            a.block(x, f"{v.name}: reads the channel count from a shape")
        return None
    return NOT_A_QUERY


NOT_A_QUERY = object()
SHAPE_QUERIES = frozenset({"size", "numel"})  # METADATA ops whose answer changes with the channels
# ops that Python numbers go through in shape arithmetic (`C // heads`): the result is an inexact count.
# Explicit, not every ELEMENTWISE op: `round(C * 0.5)` or `maximum(C, 8)` is no count a reshape may use
ARITHMETIC = frozenset({"add", "sub", "mul", "div", "floor_divide", "remainder", "pow", "neg", "rsub"})
SIZED_BY_COUNTS = frozenset({"reshape", "expand"})  # their rules check the counts they are given


def is_shape_query(op: str, inputs: list[Any]) -> bool:
    """Whether a vertex reads a shape: `size` / `numel`, or an entry of a shape (`shape[1]`)."""
    return op in SHAPE_QUERIES or (op == "getitem" and bool(inputs) and isinstance(inputs[0], ShapeOf))
