"""`fold_batchnorm`: merge an eval-mode BatchNorm into the conv or linear layer that feeds it."""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..core.dag import DagModule, Vertex
from ..core.editor import Editor
from ..core.traits import Trait
from .pattern import BATCH_NORMS, GraphView, OpSet, find, op

# the module classes of the CONV and LINEAR module ops
_Layer = _ConvNd | nn.Linear


def _tracks_running_stats(bn: Vertex, graph: GraphView) -> bool:
    return cast(_BatchNorm, bn.module).track_running_stats


_PAIR = op(
    BATCH_NORMS,
    name="bn",
    where=_tracks_running_stats,
    inputs=[op(OpSet(Trait.CONV, Trait.LINEAR, modules_only=True), name="layer", only_user=True)],
)


def _foldable(match_layer: Vertex, bn: Vertex, shared: set[int]) -> str | None:
    """Why this conv/linear + BN pair cannot be folded, or None."""
    layer = cast(_Layer, match_layer.module)
    if id(layer) in shared:
        return "the layer's module is also used by another vertex"
    if layer.weight.shape[0] != cast(_BatchNorm, bn.module).num_features:
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
    counts: dict[int, int] = {}
    for vertex in dag:
        counts[id(vertex.module)] = counts.get(id(vertex.module), 0) + 1
    shared = {key for key, n in counts.items() if n > 1}
    for match in find(dag, _PAIR):
        if _foldable(match["layer"], match["bn"], shared) is not None:
            continue
        layer, bn = match["layer"], match["bn"]
        editor.set_module(layer.name, _fold(cast(_Layer, layer.module), cast(_BatchNorm, bn.module)))
        editor.remove(bn.name, replacement=layer.name)
    return editor.build()


@torch.no_grad()
def _fold(layer: _Layer, bn: _BatchNorm) -> nn.Module:
    if bn.running_mean is None or bn.running_var is None:  # the pattern matched track_running_stats
        raise AttributeError("a BatchNorm tracking running statistics has none (running_mean/var is None)")
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
