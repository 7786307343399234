"""Channel rules of ops that move, regroup or broadcast axes: flatten, permute / transpose, reshape /
view_as, expand / expand_as, unsqueeze / squeeze."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ...core.dag import Vertex
from ..channels import Analysis, Channels, Count, call_arg, kept_count, numbers, rank_of


def flatten(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """flatten over the channel axis: the ids repeat once per position of the axes after it."""
    x = inputs[0]
    if not isinstance(x, Channels):
        return None
    value = a.values[v.args[0].name]
    start, end = (d % value.dim() for d in v.args[1:3])
    if x.axis < start:
        return x
    if x.axis > end:
        return Channels(x.axis - (end - start), x.ids)
    inner = int(np.prod(value.shape[x.axis + 1 : end + 1]))
    outer = int(np.prod(value.shape[start : x.axis]))
    ids = np.tile(np.repeat(x.ids, inner), outer)
    return Channels(start, ids)


def permute(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """permute / transpose move the channel axis (ConvNeXt's channels-last blocks)."""
    x = inputs[0]
    if not isinstance(x, Channels):
        return None
    rank = out.dim()
    if v.op == "permute":
        dims = [d % rank for d in v.args[1]]
        return Channels(dims.index(x.axis), x.ids)
    d0, d1 = (d % rank for d in v.args[1:3])
    return Channels({d0: d1, d1: d0}.get(x.axis, x.axis), x.ids)


def reshape(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """reshape / view / view_as. Three cases for the channel axis:

    - kept whole (the axes around it regrouped): the channels go on, on their new axis; the count
      there must follow the pruning: `-1`, a count read from the same channels, a number (rewritten
      to the kept count), or (view_as) a tensor carrying them;
    - split into axes (`qkv.reshape(B, N, 3, heads, head_dim)`): the axis before the last part holds
      the channels from then on (attention heads) and each of its entries goes whole: the channels
      that land in one head, over all the other parts, are one class;
    - merged with its neighbours (`x.reshape(B, N, heads * head_dim)`): the ids repeat over the
      merged axes, as in a flatten.

    Sizes spelled out in the call for a split or merged axis are rewritten to the kept counts; a
    reshape that mixes the channels with the batch axis is blocked (its sizes hold the batch size)."""
    x = inputs[0]
    counts = numbers(inputs[1:])
    if not isinstance(x, Channels):
        a.block(counts, f"{v.name}: a channel count sizes a tensor without those channels")
        return None
    before, after = a.values[v.args[0].name].shape, out.shape
    axis = kept_axis(before, after, x.axis)
    if v.op == "view_as":
        other = inputs[1]
        if axis is None or not isinstance(other, Channels) or other.axis != axis:
            a.block(x, f"{v.name}: view_as a tensor whose channels are not these")
            return None
        a.uf.union(x.ids, other.ids)
        return Channels(axis, x.ids)
    shape, info = v.args[1], inputs[1]
    if not isinstance(shape, (list, tuple)) or len(shape) != len(after):
        a.block([x, *counts], f"{v.name}: reshape to a shape built elsewhere")
        return None
    if axis is not None:
        entry = info[axis]
        if isinstance(entry, Count) and entry.exact and len(entry.channels.ids) == len(x.ids):
            a.uf.union(entry.channels.ids, x.ids)
            resized, spanned = {}, range(0)
        elif shape[axis] == -1 or (isinstance(shape[axis], int) and axis > 0):
            resized, spanned = {axis: x.ids}, range(axis, axis + 1)
        else:
            a.block([x, *counts], f"{v.name}: reshape sizes the channel axis with a traced number")
            return None
        channels = Channels(axis, x.ids)
    else:
        result = _split_axis(a, v, x, before, after) or _merged_axis(x, before, after)
        if result is None or 0 in result[2]:  # sizes there would be spelled out for one batch size
            a.block([x, *counts], f"{v.name}: reshape mixes the channel axis with others unevenly")
            return None
        channels, resized, spanned = result
    a.block(
        [c for i, c in enumerate(info) if i not in spanned and i != axis and numbers(c)],
        f"{v.name}: a channel count sizes another axis",
    )
    if spanned:
        a.role(v).rewrite = lambda keep: (
            v.args[0],
            _resized(shape, after, resized, spanned, keep),
            *v.args[2:],
        )
    return channels


def _resized(
    shape: list | tuple,
    after: torch.Size,
    resized: dict[int, np.ndarray],
    spanned: range,
    keep: Callable[[np.ndarray], np.ndarray],
) -> list | tuple:
    """A reshape's sizes after pruning: where the channels lie, the kept count (or -1 for a traced
    size, when no other axis has it: spatial sizes may vary); on the other axes they span, the present
    size (`C // heads` read from a pruned tensor would be wrong)."""
    sizes = list(shape)
    for i in spanned:
        if sizes[i] == -1:
            continue
        if i in resized:
            traced = not isinstance(shape[i], int)
            sizes[i] = -1 if traced and -1 not in shape else kept_count(keep, resized[i])
        else:
            sizes[i] = after[i]
    return type(shape)(sizes)


def kept_axis(before: torch.Size, after: torch.Size, axis: int) -> int | None:
    """The axis of `after` that holds `before`'s axis whole, with the same elements before and after it."""
    leading = math.prod(before[:axis])
    for candidate in range(len(after)):
        if math.prod(after[:candidate]) == leading and after[candidate] == before[axis]:
            return candidate
    return None


def _split_axis(
    a: Analysis, v: Vertex, x: Channels, before: torch.Size, after: torch.Size
) -> tuple[Channels, dict[int, np.ndarray], range] | None:
    """The channel axis split into consecutive axes `after[first:last]`: the one before the last part
    carries the channels (heads), whose entries are tied whole; with `attention="head_dim"`, or in a
    grouped channel shuffle, the last part does (a position of the head dim or of a group, tied over
    every head or group). Returns the channels, for that axis the ids whose kept count is its new
    size, and the axes of `after` the channels span."""
    leading = math.prod(before[: x.axis])
    for first in range(len(after)):
        if math.prod(after[:first]) != leading:
            continue
        last, size = first, 1
        while last < len(after) and size < before[x.axis]:
            size *= after[last]
            last += 1
        if size != before[x.axis] or last - first < 2:
            return None
        positions = a.attention == "head_dim" or (last - first == 2 and _shuffled(a, v.name, first, before))
        head = last - 1 if positions else last - 2  # the same positions of every head, or whole heads
        table = np.moveaxis(x.ids.reshape(after[first:last]), head - first, 0).reshape(after[head], -1)
        a.uf.union(np.repeat(table[:, 0], table.shape[1] - 1), table[:, 1:].reshape(-1))
        return Channels(head, table[:, 0]), {head: table[:, 0]}, range(first, last)
    return None


def _shuffled(a: Analysis, name: str, first: int, before: torch.Size) -> bool:
    """Whether the split into (groups, channels per group) at axis `first` of vertex `name` is a
    grouped channel shuffle: its parts swapped (transpose / permute), then reshaped back to `before`
    (`x.view(b, g, c // g, h, w).transpose(1, 2).reshape(b, c, h, w)`, torchvision's channel_shuffle).
    Copies (contiguous, clone) may come between; each step must be the only reader."""
    swapped = False
    while True:
        users = a.successors.get(name, [])
        if len(users) != 1 or users[0] not in a.dag:
            return False
        user = a.dag[users[0]]
        value = a.values.get(user.name)
        if user.op in ("contiguous", "clone"):
            name = user.name
        elif not swapped and user.op in ("transpose", "permute"):
            rank = value.dim() if isinstance(value, torch.Tensor) else 0
            order = list(range(rank))
            order[first : first + 2] = [first + 1, first]
            dims = (
                [d % rank for d in user.args[1]]
                if user.op == "permute"
                else sorted(d % rank for d in user.args[1:3])
            )
            if dims != (order if user.op == "permute" else [first, first + 1]):
                return False
            swapped, name = True, user.name
        else:
            merged = user.op in ("reshape", "view_as", "flatten")
            return swapped and merged and isinstance(value, torch.Tensor) and value.shape == before


def _merged_axis(
    x: Channels, before: torch.Size, after: torch.Size
) -> tuple[Channels, dict[int, np.ndarray], range] | None:
    """The channel axis merged with neighbours `before[first:last]` into one axis of `after`: its ids
    repeat over them, the merged size is the kept count of those ids."""
    for first in range(x.axis + 1):
        leading = math.prod(before[:first])
        for target in range(len(after)):
            if math.prod(after[:target]) != leading:
                continue
            size, last = 1, first
            while last < len(before) and size < after[target]:
                size *= before[last]
                last += 1
            if size == after[target] and last > x.axis and last - first >= 2:
                inner = math.prod(before[x.axis + 1 : last])
                outer = math.prod(before[first : x.axis])
                ids = np.tile(np.repeat(x.ids, inner), outer)
                return Channels(target, ids), {target: ids}, range(target, target + 1)
    return None


def expand(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """expand / expand_as of a tensor with channels: they stay, the channel size given as -1 (or by a
    tensor carrying the same channels)."""
    x = inputs[0]
    if not isinstance(x, Channels):
        a.block(numbers(inputs[1:]), f"{v.name}: a channel count sizes a tensor without those channels")
        return None
    axis = x.axis + out.dim() - rank_of(a.values[v.args[0].name])
    if v.op == "expand_as":
        other = inputs[1]
        if isinstance(other, Channels) and other.axis == axis:
            a.uf.union(x.ids, other.ids)
            return Channels(axis, x.ids)
    else:
        sizes = v.args[1] if len(v.args) == 2 and isinstance(v.args[1], (list, tuple)) else v.args[1:]
        if sizes[axis] == -1 and not numbers(inputs[1:]):
            return Channels(axis, x.ids)
    a.block([x, *numbers(inputs[1:])], f"{v.name}: {v.op} spells the channel count out")
    return None


def unsqueeze(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """unsqueeze / squeeze move the channel axis by one; squeezing it away blocks the channels."""
    x = inputs[0]
    if not isinstance(x, Channels):
        return None
    if v.op == "unsqueeze":
        dim = v.args[1] % out.dim()
        return Channels(x.axis + (dim <= x.axis), x.ids)
    before = a.values[v.args[0].name].shape
    dim = call_arg(v, 1, "dim")
    dims = range(len(before)) if dim is None else [dim] if isinstance(dim, int) else dim
    dropped = {d % len(before) for d in dims if before[d] == 1}
    if x.axis in dropped:
        a.block(x, f"{v.name}: squeezes the channel axis away")
        return None
    return Channels(x.axis - sum(d < x.axis for d in dropped), x.ids)
