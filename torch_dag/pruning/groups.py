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

from collections.abc import Iterable
from typing import Any

import torch

from ..core.dag import DagModule
from ..core.errors import DagError
from ..core.ops import Constant, Parameter
from ..core.template import iter_refs, map_refs
from .channels import Analysis, ChannelGroups, Channels, Count, Group, ShapeOf, numbers
from .rules import ARITHMETIC, ATTENTION, HARMLESS, NOT_A_QUERY, RULES, SIZED_BY_COUNTS, shape_query

__all__ = ["ChannelGroups", "Channels", "Group", "channel_groups"]


def channel_groups(dag: DagModule, example_inputs: tuple, protected: Iterable[str] = (), *,
                   values: dict[str, Any] | None = None, attention: str = "heads") -> ChannelGroups:
    """Analyse `dag` on `example_inputs` (shapes only matter) and return its channel groups;
    `values` (from `dag.run_collecting(*example_inputs)`) saves the forward pass when at hand.
    `attention`: "heads" prunes attention heads whole, "head_dim" the same positions of every head."""
    if attention not in ("heads", "head_dim"):
        raise DagError(f"attention={attention!r}: use 'heads' (whole heads) or 'head_dim' (positions of every head)")
    if values is None:
        with torch.no_grad():
            values = dag.run_collecting(*example_inputs)
    analysis = Analysis(dag, values, protected, attention)
    info = analysis.info
    for vertex in dag:
        inputs = [map_refs(arg, lambda r: info.get(r.name)) for arg in vertex.args]
        op = vertex.op
        if op in HARMLESS:
            info[vertex.name] = None
            continue
        if op in ("size", "numel") or (op == "getitem" and inputs and isinstance(inputs[0], ShapeOf)):
            result = shape_query(analysis, vertex, inputs)
            info[vertex.name] = None if result is NOT_A_QUERY else result
            continue
        if isinstance(vertex.module, (Parameter, Constant)):
            info[vertex.name] = None
            continue
        rule = RULES.get(op)
        if op in ARITHMETIC and not isinstance(values[vertex.name], torch.Tensor) and numbers(inputs):
            counts = numbers(inputs)  # `C // heads`: a number that only a reshape may use
            analysis.block(counts[1:], f"{vertex.name}: {op} of several channel counts")
            info[vertex.name] = Count(counts[0].channels, exact=False)
            continue
        if op not in SIZED_BY_COUNTS:  # a shape or count used in a new tensor's size, a comparison...
            analysis.block(numbers(inputs), f"{vertex.name}: {op} reads the channel count")
        # rules read tensors from the positional arguments only (and attention its mask): channels
        # passed by keyword stay
        keywords = {k: kw for k, kw in vertex.kwargs.items() if not (op == ATTENTION and k == "attn_mask")}
        analysis.block([info.get(r.name) for r in iter_refs(keywords)], f"{vertex.name}: {op} takes them by keyword")
        if rule is None:
            analysis.block(inputs, f"{vertex.name}: no channel rule for op {op}")
            info[vertex.name] = None
            continue
        out = rule(analysis, vertex, inputs, values[vertex.name])
        if out is None and vertex.name not in analysis.roles:  # safety net: ids may never vanish silently
            analysis.block(inputs, f"{vertex.name}: {op} does not carry the channels on")
        if vertex.name in analysis.protected:
            analysis.block(out, f"{vertex.name}: protected")
        info[vertex.name] = out
    for ref in iter_refs(dag.output):
        analysis.block(info.get(ref.name), "a DAG output keeps its shape")
    shapes = {n: tuple(v.shape) for n, v in values.items() if isinstance(v, torch.Tensor)}
    blocked: dict[int, str] = {}
    for i, reason in analysis.blocked_ids.items():
        blocked.setdefault(analysis.uf.find(i), reason)
    return ChannelGroups(analysis.uf, analysis.roles, analysis.producers, blocked, shapes)
