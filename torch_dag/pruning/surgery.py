"""Surgery: slice every affected vertex's tensors to the kept channels, with one helper driven by a
table of (tensor, axis, side) per op, never a copy of the same slicing code per layer type."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple, cast

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..core.dag import DagModule
from ..core.editor import Editor
from ..core.errors import UnknownOpError
from ..core.ops import op_name
from .channels import ChannelGroups, Role

# op -> [(tensor attribute, axis, side)], side "in" (input channels) or "out" (channels it produces)
SLICES: dict[str, list[tuple[str, int, str]]] = {
    "Conv": [("weight", 0, "out"), ("weight", 1, "in"), ("bias", 0, "out"), ("gain", 0, "out")],
    "Depthwise": [("weight", 0, "out"), ("bias", 0, "out"), ("gain", 0, "out")],
    "Grouped": [("weight", 0, "out"), ("weight", 1, "in_group"), ("bias", 0, "out"), ("gain", 0, "out")],
    "Linear": [("weight", 0, "out"), ("weight", 1, "in"), ("bias", 0, "out")],
    "Norm": [("weight", 0, "in"), ("bias", 0, "in"), ("running_mean", 0, "in"), ("running_var", 0, "in")],
}


# The functions below take the module of the op their LAYOUTS entry names, and the channel counts the
# tensors they read have (slice_module counts them: a conv or linear has both, a norm its input's)


def _conv_row(module: nn.Module) -> str:
    conv = cast(_ConvNd, module)
    if conv.groups == 1:
        return "Conv"
    return "Depthwise" if conv.groups == conv.in_channels else "Grouped"


def _conv_counts(module: nn.Module) -> tuple[int, int]:
    conv = cast(_ConvNd, module)
    return conv.in_channels, conv.out_channels


def _fix_conv(module: nn.Module, n_in: int | None, n_out: int | None) -> None:
    conv, n_in, n_out = cast(_ConvNd, module), cast(int, n_in), cast(int, n_out)
    if conv.groups > 1 and conv.groups == conv.in_channels:  # depthwise (x multiplier)
        conv.in_channels = conv.groups = n_out // (conv.out_channels // conv.groups)
        conv.out_channels = n_out
    else:  # groups stay; each keeps the same share of the channels
        conv.in_channels, conv.out_channels = n_in, n_out


def _fix_linear(module: nn.Module, n_in: int | None, n_out: int | None) -> None:
    linear = cast(nn.Linear, module)
    linear.in_features, linear.out_features = cast(int, n_in), cast(int, n_out)


def _fix_batch_norm(module: nn.Module, n_in: int | None, n_out: int | None) -> None:
    cast(nn.modules.batchnorm._BatchNorm, module).num_features = cast(int, n_in)


def _fix_layer_norm(module: nn.Module, n_in: int | None, n_out: int | None) -> None:
    cast(nn.LayerNorm, module).normalized_shape = (cast(int, n_in),)


def _fix_group_norm(module: nn.Module, n_in: int | None, n_out: int | None) -> None:
    norm, n_in = cast(nn.GroupNorm, module), cast(int, n_in)
    norm.num_groups = n_in // (norm.num_channels // norm.num_groups)
    norm.num_channels = n_in


class Layout(NamedTuple):
    """How an op's module carries channels: its row of SLICES, how its constructor attributes (saved as
    config) follow the sliced tensors, and its (in, out) channel counts where its weight does not say them."""

    row: Callable[[nn.Module], str]
    fix_config: Callable[[nn.Module, int | None, int | None], None]
    counts: Callable[[nn.Module], tuple[int, int]] | None = None


def _row(name: str) -> Callable[[nn.Module], str]:
    return lambda module: name


_CONV = Layout(_conv_row, _fix_conv, _conv_counts)
_NORM_ROW = _row("Norm")
# op -> its layout. The conv family is what `isinstance(module, _ConvNd)` matched; the transposed convs
# have no channel rule (their weight is (in, out / groups, *kernel)), so no role brings them here
LAYOUTS: dict[str, Layout] = {
    **dict.fromkeys(
        ("Conv1d", "Conv2d", "Conv3d", "WSConv2d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"),
        _CONV,
    ),
    "Linear": Layout(_row("Linear"), _fix_linear),
    **dict.fromkeys(("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"), Layout(_NORM_ROW, _fix_batch_norm)),
    "LayerNorm": Layout(_NORM_ROW, _fix_layer_norm),
    "GroupNorm": Layout(_NORM_ROW, _fix_group_norm),
}


def layout(module: nn.Module) -> Layout | None:
    """The layout of `module`'s op (None: it holds no channels, or it is no op of the vocabulary)."""
    try:
        return LAYOUTS.get(op_name(module))
    except UnknownOpError:
        return None


def kind(module: nn.Module) -> str | None:
    """The row of SLICES that says how a module's tensors carry channels (None: it holds none)."""
    found = layout(module)
    return found.row(module) if found is not None else None


def slice_plan(
    module: nn.Module, role: Role, in_mask: np.ndarray | None, out_mask: np.ndarray | None
) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Which indices along which axes of each of `module`'s tensors the selections keep: {attr: [(axis,
    index)]}. A selection is a boolean mask over an axis's channel ids or, for a reordering, the positions
    to take in order; an attribute that keeps all its channels in place is left out."""
    plan: dict[str, list[tuple[int, np.ndarray]]] = {}
    if role.axis is not None:  # a Parameter / Constant operand
        attr = "weight" if "weight" in module._parameters else "value"
        if in_mask is not None and not _whole(in_mask):
            plan[attr] = [(role.axis, _positions(in_mask))]
        return plan
    masks = {"in": in_mask, "out": out_mask}
    if in_mask is not None and kind(module) == "Grouped":  # weight axis 1 holds one group's positions
        masks["in_group"] = _in_group(in_mask, cast(_ConvNd, module).groups)
    row = kind(module)
    if row is None:  # no rule gives channel ids to a module that holds none
        raise KeyError(f"{type(module).__name__} holds no channels to slice")
    for attr, axis, side in SLICES[row]:
        tensor, mask = getattr(module, attr, None), masks.get(side)
        if tensor is None or mask is None or tensor.dim() <= axis or _whole(mask):
            continue
        plan.setdefault(attr, []).append((axis, _positions(mask)))
    return plan


def _positions(selection: np.ndarray) -> np.ndarray:
    return np.flatnonzero(selection) if selection.dtype == bool else selection


def _whole(selection: np.ndarray) -> bool:
    """Whether a selection keeps every channel where it is."""
    if selection.dtype == bool:
        return bool(selection.all())
    return bool((selection == np.arange(len(selection))).all())


def _count(selection: np.ndarray) -> int:
    return int(selection.sum()) if selection.dtype == bool else len(selection)


def _in_group(selection: np.ndarray, groups: int) -> np.ndarray:
    """A grouped conv's selection within one group (the weight's axis 1); every group must agree."""
    if selection.dtype == bool:
        return selection.reshape(groups, -1)[0]
    per_group = selection.reshape(groups, -1)
    first = per_group[0]
    if not (per_group - per_group[:, :1] == first - first[0]).all() or first.min() != 0:
        raise ValueError(
            "a reordering of a grouped conv's inputs must move the channels of every group alike"
        )
    return first


def take(tensor: torch.Tensor, cuts: list[tuple[int, np.ndarray]]) -> torch.Tensor:
    """`tensor` restricted to the given indices along each axis (a new tensor, detached)."""
    tensor = tensor.detach()
    for axis, index in cuts:
        tensor = tensor.index_select(axis, torch.from_numpy(index).to(tensor.device))
    return tensor.clone() if not cuts else tensor


def slice_module(
    module: nn.Module,
    role: Role,
    in_mask: np.ndarray | None,
    out_mask: np.ndarray | None,
    *,
    parameters: bool = True,
) -> nn.Module:
    """A copy of `module` keeping the masked channels (the input module is left untouched). With
    `parameters=False` the copy has no parameters at all (a flexible layer's per-level skeleton)."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters) if parameters else {}
    new._buffers = dict(module._buffers)
    for attr, cuts in slice_plan(module, role, in_mask, out_mask).items():
        if attr in new._parameters or attr in new._buffers:
            _set(new, attr, take(getattr(module, attr), cuts))
    if role.axis is None:
        n_in = _count(in_mask) if in_mask is not None else _size(module, "in")
        n_out = _count(out_mask) if out_mask is not None else _size(module, "out")
        found = layout(new)
        if found is not None:  # keep the constructor attributes (saved as config) in step with the tensors
            found.fix_config(new, n_in, n_out)
    return new


def _size(module: nn.Module, side: str) -> int | None:
    found = layout(module)
    if found is not None and found.counts is not None:
        n_in, n_out = found.counts(module)
        return n_out if side == "out" else n_in
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    return weight.shape[0] if side == "out" or weight.dim() < 2 else weight.shape[1]


def _set(module: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    if attr in module._parameters:
        old = cast(nn.Parameter, module._parameters[attr])  # slice_plan names only tensors that are set
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = tensor


def apply(dag: DagModule, groups: ChannelGroups, keep: Callable[[np.ndarray], np.ndarray]) -> DagModule:
    """A new DAG with every role's tensors sliced to `keep(ids)` (a boolean mask per id)."""
    editor = Editor(dag)
    for name, role in groups.roles.items():
        if role.rewrite is not None:  # a split's sizes, a slice's bounds
            editor[name].args = role.rewrite(keep)
        if role.keywords:
            editor[name].kwargs = {**editor[name].kwargs, **role.keywords}
        in_mask = keep(role.in_ids) if role.in_ids is not None else None
        out_mask = keep(role.out_ids) if role.out_ids is not None else None
        if (in_mask is None or in_mask.all()) and (out_mask is None or out_mask.all()):
            continue
        editor.set_module(name, slice_module(editor[name].module, role, in_mask, out_mask))
    return editor.build()


def permute(dag: DagModule, groups: ChannelGroups, order: Callable[[np.ndarray], np.ndarray]) -> DagModule:
    """A new DAG with every role's tensors reordered: the channels along an axis of ids `ids` taken in the
    order `order(ids)` (positions). The caller makes orders that agree along every path through the graph."""
    editor = Editor(dag)
    for name, role in groups.roles.items():
        if role.axis is None and kind(editor[name].module) is None:
            continue  # holds no channels (a split's sizes stay: orders move channels within their parts)
        in_order = order(role.in_ids) if role.in_ids is not None else None
        out_order = order(role.out_ids) if role.out_ids is not None else None
        if (in_order is None or _whole(in_order)) and (out_order is None or _whole(out_order)):
            continue
        editor.set_module(name, slice_module(editor[name].module, role, in_order, out_order))
    return editor.build()
