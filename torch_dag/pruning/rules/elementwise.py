"""Channel rules of ops that keep each position apart: element-wise ops (which tie the channels of
their operands) and pass-through ops; and how an untracked operand next to tracked channels is
handled (a layer scale or a position embedding is sliced with them)."""

from __future__ import annotations

from typing import Any

import torch

from ...core.dag import Vertex
from ...core.ops import Constant, Parameter
from ...core.template import Ref
from ..channels import Analysis, Channels, is_index_tensor, rank_of
from .shapes import kept_axis


def pass_through(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """An op that keeps each channel apart and where it is (a dropout, a pool): its input's channels go on."""
    return inputs[0] if inputs else None


def elementwise(a: Analysis, v: Vertex, inputs: list[Any], out: Any) -> Any:
    """Element-wise ops broadcast their operands: channels at the same output position are tied. With one
    tensor operand (an activation) its channels go on unchanged, as `pass_through` would pass them."""
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
        if info is None and not untracked_operand(a, v, arg, result, out.dim()):
            return None
    return result


def untracked_operand(a: Analysis, v: Vertex, arg: Any, result: Channels, out_rank: int) -> bool:
    """An operand without channel ids next to tracked ones: fine if it broadcasts over the channels,
    sliced with them if it is a Parameter/Constant spanning them (a layer scale, a class token, a
    position embedding); otherwise the channels are blocked. Returns False when blocked."""
    if not isinstance(arg, Ref) or not isinstance(a.values[arg.name], torch.Tensor):
        return True
    value = a.values[arg.name]
    position = result.axis - (out_rank - value.dim())
    if position < 0 or value.shape[position] == 1:
        return True
    source = held_tensor(a, arg.name, position) if value.shape[position] == len(result.ids) else None
    if source is not None:
        role = a.role(a.dag[source[0]])
        role.in_ids, role.axis = result.ids, source[1]
        return True
    a.block(result, f"{v.name}: {v.op} with {arg.name}, which spans the channels but is not tracked")
    return False


def held_tensor(a: Analysis, name: str, position: int) -> tuple[str, int] | None:
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
        moved = _source_axis(a, vertex, a.values[source.name], a.values[name], position)
        if moved is None:
            return None
        name, position = source.name, moved
    return None


def _source_axis(
    a: Analysis, v: Vertex, before: torch.Tensor, after: torch.Tensor, position: int
) -> int | None:
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
        return kept_axis(after.shape, before.shape, position) if spelled and sizes[position] == -1 else None
    if v.op == "getitem" and isinstance(v.args[1], Ref):  # table[index]: index's axes replace axis 0
        index = a.values.get(v.args[1].name)
        if is_index_tensor(index):
            return position - index.dim() + 1 if position >= index.dim() else None
    return None
