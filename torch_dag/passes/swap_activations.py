"""`swap_activations`: replace activation vertices by others, whatever spelling the source used."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from torch import nn

from ..core.dag import DagModule
from ..core.editor import Editor
from ..core.errors import DagError
from ..core.ops import MODULE_OPS, module_op_spec
from .pattern import ACTIVATIONS

Replacement = str | type[nn.Module] | Callable[[nn.Module], nn.Module]


def _op_key(key: str | type[nn.Module]) -> str:
    """'relu', 'ReLU' or nn.ReLU -> 'ReLU' (module op names are torch.nn class names)."""
    if isinstance(key, type):
        if key not in MODULE_OPS:
            raise DagError(f"{key.__qualname__} is not an op of the vocabulary")
        return MODULE_OPS[key].name
    by_lower = {spec.name.lower(): spec.name for spec in MODULE_OPS.values()}
    if key.lower() not in by_lower:
        raise DagError(
            f"unknown activation {key!r}; module ops are torch.nn class names, the activations "
            f"among them: {', '.join(ACTIVATIONS)}"
        )
    return by_lower[key.lower()]


def _factory(replacement: Replacement) -> Callable[[nn.Module], nn.Module]:
    if isinstance(replacement, (str, type)):
        cls = module_op_spec(_op_key(replacement)).cls
        return lambda old: cls()
    return replacement


def swap_activations(
    dag: DagModule, mapping: Mapping[str | type[nn.Module], Replacement], *, names: str | None = None
) -> DagModule:
    """A copy of `dag` where every vertex whose op is a key of `mapping` gets the mapped module.

    Keys are op names (any case) or classes; values are op names, classes (built with no arguments)
    or factories `old_module -> new_module`. `names` is a regular expression that vertex names must
    match (`re.search`) to be swapped. Functional spellings in the source (`F.relu`, `x.sigmoid()`)
    were canonicalized by the converter, so they are swapped too.
    """
    table = {_op_key(k): _factory(v) for k, v in mapping.items()}
    pattern = re.compile(names) if names is not None else None
    editor = Editor(dag)
    for vertex in editor:
        make = table.get(vertex.op)
        if make is None or (pattern is not None and not pattern.search(vertex.name)):
            continue
        module = make(vertex.module)
        if not isinstance(module, nn.Module):
            raise DagError(f"replacement for vertex {vertex.name!r} ({vertex.op}) is not an nn.Module")
        editor.set_module(vertex.name, module)
    return editor.build()
