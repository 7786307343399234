"""Surgery: slice every affected vertex's tensors to the kept channels, with one helper driven by a
table of (tensor, axis, side) per op, never a copy of the same slicing code per layer type."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..core.dag import DagModule
from ..passes.editor import Editor
from .channels import ChannelGroups, Role

# op -> [(tensor attribute, axis, side)], side "in" (input channels) or "out" (channels it produces)
SLICES: dict[str, list[tuple[str, int, str]]] = {
    "Conv": [("weight", 0, "out"), ("weight", 1, "in"), ("bias", 0, "out"), ("gain", 0, "out")],
    "Depthwise": [("weight", 0, "out"), ("bias", 0, "out"), ("gain", 0, "out")],
    "Grouped": [("weight", 0, "out"), ("weight", 1, "in_group"), ("bias", 0, "out"), ("gain", 0, "out")],
    "Linear": [("weight", 0, "out"), ("weight", 1, "in"), ("bias", 0, "out")],
    "Norm": [("weight", 0, "in"), ("bias", 0, "in"), ("running_mean", 0, "in"), ("running_var", 0, "in")],
}


def kind(module: nn.Module) -> str | None:
    """The row of SLICES that says how a module's tensors carry channels (None: it holds none)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups == 1:
            return "Conv"
        return "Depthwise" if module.groups == module.in_channels else "Grouped"
    if isinstance(module, nn.Linear):
        return "Linear"
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
        return "Norm"
    return None


def _fix_config(module: nn.Module, n_in: int | None, n_out: int | None) -> None:
    """Keep the constructor attributes (saved as config) in step with the sliced tensors."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.groups > 1 and module.groups == module.in_channels:  # depthwise (x multiplier)
            module.in_channels = module.groups = n_out // (module.out_channels // module.groups)
            module.out_channels = n_out
        else:  # groups stay; each keeps the same share of the channels
            module.in_channels, module.out_channels = n_in, n_out
    elif isinstance(module, nn.Linear):
        module.in_features, module.out_features = n_in, n_out
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = n_in
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (n_in,)
    elif isinstance(module, nn.GroupNorm):
        module.num_groups = n_in // (module.num_channels // module.num_groups)
        module.num_channels = n_in


def slice_plan(module: nn.Module, role: Role, in_mask: np.ndarray | None, out_mask: np.ndarray | None
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
        masks["in_group"] = _in_group(in_mask, module.groups)
    for attr, axis, side in SLICES[kind(module)]:
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
        raise ValueError("a reordering of a grouped conv's inputs must move the channels of every group alike")
    return first


def take(tensor: torch.Tensor, cuts: list[tuple[int, np.ndarray]]) -> torch.Tensor:
    """`tensor` restricted to the given indices along each axis (a new tensor, detached)."""
    tensor = tensor.detach()
    for axis, index in cuts:
        tensor = tensor.index_select(axis, torch.from_numpy(index).to(tensor.device))
    return tensor.clone() if not cuts else tensor


def slice_module(module: nn.Module, role: Role, in_mask: np.ndarray | None, out_mask: np.ndarray | None,
                 *, parameters: bool = True) -> nn.Module:
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
        _fix_config(new, n_in, n_out)
    return new


def _size(module: nn.Module, side: str) -> int | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if side == "out" else module.in_channels
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    return weight.shape[0] if side == "out" or weight.dim() < 2 else weight.shape[1]


def _set(module: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    if attr in module._parameters:
        old = module._parameters[attr]
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
