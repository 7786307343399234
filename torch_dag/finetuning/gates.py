"""Learned channel gates for training-aware pruning (`train_prune`): one gate per channel class (or per
block of classes) of every prunable channel group, trained with the weights, then folded into the layers
and the closed channels removed by pruning's surgery.

A gate multiplies every tensor that writes the group's channels right after the layer that writes them
with a per-channel affine (a conv's or linear's output rows, a depthwise conv's, a norm's affine entries,
a free `Parameter` such as a class token), so that a closed gate zeroes the channel everywhere a reader
can see it; a layer read only by a norm over the same channels is gated after the norm instead (a gate
before a batch norm would be normalized away). Gates are ordinary vertices: a `Gate` op reading the
tensor and one `Parameter` vertex holding every gate's logit, so the gated model trains, checkpoints and
runs under DDP like any DagModule. Folding a gate scales the tensors of that layer along the same axis
(`SCALED`), which gives exactly the gated model's output.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from ..core.dag import DagModule, Vertex
from ..core.editor import Editor
from ..core.errors import DagError
from ..core.ops import Parameter, op_name, register_module_op
from ..core.template import Ref
from ..core.traits import Trait, has_trait
from ..pruning import surgery
from ..pruning.channels import ChannelGroups, Group

CLOSED = -float("inf")  # a gate logit whose gate is exactly 0


class Gate(nn.Module):
    """`x` times its channels' gates along `axis`: the sigmoid of the logit of each channel's gate
    (`index` into the logits, read as the second input) times `sharpness`, 1 for channels without a gate
    (the last index)."""

    index: torch.Tensor
    sharpness: torch.Tensor

    def __init__(self, channels: int, axis: int):
        super().__init__()
        self.channels, self.axis = channels, axis
        self.register_buffer("index", torch.zeros(channels, dtype=torch.int64))
        self.register_buffer("sharpness", torch.ones(()))  # an inverse temperature: logits times this

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        opened = torch.cat([torch.sigmoid(logits * self.sharpness), logits.new_ones(1)])[self.index]
        shape = [1] * x.dim()
        shape[self.axis] = self.channels
        return x * opened.view(shape)


register_module_op(Gate, traits=[Trait.ELEMENTWISE])

# the layer kinds (rows of `surgery.SLICES`) a gate can follow: the axis of the channels in their output
# (for norms, by op), and which side of the row the gate scales when folded
_OUT_AXIS = {"Conv": 1, "Depthwise": 1, "Grouped": 1, "Linear": -1}
_NORM_AXIS = {"BatchNorm1d": 1, "BatchNorm2d": 1, "BatchNorm3d": 1, "GroupNorm": 1, "LayerNorm": -1}
SCALED = {"Conv": "out", "Depthwise": "out", "Grouped": "out", "Linear": "out", "Norm": "in"}


@dataclass(frozen=True)
class Site:
    """A vertex whose output gets a gate: the channel ids along `axis` of its output."""

    vertex: str
    ids: np.ndarray
    axis: int
    norm: bool  # a norm: its input has the same ids


@dataclass
class Gated:
    """A DAG with gates, and where they are: `gates[i]` is the class roots gate i opens, `groups_of[i]`
    the index (among the prunable groups) of its group, `sites` the vertices gated (name of the gate
    vertex -> the site)."""

    dag: DagModule
    logits: str  # the Parameter vertex holding every gate's logit
    gates: list[np.ndarray]
    groups_of: np.ndarray
    sites: dict[str, Site]
    gate_of: np.ndarray  # over channel ids: the gate of each id's class root (len(gates): none)

    def logit_tensor(self) -> torch.Tensor:
        return cast(Parameter, self.dag[self.logits].module).weight

    def gate_modules(self) -> list[Gate]:
        return [cast(Gate, self.dag[name].module) for name in self.sites]

    @property
    def sharpness(self) -> float:
        return float(self.gate_modules()[0].sharpness)

    def set_sharpness(self, value: float) -> None:
        """The inverse temperature of every gate (their logits are multiplied by it)."""
        for gate in self.gate_modules():
            gate.sharpness.fill_(value)

    def opened(self) -> torch.Tensor:
        """Each gate's open fraction, differentiable."""
        return torch.sigmoid(self.logit_tensor() * self.sharpness)

    def per_root(self, values: torch.Tensor) -> torch.Tensor:
        """`values` (one per gate) spread over the channel ids; 1 where no gate is."""
        return torch.cat([values, values.new_ones(1)])[torch.from_numpy(self.gate_of)]


def gate_sites(dag: DagModule, groups: ChannelGroups) -> list[Site]:
    """The vertices to gate, in the DAG's order: every layer writing channels of a prunable group with a
    per-channel affine, except one whose every reader is a norm over the same channels (gated instead)."""
    prunable = {r for g in groups.groups() if g.prunable for r in g.channels}
    found: dict[str, Site] = {}
    for name, role in groups.roles.items():
        module = dag[name].module
        site = _site(name, module, role.in_ids, role.out_ids, role.axis)
        if site is not None and prunable.intersection(groups.root(site.ids).tolist()):
            found[name] = site
    readers = dag.successors()
    order = {v.name: i for i, v in enumerate(dag)}
    sites = []
    for name, site in found.items():
        if isinstance(dag[name].module, Parameter) and any(_weighs(dag[f].op) for f in readers.get(name, [])):
            continue  # a functional layer's weight, not a value written into the channels
        followers = readers.get(name, [])
        normed = followers and all(
            f in found and found[f].norm and np.array_equal(found[f].ids, site.ids) for f in followers
        )
        if not normed:
            sites.append(site)
    return sorted(sites, key=lambda s: order[s.vertex])


def _weighs(op: str) -> bool:
    """Whether `op` reads a tensor as weights (a functional conv, linear or norm's)."""
    return any(has_trait(op, t) for t in (Trait.CONV, Trait.LINEAR, Trait.NORM, Trait.CONTRACTION))


def _site(
    name: str, module: nn.Module, in_ids: np.ndarray | None, out_ids: np.ndarray | None, axis: int | None
) -> Site | None:
    if axis is not None:  # a tied operand: a free Parameter is scaled along its axis
        return (
            Site(name, in_ids, axis, False) if isinstance(module, Parameter) and in_ids is not None else None
        )
    row = surgery.kind(module)
    if getattr(module, "gain", True) is None:  # weight standardization undoes a scaled weight
        return None
    if row in _OUT_AXIS and out_ids is not None:
        return Site(name, out_ids, _OUT_AXIS[row], False)
    affine = isinstance(getattr(module, "weight", None), nn.Parameter)
    if row == "Norm" and affine and in_ids is not None and op_name(module) in _NORM_AXIS:
        return Site(name, in_ids, _NORM_AXIS[op_name(module)], True)
    return None


def block_gates(groups: list[Group], block: int) -> list[np.ndarray]:
    """The class roots of each gate: `block` consecutive classes of a group share one (the last block of
    a group may be smaller)."""
    if block < 1:
        raise DagError(f"gate block must be a number of channel classes >= 1, got {block}")
    return [
        np.asarray(g.channels[start : start + block], dtype=np.int64)
        for g in groups
        for start in range(0, len(g.channels), block)
    ]


def insert_gates(dag: DagModule, groups: ChannelGroups, block: int = 1, opened: float = 0.9) -> Gated:
    """`dag` with gates after its `gate_sites` (every gate `opened` at first); `dag` is left untouched
    (the gated DAG shares its layers, so training the gated DAG trains them)."""
    prunable = [g for g in groups.groups() if g.prunable]
    gates = block_gates(prunable, block)
    if not gates:
        raise DagError(
            "no prunable channel group to gate: every group is fixed (see `torch-dag info --groups`)"
        )
    sizes = [len(range(0, len(g.channels), block)) for g in prunable]
    groups_of = np.repeat(np.arange(len(prunable)), sizes)
    gate_of = np.full(groups.size, len(gates), dtype=np.int64)  # a root without a gate: the last slot
    for index, roots in enumerate(gates):
        gate_of[roots] = index
    gate_of = gate_of[groups.root(np.arange(groups.size))]
    editor = Editor(dag)
    first = next(iter(dag)).name
    logit = float(np.log(opened / (1 - opened)))
    holder = Parameter((len(gates),))
    nn.init.constant_(holder.weight, logit)
    logits = editor.insert(Vertex(editor.fresh_name("gate_logits"), holder, ()), before=first).name
    sites: dict[str, Site] = {}
    for site in gate_sites(dag, groups):
        gate = Gate(len(site.ids), site.axis)
        gate.index.copy_(torch.from_numpy(gate_of[site.ids]))
        name = editor.fresh_name(f"{site.vertex}_gate")
        editor.rewire(site.vertex, name)
        editor.insert(Vertex(name, gate, (Ref(site.vertex), Ref(logits))), after=site.vertex)
        sites[name] = site
    return Gated(editor.build(), logits, gates, groups_of, sites, gate_of)


def fold_gates(gated: Gated, closed: np.ndarray | None = None) -> DagModule:
    """The gated DAG without its gates, each folded into the layer it follows (that layer's tensors
    scaled along the gated axis), so the result computes what the gated DAG computes; gates of the class
    roots where `closed` (a mask over channel ids) is true are first shut (0). The layers of the result
    are copies; the gated DAG is left untouched. Its vertex names are those of the DAG before gating."""
    values = gated.opened().detach()
    if closed is not None:
        shut = [i for i, roots in enumerate(gated.gates) if closed[roots].all()]
        values[shut] = 0.0
    scale = torch.cat([values, values.new_ones(1)])
    editor = Editor(gated.dag)
    for name, site in gated.sites.items():
        factors = scale[cast(Gate, editor[name].module).index]
        editor.set_module(site.vertex, _scaled(editor[site.vertex].module, site, factors))
        editor.remove(name, replacement=site.vertex)
    editor.remove(gated.logits)
    return editor.build()


def shut_gates(gated: Gated, removed: np.ndarray) -> DagModule:
    """The gated DAG with every gate whose class roots are all `removed` (a mask over channel ids) shut:
    a new DAG sharing every layer but the logits."""
    logits = gated.logit_tensor().detach().clone()
    logits[[i for i, roots in enumerate(gated.gates) if removed[roots].all()]] = CLOSED
    holder = Parameter(tuple(logits.shape), requires_grad=False)
    holder.weight.data.copy_(logits)
    editor = Editor(gated.dag)
    editor.set_module(gated.logits, holder)
    return editor.build()


def _scaled(module: nn.Module, site: Site, factors: torch.Tensor) -> nn.Module:
    """A copy of `module` whose output channels along the site's axis are scaled by `factors`."""
    new = copy.copy(module)  # its own tables of tensors: the scaled ones replace entries of them
    new._parameters, new._buffers = dict(module._parameters), dict(module._buffers)
    if isinstance(module, Parameter):
        shape = [1] * module.weight.dim()
        shape[site.axis] = -1
        _set(new, "weight", module.weight.detach() * factors.view(shape))
        return new
    row = surgery.kind(module) or ""
    for attr, axis, side in surgery.SLICES[row]:
        tensor = module._parameters.get(attr)
        if side != SCALED[row] or tensor is None:
            continue
        shape = [1] * tensor.dim()
        shape[axis] = -1
        _set(new, attr, tensor.detach() * factors.to(tensor.dtype).view(shape))
    return new


def _set(module: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    old = module._parameters[attr]
    trains = old is not None and old.requires_grad
    module._parameters[attr] = nn.Parameter(tensor.clone(), requires_grad=trains)
