"""Channel rules of ops that act along one axis: reductions, softmax, roll, pad, and the ops that
regroup the channel axis itself (glu, channel and pixel shuffles)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...core.dag import Vertex
from ..channels import Analysis, Channels, Rule, call_arg, rank_of, tie_columns


def reduction(dim_index: int = 1) -> Rule:
    """A reduction over the axes its `dim` names (an int or any tuple / list, given by position or by
    keyword, with or without keepdim): the channels go on, moved past the dropped axes, unless their
    own axis is reduced (all axes when `dim` is None or empty), which blocks them. `dim_index`: the
    position of `dim` in the call (2 for `norm(x, p, dim)`)."""

    def rule(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
        x = inputs[0]
        if not isinstance(x, Channels):
            return None
        rank = rank_of(a.values[v.args[0].name])
        dims = call_arg(v, dim_index, "dim")
        dims = [dims] if isinstance(dims, int) else dims
        if not isinstance(dims, (list, tuple)) or not dims or not all(_is_axis(d) for d in dims):
            a.block(x, f"{v.name}: {v.op} over all or traced dimensions reduces the channel axis")
            return None
        dims = sorted({d % rank for d in dims})
        if x.axis in dims:
            a.block(x, f"{v.name}: {v.op} reduces the channel axis")
            return None
        keepdim = rank_of(out) == rank  # read from the result: keepdim may sit at any position
        return Channels(x.axis if keepdim else x.axis - sum(d < x.axis for d in dims), x.ids)

    return rule


def _is_axis(dim: Any) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool)


def across_channels(reason: str, dim_index: int, dim_name: str, default: Any = None) -> Rule:
    """Ops that keep every axis but mix values along one (softmax): fine unless that axis holds the
    channels, where removing a channel changes the others."""

    def rule(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
        x = inputs[0]
        if not isinstance(x, Channels):
            return None
        dim = call_arg(v, dim_index, dim_name, default)
        if not isinstance(dim, int) or dim % out.dim() == x.axis:
            a.block(x, f"{v.name}: {v.op} {reason}")
            return None
        return x

    return rule


def softmax_module(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """nn.Softmax / nn.LogSoftmax: fine unless they normalize over the channel axis."""
    x = inputs[0]
    if isinstance(x, Channels) and (v.module.dim is None or v.module.dim % out.dim() == x.axis):
        a.block(x, f"{v.name}: {v.op} normalizes over the channels")
        return None
    return x


def roll(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """torch.roll along other axes (Swin's shifted windows) keeps the channels where they are."""
    x = inputs[0]
    if not isinstance(x, Channels):
        return None
    dims = call_arg(v, 2, "dims")
    dims = [dims] if isinstance(dims, int) else dims
    if dims is None or not dims or any(not isinstance(d, int) or d % out.dim() == x.axis for d in dims):
        a.block(x, f"{v.name}: roll along the channel axis (or the flattened tensor)")
        return None
    return x


def pad(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """pad on other axes than the channels keeps them; padding the channel axis blocks them."""
    x = inputs[0]
    if not isinstance(x, Channels):
        return None
    widths = v.args[1]
    padded = out.dim() - x.axis - 1  # the pad list starts at the last axis, two numbers per axis
    if len(widths) > 2 * padded and any(widths[2 * padded : 2 * padded + 2]):
        a.block(x, f"{v.name}: pads the channel axis")
        return None
    return x


def glu(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """glu halves its axis into value and gate: along the channels, the halves are tied."""
    x = inputs[0]
    if not isinstance(x, Channels):
        return None
    if call_arg(v, 1, "dim", -1) % out.dim() != x.axis:
        return x
    table = x.ids.reshape(2, -1)
    tie_columns(a, table)
    return Channels(x.axis, table[0])


def channel_shuffle(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """ShuffleNet's shuffle interleaves the groups: each group keeps the same positions, as in a grouped conv."""
    x = inputs[0]
    if not isinstance(x, Channels) or x.axis != 1:
        a.block(x, f"{v.name}: channel_shuffle of channels off axis 1")
        return None
    table = x.ids.reshape(call_arg(v, 1, "groups"), -1)
    tie_columns(a, table)
    return Channels(1, table.T.reshape(-1))


def pixel_shuffle(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """pixel_shuffle turns r*r channels into one, pixel_unshuffle one channel into r*r."""
    x = inputs[0]
    if not isinstance(x, Channels) or x.axis != out.dim() - 3:
        a.block(x, f"{v.name}: {v.op} of channels off the channel axis")
        return None
    unshuffle = v.op in ("pixel_unshuffle", "PixelUnshuffle")
    factor = call_arg(v, 1, "downscale_factor" if unshuffle else "upscale_factor") ** 2
    if unshuffle:
        return Channels(x.axis, np.repeat(x.ids, factor))
    blocks = x.ids.reshape(-1, factor)
    a.uf.union(np.repeat(blocks[:, 0], factor - 1), blocks[:, 1:].reshape(-1))
    return Channels(x.axis, blocks[:, 0])
