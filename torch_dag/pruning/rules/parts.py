"""Channel rules of ops that take parts of tensors or put parts together: indexing, split / chunk /
unbind, cat, stack."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

import numpy as np
import torch

from ...core.dag import Vertex
from ...core.template import Ref
from ..channels import Analysis, Channels, call_arg, is_index_tensor, kept_count, rank_of, tie_columns
from .elementwise import untracked_operand


def getitem(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
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
    if isinstance(index, Ref) and is_index_tensor(a.values.get(index.name)) and x.axis > 0:
        return Channels(x.axis - 1 + a.values[index.name].dim(), x.ids)  # table[index] looks rows up
    index = index if isinstance(index, tuple) else (index,)
    if sum(item is Ellipsis for item in index) > 1 or any(
        isinstance(item, (torch.Tensor, list, bool)) or (isinstance(item, Ref) and not _is_int(a, item))
        for item in index
    ):
        a.block(x, f"{v.name}: advanced indexing of a tensor with tracked channels")
        return None
    consumed = sum(1 for item in index if item is not None and item is not Ellipsis)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (value.dim() - consumed) + index[at + 1 :]
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
    """A slice with step 1 and int (or open) bounds."""
    return (
        isinstance(item, slice)
        and item.step in (None, 1)
        and all(b is None or isinstance(b, int) for b in (item.start, item.stop))
    )


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
        return (v.args[0], index[:position] + (bounds,) + index[position + 1 :], *v.args[2:])

    role = a.role(v)
    role.rewrite, role.parts = rewrite, [x.ids[start:stop]]
    return Channels(out_axis, x.ids[start:stop])


def _is_int(a: Analysis, ref: Ref) -> bool:
    """Whether the traced value behind `ref` is a Python int (a position, not an index tensor)."""
    return isinstance(a.values.get(ref.name), int)


def split(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """split / chunk / tensor_split / unbind along another axis than the channels: every part keeps
    them (unbind drops its axis). Along the channel axis, equal parts tie their channels position by
    position (a GLU's gate and value, SwiGLU) so they stay equal; `split` into given sizes (MixNet's
    kernel groups) gives each part its own channels and the sizes are rewritten to the kept counts;
    `tensor_split` into a number of sections is a chunk (at given indices it is blocked)."""
    x = inputs[0]
    if not isinstance(x, Channels):
        return None
    rank = rank_of(a.values[v.args[0].name])
    chunks = v.op in ("chunk", "tensor_split")  # a number of parts, not their sizes
    dim = call_arg(v, 1, "dim", 0) if v.op == "unbind" else call_arg(v, 2, "dim", 0)
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
    if chunks and len(set(sizes)) > 1:
        a.block(x, f"{v.name}: {v.op} along the channel axis into unequal parts")
        return None
    if len(v.args) < 2:
        a.block(x, f"{v.name}: {v.op} along the channel axis with its sizes given by keyword")
        return None
    size = v.args[1]
    if v.op == "tensor_split" and not isinstance(size, int):
        a.block(x, f"{v.name}: tensor_split along the channel axis at given indices")
        return None
    if chunks or isinstance(size, int):
        if len(set(sizes)) > 1:
            a.block(x, f"{v.name}: split along the channel axis leaves a shorter last part")
            return None
        table = x.ids.reshape(len(sizes), -1)
        tie_columns(a, table)
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


def cat(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
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
            if info is None and not untracked_operand(a, v, ref, result, out.dim()):
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


def stack(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
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
        if info is None and not untracked_operand(a, v, ref, unstacked, out.dim() - 1):
            return None
    return result
