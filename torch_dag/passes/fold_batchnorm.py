"""`fold_batchnorm`: merge an eval-mode BatchNorm into the conv or linear layer that feeds it."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..core.dag import DagModule, Vertex
from .editor import Editor
from .pattern import BATCH_NORMS, CONVS, GraphView, op, try_match

_PAIR = op(BATCH_NORMS, name="bn", where=lambda v, g: v.module.track_running_stats,
           inputs=[op(CONVS | {"Linear"}, name="layer", only_user=True)])


def _foldable(match_layer: Vertex, bn: Vertex, shared: set[int]) -> str | None:
    """Why this conv/linear + BN pair cannot be folded, or None."""
    layer = match_layer.module
    if id(layer) in shared:
        return "the layer's module is also used by another vertex"
    if layer.weight.shape[0] != bn.module.num_features:
        return "channel counts differ"
    if isinstance(layer, nn.Linear) and len(match_layer.meta.get("shape", ())) != 2:
        return "BatchNorm after a Linear folds only on 2-d (batch, features) activations"
    return None


def fold_batchnorm(dag: DagModule) -> DagModule:
    """Fold every conv/linear -> BatchNorm pair (the layer read only by the BN) into one layer.

    Uses the BN's running statistics, so outputs equal the eval-mode DAG's within float rounding;
    meant for inference (the folded model has no BN to train). Pairs that cannot be folded are left.
    """
    editor = Editor(dag)
    view = GraphView(dag)
    counts: dict[int, int] = {}
    for vertex in dag:
        counts[id(vertex.module)] = counts.get(id(vertex.module), 0) + 1
    shared = {key for key, n in counts.items() if n > 1}
    for vertex in dag:
        match, _ = try_match(_PAIR, vertex, view)
        if match is None or _foldable(match["layer"], match["bn"], shared) is not None:
            continue
        layer, bn = match["layer"], match["bn"]
        editor.set_module(layer.name, _fold(layer.module, bn.module))
        editor.remove(bn.name, replacement=layer.name)
    return editor.build()


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        shift = shift + bn.bias.double()
    folded = copy.copy(layer)  # same config; fresh parameter slots so the input DAG keeps its weights
    folded._parameters = dict(layer._parameters)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    weight = layer.weight.double() * scale.reshape(shape)
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    folded.weight = nn.Parameter(weight.to(layer.weight.dtype))
    folded.bias = nn.Parameter(bias.to(layer.weight.dtype))
    return folded
