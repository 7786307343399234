"""Functional patterns the converter raises to single ops, so that passes see one vertex with weights.

Weight standardization (NFNets, BiT): a Parameter `w` reshaped to (1, out, -1), normalized by
`batch_norm(..., training=True)` with an optional `gain * scale` as its weight, shaped back with
`view_as(w)` and used by `conv2d` becomes one `WSConv2d` vertex holding the same parameters; the
computation is the same, op for op.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.dag import DagModule, Vertex
from ..core.editor import Editor
from ..core.ops import Parameter
from ..core.template import Ref, unique_refs
from ..core.wsconv import WSConv2d


def raise_weight_standardization(dag: DagModule) -> DagModule:
    """The DAG with every weight-standardized functional conv2d as a `WSConv2d` vertex (or `dag`
    itself when it has none)."""
    editor = None
    for vertex in dag:
        if vertex.op != "conv2d":
            continue
        found = _match(dag, vertex)
        if found is None:
            continue
        editor = editor or Editor(dag)
        module, chain = found
        name = editor.fresh_name(chain[0].removesuffix("_weight") or vertex.name)
        editor.insert(Vertex(name, module, (vertex.args[0],), meta=dict(vertex.meta)), before=vertex.name)
        editor.rewire(vertex.name, name)
        for dead in (vertex.name, *reversed(chain)):
            if not editor.users(dead):
                editor.remove(dead)
    return dag if editor is None else editor.build()


def _match(dag: DagModule, conv: Vertex) -> tuple[WSConv2d, list[str]] | None:
    """The WSConv2d that computes `conv`, and the vertices it replaces, if `conv` is that pattern."""
    args = conv.args
    if (
        len(args) != 7
        or conv.kwargs
        or not isinstance(args[1], Ref)
        or not all(isinstance(a, (int, tuple, str)) for a in args[3:])
    ):
        return None
    view_as = _only_use(dag, args[1].name, conv.name, "view_as")
    if view_as is None or not isinstance(view_as.args[1], Ref):
        return None
    weight = _parameter(dag, view_as.args[1].name)
    norm = _standardization(dag, view_as, weight)
    if weight is None or norm is None:
        return None
    out_channels = weight.weight.shape[0]
    chain = [view_as.args[1].name, norm.args[0].name, norm.name, view_as.name]
    found = _gain(dag, norm.args[3], norm.name, out_channels, chain)
    if found is None:
        return None
    bias = _parameter(dag, args[2].name) if isinstance(args[2], Ref) else None
    if args[2] is not None and (bias is None or bias.weight.shape != (out_channels,)):
        return None
    if bias is not None:
        chain.insert(0, args[2].name)
    return _ws_conv(weight, bias, *found, eps=norm.args[7], conv_args=args[3:]), chain


def _standardization(dag: DagModule, view_as: Vertex, weight: Parameter | None) -> Vertex | None:
    """The `batch_norm` vertex that standardizes `weight` (reshaped to one row per output channel, no
    running statistics, training mode) for `view_as`, or None."""
    norm = (
        _only_use(dag, view_as.args[0].name, view_as.name, "batch_norm")
        if isinstance(view_as.args[0], Ref)
        else None
    )
    if weight is None or norm is None or weight.weight.dim() != 4 or norm.kwargs:
        return None
    # batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if (
        len(norm.args) != 8
        or norm.args[1:3] != (None, None)
        or norm.args[4] is not None
        or norm.args[5] is not True
        or not isinstance(norm.args[7], float)
    ):
        return None
    reshape = (
        _only_use(dag, norm.args[0].name, norm.name, "reshape") if isinstance(norm.args[0], Ref) else None
    )
    if reshape is None or reshape.args != (Ref(view_as.args[1].name), (1, weight.weight.shape[0], -1)):
        return None
    return norm


def _ws_conv(
    weight: Parameter,
    bias: Parameter | None,
    gain: nn.Parameter | None,
    scale: float,
    *,
    eps: float,
    conv_args: tuple,
) -> WSConv2d:
    """The WSConv2d reading the model's own tensors (shared, as fx shares them)."""
    stride, padding, dilation, groups = conv_args
    with torch.device("meta"):  # the tensors are the model's own, set below
        module = WSConv2d(
            weight.weight.shape[1] * groups,
            weight.weight.shape[0],
            tuple(weight.weight.shape[2:]),
            stride,
            padding,
            dilation,
            groups,
            bias=bias is not None,
            gain=gain is not None,
            scale=scale,
            eps=eps,
        )
    module.weight = weight.weight
    module.bias = bias.weight if bias is not None else None
    module.gain = gain
    return module


def _gain(
    dag: DagModule, arg: Any, user: str, out_channels: int, chain: list[str]
) -> tuple[nn.Parameter | None, float] | None:
    """The batch_norm weight as (gain, scale): (None, 1) for no weight, or (gain, scale) for
    `(gain * scale).reshape(-1)` with gain a Parameter of shape (out, 1, 1, 1); None when it is something else."""
    if arg is None:
        return None, 1.0
    flat = _only_use(dag, arg.name, user, "reshape") if isinstance(arg, Ref) else None
    if flat is None or flat.args[1:] != ((-1,),) or not isinstance(flat.args[0], Ref):
        return None
    product = _only_use(dag, flat.args[0].name, flat.name, "mul")
    if (
        product is None
        or len(product.args) != 2
        or product.kwargs
        or not isinstance(product.args[0], Ref)
        or not isinstance(product.args[1], (int, float))
    ):
        return None
    gain = _parameter(dag, product.args[0].name)
    if gain is None or gain.weight.shape != (out_channels, 1, 1, 1):
        return None
    chain[1:1] = [product.args[0].name, product.name, flat.name]
    return gain.weight, float(product.args[1])


def _only_use(dag: DagModule, name: str, user: str, op: str) -> Vertex | None:
    """Vertex `name` if it is an `op` whose output only `user` reads."""
    if name not in dag or dag[name].op != op:
        return None
    readers = [v.name for v in dag if name in v.predecessors]
    return dag[name] if readers == [user] and name not in _output_names(dag) else None


def _parameter(dag: DagModule, name: str) -> Parameter | None:
    module = dag[name].module if name in dag else None
    return module if isinstance(module, Parameter) else None


def _output_names(dag: DagModule) -> set[str]:
    return set(unique_refs(dag.output))
