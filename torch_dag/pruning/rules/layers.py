"""Channel rules of the layers with weights per channel: convolutions, linear layers and norms."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ...core.dag import Vertex
from ..channels import Analysis, Channels, rank_of, tie_columns


def conv(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """Conv1d/2d/3d: a plain conv slices its inputs and produces channels; a depthwise conv keeps its
    input's channels; a grouped conv ties each in-group position across the groups."""
    module = cast(_ConvNd, v.module)  # a conv op
    x = inputs[0]
    tracked = isinstance(x, Channels)
    if tracked and x.axis != 1:
        a.block(x, f"{v.name}: conv input channels are not on axis 1")
        tracked = False
    groups = module.groups
    if groups == 1:
        if tracked:
            a.role(v).in_ids = x.ids
        ids = a.produce(v, module.out_channels)
        a.role(v).out_ids = ids
        return Channels(1, ids)
    multiplier = module.out_channels // groups
    if module.in_channels == groups and multiplier == 1:  # depthwise: output channel c is input channel c
        if tracked:
            a.role(v).in_ids = a.role(v).out_ids = x.ids
            return Channels(1, x.ids)
        ids = a.produce(v, module.out_channels)
        a.block(Channels(1, ids), f"{v.name}: depthwise conv of untracked channels")
        return Channels(1, ids)
    ids = a.produce(v, module.out_channels)
    a.role(v).out_ids = ids
    if module.in_channels == groups:  # depthwise x multiplier: input c and its outputs go together
        if tracked:
            a.uf.union(np.repeat(x.ids, multiplier), ids)
        else:
            a.block(Channels(1, ids), f"{v.name}: depthwise conv (x{multiplier}) of untracked channels")
        return Channels(1, ids)
    # grouped: every group's weights are laid out alike, so an in-group position goes from all groups at once
    tie_columns(a, ids.reshape(groups, -1))
    if tracked:
        tie_columns(a, x.ids.reshape(groups, -1))
        a.role(v).in_ids = x.ids
    return Channels(1, ids)


def group_norm(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """GroupNorm's statistics are per group: its groups of channels go whole (the group size is kept)."""
    x = inputs[0]
    if not isinstance(x, Channels):
        return None
    if x.axis != 1:
        a.block(x, f"{v.name}: GroupNorm normalizes another axis than the channels")
        return None
    for row in x.ids.reshape(cast(nn.GroupNorm, v.module).num_groups, -1):
        a.uf.union(np.repeat(row[:1], len(row) - 1), row[1:])
    a.role(v).in_ids = x.ids
    return x


def linear(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """A linear layer over the channels slices its input side; one over another axis (an MLP-Mixer's
    token mixing) leaves the channels where they are, and its own outputs are not pruned."""
    x = inputs[0]
    if isinstance(x, Channels):
        if x.axis != rank_of(a.values[v.args[0].name]) - 1:
            return x
        a.role(v).in_ids = x.ids
    ids = a.produce(v, cast(nn.Linear, v.module).out_features)
    a.role(v).out_ids = ids
    return Channels(rank_of(out) - 1, ids)


def per_channel_module(axis_from_end: int | None):
    """BatchNorm (axis 1) or LayerNorm over the last axis: weights sliced with the channels."""

    def rule(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
        x = inputs[0]
        if not isinstance(x, Channels):
            return None
        expected = 1 if axis_from_end is None else rank_of(out) - axis_from_end
        if isinstance(v.module, nn.LayerNorm) and len(v.module.normalized_shape) != 1:
            expected = -1
        if x.axis != expected:
            a.block(x, f"{v.name}: {v.op} normalizes another axis than the channels")
            return None
        holds = any(True for _ in v.module.parameters()) or any(True for _ in v.module.buffers())
        if holds or isinstance(v.module, nn.LayerNorm):  # its normalized_shape follows, weights or not
            a.role(v).in_ids = x.ids
        return x

    return rule
