"""Channel groups ("orbits"): which channels of a DAG must be removed together.

Every channel a producer (conv, linear) creates gets an id. Ids flow through the DAG with one rule
per op (pass-through ops keep them, element-wise ops tie the ids of their operands position by
position, concat lays them end to end, flatten repeats them per spatial position, depthwise convs
keep their input's ids). Tied ids form one class (union-find): a class is one channel that exists
in several layers and is kept or removed everywhere at once. A class that reaches an op without a
rule, a DAG output or a protected vertex is unprunable, with the reason. Pruning can never produce
a model whose shapes do not fit.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import torch

from ..core.dag import DagModule, Vertex
from ..core.errors import DagError
from ..core.ops import Constant, Parameter
from ..core.options import check_option, choices
from ..core.template import iter_refs, map_refs
from .channels import Analysis, ChannelGroups, Channels, Count, Group, numbers
from .rules import (
    ARITHMETIC,
    KEYWORD_OPERANDS,
    NOT_A_QUERY,
    SIZED_BY_COUNTS,
    is_harmless,
    is_shape_query,
    rule_for,
    shape_query,
)

__all__ = ["AttentionMode", "ChannelGroups", "Channels", "Group", "channel_groups", "check_protected"]

AttentionMode = Literal["heads", "head_dim"]  # remove whole heads, or the same positions of every head


def channel_groups(
    dag: DagModule,
    example_inputs: tuple,
    protected: Iterable[str] = (),
    *,
    values: dict[str, Any] | None = None,
    attention: AttentionMode = "heads",
) -> ChannelGroups:
    """Analyse `dag` on `example_inputs` (shapes only matter) and return its channel groups;
    `values` (from `dag.run_collecting(*example_inputs)`) saves the forward pass when at hand.
    `attention`: "heads" prunes attention heads whole, "head_dim" the same positions of every head."""
    check_option("attention", attention, choices(AttentionMode), what="attention mode")
    if values is None:
        with torch.no_grad():
            values = dag.run_collecting(*example_inputs)
    analysis = Analysis(dag, values, check_protected(dag, protected), attention)
    for vertex in dag:
        analysis.info[vertex.name] = _visit(analysis, vertex)
    for ref in iter_refs(dag.output):
        analysis.block(analysis.info.get(ref.name), "a DAG output keeps its shape")
    shapes = {n: tuple(v.shape) for n, v in values.items() if isinstance(v, torch.Tensor)}
    blocked: dict[int, str] = {}
    for i, reason in analysis.blocked_ids.items():
        blocked.setdefault(analysis.uf.find(i), reason)
    carried = {name: _ids_of(info) for name, info in analysis.info.items()}
    carried = {name: ids for name, ids in carried.items() if len(ids)}
    return ChannelGroups(analysis.uf, analysis.roles, analysis.producers, blocked, shapes, carried)


def _ids_of(info: Any) -> np.ndarray:
    """The channel ids of a tensor's info (a tuple's parts end to end); shapes and counts carry none."""
    if isinstance(info, Channels):
        return info.ids
    if isinstance(info, (list, tuple)):
        parts = [_ids_of(item) for item in info]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return np.zeros(0, dtype=np.int64)


def _visit(a: Analysis, vertex: Vertex) -> Any:
    """What `vertex` carries on (channels, a shape, a count, or None), by its op's rule; channels that
    reach it where no rule can follow them are blocked."""
    info, op = a.info, vertex.op
    inputs = [map_refs(arg, lambda r: info.get(r.name)) for arg in vertex.args]
    if is_shape_query(op, inputs):  # size / numel first: they are METADATA ops, but not harmless ones
        result = shape_query(a, vertex, inputs)
        return None if result is NOT_A_QUERY else result
    if is_harmless(op) or isinstance(vertex.module, (Parameter, Constant)):
        return None
    counts = numbers(inputs)
    if op in ARITHMETIC and not isinstance(a.values[vertex.name], torch.Tensor) and counts:
        a.block(counts[1:], f"{vertex.name}: {op} of several channel counts")
        return Count(counts[0].channels, exact=False)  # `C // heads`: a number that only a reshape may use
    if op not in SIZED_BY_COUNTS:  # a shape or count used in a new tensor's size, a comparison...
        a.block(counts, f"{vertex.name}: {op} reads the channel count")
    # rules read tensors from the positional arguments only (and from the keywords KEYWORD_OPERANDS
    # names): channels passed by any other keyword stay
    readable = KEYWORD_OPERANDS.get(op, frozenset())
    keywords = {k: kw for k, kw in vertex.kwargs.items() if k not in readable}
    a.block([info.get(r.name) for r in iter_refs(keywords)], f"{vertex.name}: {op} takes them by keyword")
    rule = rule_for(op)
    if rule is None:
        a.block(inputs, f"{vertex.name}: no channel rule for op {op}")
        return None
    out = rule(a, vertex, inputs, a.values[vertex.name])
    if out is None and vertex.name not in a.roles:  # safety net: ids may never vanish silently
        a.block(inputs, f"{vertex.name}: {op} does not carry the channels on")
    if vertex.name in a.protected:
        a.block(out, f"{vertex.name}: protected")
    return out


def check_protected(dag: DagModule, protected: Iterable[str], what: str = "protected") -> list[str]:
    """`protected` as a list of vertex names of `dag`: a vertex that a pass replaced by several (an
    attention layer split into its projections, `meta["decomposed_from"]`) stands for all of them; an
    unknown name raises, naming the closest vertex names (a misspelt name would otherwise protect nothing,
    silently)."""
    if isinstance(protected, str):
        raise DagError(f"{what}: give a list of vertex names, not the string {protected!r}")
    names = list(protected)
    parts: dict[str, list[str]] = {}
    for vertex in dag:
        if "decomposed_from" in vertex.meta:
            parts.setdefault(vertex.meta["decomposed_from"], []).append(vertex.name)
    known = [*dag.input_names, *(v.name for v in dag)]
    missing = [n for n in dict.fromkeys(names) if n not in known and n not in parts]
    if missing:
        hints = "; ".join(f"{n!r}: {_closest(n, known)}" for n in missing)
        raise DagError(
            f"{what}: no vertex named {', '.join(map(repr, missing))} in the DAG ({hints}); give vertex "
            "names as `torch-dag info` or [v.name for v in dag] lists them"
        )
    return [part for n in names for part in parts.get(n, [n])]


def _closest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    return f"closest {', '.join(map(repr, close))}" if close else "nothing close"
