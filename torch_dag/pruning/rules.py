"""One channel rule per op: how the channel ids of a vertex's inputs reach its output, which ids it
ties, what it must slice or rewrite. `RULES` maps op names to rules; an op without one blocks the
channels that reach it."""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.dag import Vertex
from ..core.ops import Constant, Parameter
from ..core.template import Ref
from .channels import (
    Analysis,
    Channels,
    Count,
    Rule,
    ShapeOf,
    call_arg,
    kept_count,
    numbers,
    rank_of,
)


def _conv(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    module: nn.Conv2d = v.module
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
    _tie_columns(a, ids.reshape(groups, -1))
    if tracked:
        _tie_columns(a, x.ids.reshape(groups, -1))
        a.role(v).in_ids = x.ids
    return Channels(1, ids)


def _tie_columns(a: Analysis, table: np.ndarray) -> None:
    """Union the ids of each column of `table` (one row per group)."""
    for row in table[1:]:
        a.uf.union(table[0], row)


def _group_norm(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """GroupNorm's statistics are per group: its groups of channels go whole (the group size is kept)."""
    x = inputs[0]
    if not isinstance(x, Channels):
        return None
    if x.axis != 1:
        a.block(x, f"{v.name}: GroupNorm normalizes another axis than the channels")
        return None
    for row in x.ids.reshape(v.module.num_groups, -1):
        a.uf.union(np.repeat(row[:1], len(row) - 1), row[1:])
    a.role(v).in_ids = x.ids
    return x


def _linear(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """A linear layer over the channels slices its input side; one over another axis (an MLP-Mixer's
    token mixing) leaves the channels where they are, and its own outputs are not pruned."""
    x = inputs[0]
    if isinstance(x, Channels):
        if x.axis != rank_of(a.values[v.args[0].name]) - 1:
            return x
        a.role(v).in_ids = x.ids
    ids = a.produce(v, v.module.out_features)
    a.role(v).out_ids = ids
    return Channels(rank_of(out) - 1, ids)


def _pass_through(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    return inputs[0] if inputs else None


def _per_channel_module(axis_from_end: int | None):
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
        if any(True for _ in v.module.parameters()) or any(True for _ in v.module.buffers()):
            a.role(v).in_ids = x.ids
        return x

    return rule


def _elementwise(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """Broadcasting binary ops: operands' channels at the same output position are tied."""
    if not isinstance(out, torch.Tensor):
        a.block(inputs, f"{v.name}: {v.op} of non-tensors")
        return None
    result: Channels | None = None
    for arg, info in zip(v.args, inputs):
        if not isinstance(info, Channels):
            continue
        axis = info.axis + out.dim() - rank_of(a.values[arg.name])
        if result is None:
            result = Channels(axis, info.ids)
        elif result.axis != axis:
            a.block([result, info], f"{v.name}: {v.op} mixes channels of different axes")
            return None
        else:
            a.uf.union(result.ids, info.ids)
    if result is None:
        return None
    for arg, info in zip(v.args, inputs):
        if info is None and not _untracked_operand(a, v, arg, result, out.dim()):
            return None
    return result


def _untracked_operand(a: Analysis, v: Vertex, arg: Any, result: Channels, out_rank: int) -> bool:
    """An operand without channel ids next to tracked ones: fine if it broadcasts over the channels,
    sliced with them if it is a Parameter/Constant spanning them (a layer scale, a class token, a
    position embedding); otherwise the channels are blocked. Returns False when blocked."""
    if not isinstance(arg, Ref) or not isinstance(a.values[arg.name], torch.Tensor):
        return True
    value = a.values[arg.name]
    position = result.axis - (out_rank - value.dim())
    if position < 0 or value.shape[position] == 1:
        return True
    source = _held_tensor(a, arg.name, position) if value.shape[position] == len(result.ids) else None
    if source is not None:
        role = a.role(a.dag[source[0]])
        role.in_ids, role.axis = result.ids, source[1]
        return True
    a.block(result, f"{v.name}: {v.op} with {arg.name}, which spans the channels but is not tracked")
    return False


def _held_tensor(a: Analysis, name: str, position: int) -> tuple[str, int] | None:
    """The Parameter / Constant vertex behind `name` and the axis of it that lands on `position`,
    looking through ops that move that axis whole: `expand` (a class token broadcast over the batch),
    reshapes with -1 there (ConvNeXt's `gamma.reshape(1, -1, 1, 1)`), permutes, unsqueezes and a
    lookup table indexed along another axis (Swin's relative position bias, one column per head)."""
    while name in a.dag:
        vertex = a.dag[name]
        if isinstance(vertex.module, (Parameter, Constant)):
            return name, position
        source = vertex.args[0] if vertex.args else None
        if not isinstance(source, Ref) or not isinstance(a.values.get(source.name), torch.Tensor):
            return None
        position = _source_axis(a, vertex, a.values[source.name], a.values[name], position)
        if position is None:
            return None
        name = source.name
    return None


def _source_axis(a: Analysis, v: Vertex, before: torch.Tensor, after: torch.Tensor, position: int) -> int | None:
    """The axis of `v`'s input that becomes axis `position` of its output whole, if it does."""
    if v.op in ("contiguous", "clone", "to", "detach"):
        return position
    if v.op == "permute":
        return v.args[1][position] % before.dim()
    if v.op == "transpose":
        d0, d1 = (d % before.dim() for d in v.args[1:3])
        return {d0: d1, d1: d0}.get(position, position)
    if v.op == "unsqueeze":
        dim = v.args[1] % after.dim()
        return None if position == dim else position - (position > dim)
    if v.op == "expand":
        sizes = v.args[1] if len(v.args) == 2 and isinstance(v.args[1], (list, tuple)) else v.args[1:]
        offset = after.dim() - before.dim()
        spelled = isinstance(sizes, (list, tuple)) and len(sizes) == after.dim()
        return position - offset if spelled and position >= offset and sizes[position] == -1 else None
    if v.op == "reshape":
        sizes = v.args[1]
        spelled = isinstance(sizes, (list, tuple)) and len(sizes) == after.dim()
        return _kept_axis(after.shape, before.shape, position) if spelled and sizes[position] == -1 else None
    if v.op == "getitem" and isinstance(v.args[1], Ref):  # table[index]: index's axes replace axis 0
        index = a.values.get(v.args[1].name)
        if _is_index_tensor(index):
            return position - index.dim() + 1 if position >= index.dim() else None
    return None


def _flatten_rule(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    x = inputs[0]
    if not isinstance(x, Channels):
        return None
    value = a.values[v.args[0].name]
    start, end = (d % value.dim() for d in v.args[1:3])
    if x.axis < start:
        return x
    if x.axis > end:
        return Channels(x.axis - (end - start), x.ids)
    inner = int(np.prod(value.shape[x.axis + 1: end + 1]))
    outer = int(np.prod(value.shape[start: x.axis]))
    ids = np.tile(np.repeat(x.ids, inner), outer)
    return Channels(start, ids)


def _cat(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """Along the channel axis: ids laid end to end. Along another axis: the operands' channels tied."""
    dim = v.args[1] % out.dim()
    tensors, infos = _parts(a, v, inputs)
    if infos is None:
        return None
    tracked = [info for info in infos if isinstance(info, Channels)]
    if not tracked:
        return None
    if any(info.axis != tracked[0].axis for info in tracked):
        a.block(tracked, f"{v.name}: concatenated tensors have their channels on different axes")
        return None
    if tracked[0].axis != dim:
        result = Channels(tracked[0].axis, tracked[0].ids)
        for info in tracked[1:]:
            a.uf.union(result.ids, info.ids)
        for ref, info in zip(tensors, infos):
            if info is None and not _untracked_operand(a, v, ref, result, out.dim()):
                return None
        return result
    parts = []
    for ref, info in zip(tensors, infos):
        if isinstance(info, Channels):
            parts.append(info.ids)
        else:  # a part without ids (an input, a constant): its channels exist but cannot be removed
            fresh = a.uf.make(a.values[ref.name].shape[dim] if isinstance(ref, Ref) else 0)
            a.block(Channels(dim, fresh), f"{v.name}: concatenated part without tracked channels")
            parts.append(fresh)
    return Channels(dim, np.concatenate(parts))


def _getitem(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """`parts[i]` of a split picks that part's channels; `x[:, 0]`, `x[..., 1:]`, `x[:, None]` keep the
    channels (moved to their new axis) when the channel axis itself is taken whole; anything else
    that touches the channel axis blocks it."""
    x, index = inputs[0], v.args[1]
    if isinstance(x, (list, tuple)):
        return x[index] if isinstance(index, int) and -len(x) <= index < len(x) else None
    if not isinstance(x, Channels):
        return None
    value = a.values[v.args[0].name]
    if not isinstance(value, torch.Tensor):
        return None
    if isinstance(index, Ref) and _is_index_tensor(a.values.get(index.name)) and x.axis > 0:
        return Channels(x.axis - 1 + a.values[index.name].dim(), x.ids)  # table[index] looks rows up
    index = index if isinstance(index, tuple) else (index,)
    if sum(item is Ellipsis for item in index) > 1 or any(
            isinstance(item, (torch.Tensor, list, bool)) or (isinstance(item, Ref) and not _is_int(a, item))
            for item in index):
        a.block(x, f"{v.name}: advanced indexing of a tensor with tracked channels")
        return None
    consumed = sum(1 for item in index if item is not None and item is not Ellipsis)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (value.dim() - consumed) + index[at + 1:]
    in_axis = out_axis = 0
    for position, item in enumerate(index):
        if item is None:
            out_axis += 1
            continue
        if in_axis == x.axis:
            if isinstance(item, slice) and item == slice(None):
                return Channels(out_axis, x.ids)
            if _plain_slice(item):
                return _channel_slice(a, v, x, index, position, out_axis)
            a.block(x, f"{v.name}: indexes into the channel axis")
            return None
        in_axis += 1
        if isinstance(item, slice):
            out_axis += 1
    return Channels(out_axis + (x.axis - in_axis), x.ids)  # the channel axis lies past the index


def _plain_slice(item: Any) -> bool:
    return (isinstance(item, slice) and item.step in (None, 1)
            and all(b is None or isinstance(b, int) for b in (item.start, item.stop)))


def _channel_slice(a: Analysis, v: Vertex, x: Channels, index: tuple, position: int, out_axis: int) -> Any:
    """`x[:, :n]` (GhostNet keeps the first n channels of a concat): the slice's channels go on, its
    bounds are rewritten to count the kept channels before them."""
    start, stop, _ = index[position].indices(len(x.ids))
    if stop <= start:
        a.block(x, f"{v.name}: an empty slice of the channel axis")
        return None

    def rewrite(keep: Callable[[np.ndarray], np.ndarray]) -> tuple:
        mask = keep(x.ids)
        bounds = slice(int(mask[:start].sum()), int(mask[:stop].sum()))
        return (v.args[0], index[:position] + (bounds,) + index[position + 1:], *v.args[2:])

    role = a.role(v)
    role.rewrite, role.parts = rewrite, [x.ids[start:stop]]
    return Channels(out_axis, x.ids[start:stop])


def _is_index_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool


def _is_int(a: Analysis, ref: Ref) -> bool:
    return isinstance(a.values.get(ref.name), int)


def _split(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """split / chunk / unbind along another axis than the channels: every part keeps them (unbind
    drops its axis). Along the channel axis, equal parts tie their channels position by position (a
    GLU's gate and value, SwiGLU) so they stay equal; `split` into given sizes (MixNet's kernel
    groups) gives each part its own channels and the sizes are rewritten to the kept counts."""
    x = inputs[0]
    if not isinstance(x, Channels):
        return None
    rank = rank_of(a.values[v.args[0].name])
    dim = call_arg(v, 2, "dim", 0) if v.op in ("split", "chunk") else call_arg(v, 1, "dim", 0)
    if not isinstance(dim, int):
        a.block(x, f"{v.name}: {v.op} along a traced dimension")
        return None
    dim %= rank
    if dim != x.axis:
        axis = x.axis - 1 if v.op == "unbind" and dim < x.axis else x.axis
        return tuple(Channels(axis, x.ids) for _ in out)
    if v.op == "unbind":
        a.block(x, f"{v.name}: unbind along the channel axis")
        return None
    sizes = [part.shape[dim] for part in out]
    if v.op == "chunk" and len(set(sizes)) > 1:
        a.block(x, f"{v.name}: chunk along the channel axis into unequal parts")
        return None
    if len(v.args) < 2:
        a.block(x, f"{v.name}: {v.op} along the channel axis with its sizes given by keyword")
        return None
    size = v.args[1]
    if v.op == "chunk" or isinstance(size, int):
        if len(set(sizes)) > 1:
            a.block(x, f"{v.name}: split along the channel axis leaves a shorter last part")
            return None
        table = x.ids.reshape(len(sizes), -1)
        _tie_columns(a, table)
        if v.op == "split":  # the part size is spelled out: it becomes the kept count
            a.role(v).rewrite = lambda keep: (v.args[0], kept_count(keep, table[0]), *v.args[2:])
        return tuple(Channels(x.axis, row) for row in table)
    if not isinstance(size, (list, tuple)) or not all(isinstance(s, int) for s in size):
        a.block(x, f"{v.name}: split along the channel axis into traced sizes")
        return None
    bounds = np.cumsum([0, *sizes])
    parts = [x.ids[lo:hi] for lo, hi in pairwise(bounds)]
    role = a.role(v)
    role.parts = parts
    role.rewrite = lambda keep: (v.args[0], [kept_count(keep, p) for p in parts], *v.args[2:])
    return tuple(Channels(x.axis, p) for p in parts)


def _parts(a: Analysis, v: Vertex, inputs: list[Any]) -> tuple[list, list | None]:
    """The operands of cat / stack and their channel infos: a literal list of tensors, or the tuple a
    split / unbind made (all its parts then carry infos, or the channels are blocked)."""
    tensors = v.args[0]
    if isinstance(tensors, (list, tuple)):
        infos = list(inputs[0]) if isinstance(inputs[0], (list, tuple)) else [None] * len(tensors)
        return list(tensors), infos
    if isinstance(inputs[0], (list, tuple)) and all(isinstance(i, Channels) for i in inputs[0]):
        return [None] * len(inputs[0]), list(inputs[0])
    a.block(inputs, f"{v.name}: {v.op} of a list built elsewhere")
    return [], None


def _stack(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """Stacked tensors' channels are tied, on their axis shifted past the new one."""
    dim = (v.args[1] if len(v.args) > 1 else 0) % out.dim()
    tensors, infos = _parts(a, v, inputs)
    if infos is None:
        return None
    tracked = [info for info in infos if isinstance(info, Channels)]
    if not tracked:
        return None
    if any(info.axis != tracked[0].axis for info in tracked):
        a.block(tracked, f"{v.name}: stacked tensors have their channels on different axes")
        return None
    axis = tracked[0].axis + (tracked[0].axis >= dim)
    result = Channels(axis, tracked[0].ids)
    for info in tracked[1:]:
        a.uf.union(result.ids, info.ids)
    unstacked = Channels(tracked[0].axis, result.ids)  # where the channels lie in each operand
    for ref, info in zip(tensors, infos):
        if info is None and not _untracked_operand(a, v, ref, unstacked, out.dim() - 1):
            return None
    return result


def _mean_sum(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    x = inputs[0]
    if not isinstance(x, Channels):
        return None
    rank = rank_of(a.values[v.args[0].name])
    dims = v.args[1] if len(v.args) > 1 else None
    keepdim = v.args[2] if len(v.args) > 2 else False
    dims = [dims] if isinstance(dims, int) else dims
    if dims is None or any(not isinstance(d, int) for d in dims):
        a.block(x, f"{v.name}: {v.op} over all or traced dimensions")
        return None
    dims = sorted(d % rank for d in dims)
    if x.axis in dims:
        a.block(x, f"{v.name}: {v.op} reduces the channel axis")
        return None
    return Channels(x.axis if keepdim else x.axis - sum(d < x.axis for d in dims), x.ids)


def _permute(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
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


def _reshape(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
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
    axis = _kept_axis(before, after, x.axis)
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
        result = _split_axis(a, x, before, after) or _merged_axis(x, before, after)
        if result is None or 0 in result[2]:  # sizes there would be spelled out for one batch size
            a.block([x, *counts], f"{v.name}: reshape mixes the channel axis with others unevenly")
            return None
        channels, resized, spanned = result
    a.block([c for i, c in enumerate(info) if i not in spanned and i != axis and numbers(c)],
            f"{v.name}: a channel count sizes another axis")
    if spanned:
        a.role(v).rewrite = lambda keep: (v.args[0], _resized(shape, after, resized, spanned, keep), *v.args[2:])
    return channels


def _resized(shape: list | tuple, after: torch.Size, resized: dict[int, np.ndarray], spanned: range,
             keep: Callable[[np.ndarray], np.ndarray]) -> list | tuple:
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


def _kept_axis(before: torch.Size, after: torch.Size, axis: int) -> int | None:
    """The axis of `after` that holds `before`'s axis whole, with the same elements before and after it."""
    leading = math.prod(before[:axis])
    for candidate in range(len(after)):
        if math.prod(after[:candidate]) == leading and after[candidate] == before[axis]:
            return candidate
    return None


def _split_axis(a: Analysis, x: Channels, before: torch.Size, after: torch.Size
                ) -> tuple[Channels, dict[int, np.ndarray], range] | None:
    """The channel axis split into consecutive axes `after[first:last]`: the one before the last part
    carries the channels (heads), whose entries are tied whole; with `attention="head_dim"` the last
    part does (a position of the head dim, tied over every head). Returns the channels, for that
    axis the ids whose kept count is its new size, and the axes of `after` the channels span."""
    leading = math.prod(before[:x.axis])
    for first in range(len(after)):
        if math.prod(after[:first]) != leading:
            continue
        last, size = first, 1
        while last < len(after) and size < before[x.axis]:
            size *= after[last]
            last += 1
        if size != before[x.axis] or last - first < 2:
            return None
        head = last - 2 if a.attention == "heads" else last - 1  # or the same positions of every head
        table = np.moveaxis(x.ids.reshape(after[first:last]), head - first, 0).reshape(after[head], -1)
        a.uf.union(np.repeat(table[:, 0], table.shape[1] - 1), table[:, 1:].reshape(-1))
        return Channels(head, table[:, 0]), {head: table[:, 0]}, range(first, last)
    return None


def _merged_axis(x: Channels, before: torch.Size, after: torch.Size
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
                inner = math.prod(before[x.axis + 1:last])
                outer = math.prod(before[first:x.axis])
                ids = np.tile(np.repeat(x.ids, inner), outer)
                return Channels(target, ids), {target: ids}, range(target, target + 1)
    return None


def _attention(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """scaled_dot_product_attention over heads carried as channels (on a batch axis of q, k and v):
    a head goes from all three at once. Channels of the head dim: v's go to the output, q's and k's
    (contracted) are tied and the call keeps the scale it had (the default is 1/sqrt(head dim))."""
    q, k, value = inputs[:3]
    ranks = [rank_of(a.values[r.name]) for r in v.args[:3]]
    mask = call_arg(v, 3, "attn_mask")
    mask_info = a.info.get(mask.name) if isinstance(mask, Ref) else None
    tracked = [(info, rank) for info, rank in zip((q, k, value), ranks) if isinstance(info, Channels)]
    if not tracked:
        a.block(mask_info, f"{v.name}: an attention mask with channels, on untracked q, k, v")
        return None
    batch = {(info.axis - rank) for info, rank in tracked if info.axis < rank - 2}
    if len(batch) == 1 and len(tracked) == 3 and all(info.axis < rank - 2 for info, rank in tracked):
        for info, _ in tracked[1:]:
            a.uf.union(tracked[0][0].ids, info.ids)
        a.role(v).flop_shares = [(1.0, q.ids)]  # both products run once per head
        offset = next(iter(batch))
        # a bias per head (relative positions): its table is sliced, or its producer pruned, with the heads
        if isinstance(mask_info, Channels) and mask_info.axis - a.values[mask.name].dim() == offset:
            a.uf.union(q.ids, mask_info.ids)
        elif mask_info is not None:
            a.block([q, mask_info], f"{v.name}: an attention mask with channels on another axis than the heads")
            return None
        elif isinstance(mask, Ref) and not _untracked_operand(a, v, mask, Channels(ranks[0] + offset, q.ids),
                                                            ranks[0]):
            return None
        return Channels(out.dim() + offset, value.ids)
    last = [info.axis == rank - 1 for info, rank in zip((q, k, value), ranks) if isinstance(info, Channels)]
    if all(last) and isinstance(q, Channels) == isinstance(k, Channels):
        a.block(mask_info, f"{v.name}: an attention mask with channels while the head dim is pruned")
        qk_dim, v_dim = a.values[v.args[0].name].shape[-1], a.values[v.args[2].name].shape[-1]
        if isinstance(q, Channels):  # the head dim q and k contract: pruned in both, the scale kept
            a.uf.union(q.ids, k.ids)
            if call_arg(v, 6, "scale") is None:
                a.role(v).keywords = {"scale": qk_dim ** -0.5}
            a.role(v).flop_shares.append((qk_dim / (qk_dim + v_dim), q.ids))  # q k^T over the head dim
        if isinstance(value, Channels):
            a.role(v).flop_shares.append((v_dim / (qk_dim + v_dim), value.ids))  # the weights times v
        return Channels(out.dim() - 1, value.ids) if isinstance(value, Channels) else None
    a.block([q, k, value, mask_info], f"{v.name}: attention with channels on axes it contracts or on some "
            "operands only")
    return None


def _matmul(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """x @ y: channels on broadcast (batch) axes are tied across the operands and stay; the rows of x
    and the columns of y go to the output; on the contracted axis both operands' are tied."""
    ranks = [rank_of(a.values[r.name]) if isinstance(r, Ref) else 0 for r in v.args[:2]]
    if min(ranks) < 2:
        a.block(inputs, f"{v.name}: matmul with a vector")
        return None
    left, right = inputs[:2]
    batch = [(info, info.axis - rank) for info, rank in zip((left, right), ranks)
             if isinstance(info, Channels) and info.axis < rank - 2]
    if batch:
        if len(batch) != sum(isinstance(i, Channels) for i in (left, right)) or len({off for _, off in batch}) > 1:
            a.block([left, right], f"{v.name}: matmul with channels on different axes of its operands")
            return None
        channels, offset = batch[0]
        for info, _ in batch[1:]:
            a.uf.union(channels.ids, info.ids)
        for info, ref, rank in zip((left, right), v.args[:2], ranks):
            if info is None and rank >= -offset and a.values[ref.name].shape[offset] != 1:
                a.block(channels, f"{v.name}: matmul with {ref.name}, which spans the channels but is not tracked")
                return None
        a.role(v).flop_shares = [(1.0, channels.ids)]  # one product per head
        return Channels(out.dim() + offset, channels.ids)
    if isinstance(left, Channels) and left.axis == ranks[0] - 2 and not isinstance(right, Channels):
        a.role(v).flop_shares = [(1.0, left.ids)]
        return Channels(out.dim() - 2, left.ids)
    if isinstance(right, Channels) and right.axis == ranks[1] - 1 and not isinstance(left, Channels):
        a.role(v).flop_shares = [(1.0, right.ids)]
        return Channels(out.dim() - 1, right.ids)
    if isinstance(left, Channels) and isinstance(right, Channels) and left.axis == ranks[0] - 1 \
            and right.axis == ranks[1] - 2:  # q @ k.T over the head dim: a position goes from both
        a.uf.union(left.ids, right.ids)
        a.role(v).flop_shares = [(1.0, left.ids)]  # handled: nothing of its own to slice
        return None
    a.block([left, right], f"{v.name}: matmul contracts the channel axis with an untracked operand")
    return None


def _expand(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
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


def _unsqueeze(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
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


def _across_channels(reason: str, dim_index: int, dim_name: str, default: Any = None) -> Rule:
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


def _softmax_module(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    x = inputs[0]
    if isinstance(x, Channels) and (v.module.dim is None or v.module.dim % out.dim() == x.axis):
        a.block(x, f"{v.name}: {v.op} normalizes over the channels")
        return None
    return x


def _roll(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
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


def _pad(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    x = inputs[0]
    if not isinstance(x, Channels):
        return None
    widths = v.args[1]
    padded = out.dim() - x.axis - 1  # the pad list starts at the last axis, two numbers per axis
    if len(widths) > 2 * padded and any(widths[2 * padded: 2 * padded + 2]):
        a.block(x, f"{v.name}: pads the channel axis")
        return None
    return x


def _glu(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """glu halves its axis into value and gate: along the channels, the halves are tied."""
    x = inputs[0]
    if not isinstance(x, Channels):
        return None
    if call_arg(v, 1, "dim", -1) % out.dim() != x.axis:
        return x
    table = x.ids.reshape(2, -1)
    _tie_columns(a, table)
    return Channels(x.axis, table[0])


def _channel_shuffle(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """ShuffleNet's shuffle interleaves the groups: each group keeps the same positions, as in a grouped conv."""
    x = inputs[0]
    if not isinstance(x, Channels) or x.axis != 1:
        a.block(x, f"{v.name}: channel_shuffle of channels off axis 1")
        return None
    table = x.ids.reshape(call_arg(v, 1, "groups"), -1)
    _tie_columns(a, table)
    return Channels(1, table.T.reshape(-1))


def _pixel_shuffle(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
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


RULES: dict[str, Rule] = {
    "Conv1d": _conv, "Conv2d": _conv, "Conv3d": _conv, "WSConv2d": _conv, "Linear": _linear,
    "BatchNorm1d": _per_channel_module(None), "BatchNorm2d": _per_channel_module(None),
    "BatchNorm3d": _per_channel_module(None), "LayerNorm": _per_channel_module(1), "GroupNorm": _group_norm,
    "add": _elementwise, "sub": _elementwise, "mul": _elementwise, "div": _elementwise,
    "flatten": _flatten_rule, "cat": _cat, "mean": _mean_sum, "sum": _mean_sum,
    "permute": _permute, "transpose": _permute, "getitem": _getitem,
    "split": _split, "chunk": _split, "unbind": _split, "stack": _stack, "amax": _mean_sum, "amin": _mean_sum,
    "roll": _roll, "reshape": _reshape, "view_as": _reshape, "scaled_dot_product_attention": _attention, "matmul": _matmul, "expand": _expand, "expand_as": _expand,
    "unsqueeze": _unsqueeze, "squeeze": _unsqueeze, "pad": _pad, "glu": _glu,
    "softmax": _across_channels("normalizes over the channels", 1, "dim"),
    "log_softmax": _across_channels("normalizes over the channels", 1, "dim"),
    "Softmax": _softmax_module, "LogSoftmax": _softmax_module, "channel_shuffle": _channel_shuffle,
    "GLU": _glu, "ChannelShuffle": _channel_shuffle, "PixelShuffle": _pixel_shuffle, "PixelUnshuffle": _pixel_shuffle, "pixel_shuffle": _pixel_shuffle, "pixel_unshuffle": _pixel_shuffle,
}
for _op in ("ReLU", "ReLU6", "LeakyReLU", "ELU", "CELU", "SELU", "GELU", "SiLU", "Mish", "Sigmoid", "Tanh",
            "Hardswish", "Hardsigmoid", "Hardtanh", "Softplus", "Identity", "Dropout", "Dropout1d", "Dropout2d",
            "Dropout3d", "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
            "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool2d", "contiguous",
            "clone", "relu", "sigmoid", "gelu", "silu", "hardswish", "hardsigmoid", "tanh", "to", "type_as",
            "detach", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "interpolate",
            "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
            "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
            "adaptive_max_pool2d", "lp_pool2d", "AdaptiveMaxPool3d", "AlphaDropout", "Hardshrink", "LogSigmoid",
            "Softshrink", "Softsign", "Tanhshrink", "Threshold", "LPPool1d", "LPPool2d"):
    RULES[_op] = _pass_through
# element-wise: one value per position, operands (tensors or numbers) broadcast against each other
for _op in ("pow", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "sin", "cos", "erf",
            "erfc", "erfinv", "floor", "ceil", "round", "trunc", "frac", "sign", "reciprocal", "square", "abs",
            "neg", "sinh", "cosh", "tan", "atan", "logit", "nan_to_num", "clamp", "clamp_min", "clamp_max",
            "maximum", "minimum", "atan2", "fmod", "remainder", "floor_divide", "rsub", "lerp", "where",
            "masked_fill", "addcmul", "addcdiv", "eq", "ne", "gt", "ge", "lt", "le", "logical_not",
            "logical_and", "logical_or", "logical_xor", "relu6", "elu", "celu", "selu", "leaky_relu", "hardtanh",
            "mish", "softplus", "logsigmoid", "softsign", "tanhshrink", "hardshrink", "softshrink", "threshold"):
    RULES[_op] = _elementwise
HARMLESS = frozenset({"dim", "dtype_of", "device_of"})  # facts that pruning does not change


def shape_query(a: Analysis, v: Vertex, inputs: list[Any]) -> Any:
    """`x.shape`, `x.size(d)`, `shape[i]`, `x.numel()`: a channel count read as a number becomes a
    `Count`, which only reshapes and expands may use; other entries are free; a slice of a shape
    over the channels and the element count block them."""
    x = inputs[0]
    if v.op == "size":
        dim = v.args[1] if len(v.args) > 1 else None
        if isinstance(x, Channels) and dim is None:
            return ShapeOf(x)
        if isinstance(x, Channels) and isinstance(dim, int) and dim % rank_of(a.values[v.args[0].name]) == x.axis:
            return Count(x)
        return None
    if v.op == "numel":
        a.block(x, f"{v.name}: reads the element count")
        return None
    if v.op == "getitem" and isinstance(x, ShapeOf):
        index, rank = v.args[1], len(a.values[v.args[0].name])
        if isinstance(index, int) and index % rank == x.channels.axis:
            return Count(x.channels)
        covered = range(rank)[index] if isinstance(index, slice) else [index % rank] if isinstance(index, int) else None
        if covered is None or x.channels.axis in covered:
            a.block(x, f"{v.name}: reads the channel count from a shape")
        return None
    return NOT_A_QUERY


NOT_A_QUERY = object()
SIZED_BY_COUNTS = frozenset({"reshape", "expand"})  # rules that check the counts they are given
ATTENTION = "scaled_dot_product_attention"
ARITHMETIC = frozenset({"add", "sub", "mul", "div", "floor_divide", "remainder", "pow", "neg", "rsub"})
