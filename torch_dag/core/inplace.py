"""In-place execution of activations in inference, where no other reader can see the difference.

Eager models run `nn.ReLU(inplace=True)` and friends; the converter makes every op out of place
(so that the graph is a pure function passes can reorder). To match eager speed, a DagModule keeps a
second call table for `torch.no_grad()` / inference mode in which an activation overwrites its input
when that input, and everything that may share its storage (views, Identity), is read by nothing
afterwards, is not a DAG input, parameter or constant, and is not returned.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .ops import Constant, LayerProxy, Parameter, callable_of, is_dag_module, op_name
from .template import Ref, unique_refs
from .traits import Trait, has_trait


def _leaky_relu_(m: nn.LeakyReLU) -> Callable[..., Any]:
    return functools.partial(F.leaky_relu, negative_slope=m.negative_slope, inplace=True)


def _elu_(m: nn.ELU) -> Callable[..., Any]:
    return functools.partial(F.elu, alpha=m.alpha, inplace=True)


def _hardtanh_(m: nn.Hardtanh) -> Callable[..., Any]:
    return functools.partial(F.hardtanh, min_val=m.min_val, max_val=m.max_val, inplace=True)


# op name -> in-place callable made from the vertex's module (each maker takes its op's module class)
IN_PLACE: dict[str, Callable[[Any], Callable[..., Any]]] = {
    "ReLU": lambda m: torch.relu_,
    "ReLU6": lambda m: functools.partial(F.relu6, inplace=True),
    "SiLU": lambda m: functools.partial(F.silu, inplace=True),
    "Hardswish": lambda m: functools.partial(F.hardswish, inplace=True),
    "Hardsigmoid": lambda m: functools.partial(F.hardsigmoid, inplace=True),
    "Mish": lambda m: functools.partial(F.mish, inplace=True),
    "LeakyReLU": _leaky_relu_,
    "ELU": _elu_,
    "Hardtanh": _hardtanh_,
}


def _fresh(module: nn.Module) -> bool:
    """Whether the module's output never shares storage with its inputs or its own tensors."""
    if isinstance(module, (Parameter, Constant)) or is_dag_module(module):
        return False
    if isinstance(module, LayerProxy):  # a flexible layer may hand out a view of its parameter
        return _fresh(module.current_layer())
    op = op_name(module)
    return not has_trait(op, Trait.ALIASES_INPUT)


def in_place_calls(dag: Any, predecessors: list[list[str]] | None = None) -> tuple[Callable[..., Any], ...]:
    """The call table for inference: like `callable_of` per vertex, with safe activations in place
    (`predecessors`: each vertex's, when the caller has them)."""
    vertices = list(dag)
    if predecessors is None:
        predecessors = [v.predecessors for v in vertices]
    last_use: dict[str, float] = {}
    for i, names_read in enumerate(predecessors):
        for name in names_read:
            last_use[name] = i
    for name in unique_refs(dag.output):
        last_use[name] = float("inf")
    root: dict[str, str] = {name: name for name in dag.input_names}
    protected = set(dag.input_names)
    class_end: dict[str, float] = {name: last_use.get(name, -1) for name in dag.input_names}
    calls = []
    for i, vertex in enumerate(vertices):
        first = next((a.name for a in vertex.args if isinstance(a, Ref)), None)
        call = callable_of(vertex.module)
        if isinstance(vertex.module, (Parameter, Constant)):
            protected.add(vertex.name)
        make = IN_PLACE.get(op_name(vertex.module)) if not is_dag_module(vertex.module) else None
        if (
            make is not None
            and first is not None
            and len(predecessors[i]) == 1
            and not vertex.kwargs
            and root[first] not in protected
            and class_end[root[first]] <= i
        ):
            call = make(vertex.module)
        if (_fresh(vertex.module) and call is callable_of(vertex.module)) or first is None:
            root[vertex.name] = vertex.name
        else:  # a view, an Identity, an op of unknown aliasing, or an in-place activation
            root[vertex.name] = root[first]
        key = root[vertex.name]
        class_end[key] = max(class_end.get(key, -1), last_use.get(vertex.name, -1))
        calls.append(call)
    return tuple(calls)
