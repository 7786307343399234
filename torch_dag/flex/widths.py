"""Widths of a flexible model: its settings, the channel analysis its levels come from (`WidthPlan`), and
how a flexible layer is cut to a set of kept channels. `FlexDagModule.set_widths` and `make_flexible`
both build on this module; it needs the flexible DAG class only for annotations."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from torch import nn

from ..core.dag import DagModule, Vertex
from ..core.errors import DagError
from ..core.options import check_option, choices
from ..core.template import from_json
from ..pruning import surgery
from ..pruning.channels import ChannelGroups, Group, Role
from ..pruning.groups import channel_groups
from ..pruning.prune import AttentionMode, Criterion, must_keep
from .modules import Cuts, FlexModule, is_flex

if TYPE_CHECKING:
    from .model import FlexDagModule

Keep = Callable[[np.ndarray], np.ndarray]
FlexCompensation = Literal["lstsq", "none"]


@dataclass(frozen=True)
class FlexConfig:
    """Settings of `make_flexible` (the same meaning as in `PruneConfig`)."""

    criterion: Criterion = "l2"  # taylor needs calibration
    round_to: int = 8  # widths are multiples of this where a group is that wide
    min_channels: int = 1
    attention: AttentionMode = "heads"
    seed: int = 0
    reorder: bool = True  # sort channels by importance first, so that levels take the first ones
    # lstsq (needs calibration): re-solve the shared weights of the layers that lose inputs, for all levels
    # at once (`compensate_levels`); the top level then no longer equals the input model exactly
    compensate: FlexCompensation = "none"

    def __post_init__(self) -> None:
        check_option("criterion", self.criterion, choices(Criterion), what="importance criterion")
        check_option("attention", self.attention, choices(AttentionMode), what="attention mode")
        check_option(
            "compensate",
            self.compensate,
            choices(FlexCompensation),
            what="compensation",
            where=" of a flexible model",
        )


@dataclass
class WidthPlan:
    """The channel analysis of the full-width model and each prunable group's ranking."""

    groups: ChannelGroups
    prunable: list[Group]
    ranked: list[np.ndarray]  # per prunable group: its class roots, most important first
    owners: dict[int, list[int]]
    config: FlexConfig

    @classmethod
    def rebuild(cls, flex: FlexDagModule) -> WidthPlan:
        """Redo the analysis of a loaded flexible model (its ranking was saved with it)."""
        info = flex.width_info
        if not info:
            raise DagError(
                "set_widths needs a model made by make_flexible (it knows the channel groups); this "
                "one was written by hand: use set_level_use"
            )
        full = _full_width_dag(flex, info.get("full_args", {}))
        config = FlexConfig(**info["config"])
        groups = channel_groups(full, full.example_inputs(), info["protected"], attention=config.attention)
        prunable = [g for g in groups.groups() if g.prunable]
        if len(prunable) != len(info["ranking"]):
            raise DagError(
                f"the saved ranking has {len(info['ranking'])} groups, the analysis finds {len(prunable)}"
            )
        ranked = [
            np.asarray(g.channels)[np.asarray(r, dtype=np.int64)] for g, r in zip(prunable, info["ranking"])
        ]
        return cls(groups, prunable, ranked, must_keep(groups), config)

    def removed(self, counts: Sequence[int]) -> np.ndarray:
        """A mask over channel ids: true where a class falls outside its group's top `counts[g]`."""
        mask = np.zeros(self.groups.size, dtype=bool)
        for ranked, k in zip(self.ranked, counts):
            mask[ranked[k:]] = True
        for roots in self.owners.values():  # never every channel of a producer or a split's part
            if mask[roots].all():
                mask[roots[0]] = False
        return mask

    def counts(self, widths: Sequence[float | int]) -> list[int]:
        """Kept classes per group for widths given as fractions (floats) or channel counts (ints),
        rounded up to the rounding step and at least `min_channels`."""
        if len(widths) != len(self.prunable):
            raise DagError(
                f"give one width per prunable channel group: {len(self.prunable)} (the search "
                f"dimension), got {len(widths)}"
            )
        counts = []
        for group, width in zip(self.prunable, widths):
            size = len(group.channels)
            if isinstance(width, (int, np.integer)) and not isinstance(width, bool) and width >= 1:
                keep = math.ceil(width / group.unit)
            elif isinstance(width, (float, np.floating)) and 0 < width <= 1:
                keep = math.ceil(width * size - 1e-9)
            else:
                raise DagError(
                    f"width {width!r} for the group of {group.producers[0]}: give a fraction in (0, 1] "
                    "or a channel count >= 1"
                )
            step = self.config.round_to // math.gcd(self.config.round_to, group.unit)
            if step > 1 and size >= step:
                keep = math.ceil(keep / step) * step
            counts.append(min(size, max(keep, min(self.config.min_channels, size))))
        return counts


def apply_widths(flex: FlexDagModule, plan: WidthPlan, widths: Sequence[float | int]) -> None:
    """Switch `flex` to the sub-network of the given per-group widths (custom level)."""
    keep = keep_mask(plan.groups, plan.removed(plan.counts(widths)))
    changed = False
    for vertex in flex:
        role = plan.groups.roles.get(vertex.name)
        if role is None:
            continue
        if is_flex(vertex.module):
            vertex.module.set_custom(*at_widths(full_view(vertex.module), role, keep))
        if role.rewrite is not None:
            vertex.args, changed = role.rewrite(keep), True
    if changed:
        flex.recompile()


def keep_mask(groups: ChannelGroups, removed: np.ndarray) -> Keep:
    return lambda ids: ~removed[groups.root(ids)]


def holds_channels(module: nn.Module, role: Role) -> bool:
    return role.axis is not None or surgery.kind(module) is not None


def at_widths(module: nn.Module, role: Role, keep: Keep) -> tuple[nn.Module, Cuts]:
    """The skeleton of `module` at the kept channels and which indices of its parameters it reads."""
    in_mask = keep(role.in_ids) if role.in_ids is not None else None
    out_mask = keep(role.out_ids) if role.out_ids is not None else None
    cuts = {
        attr: axes
        for attr, axes in surgery.slice_plan(module, role, in_mask, out_mask).items()
        if attr in module._parameters
    }
    return surgery.slice_module(module, role, in_mask, out_mask, parameters=False), cuts


def full_view(flex: FlexModule) -> nn.Module:
    """The flexible layer's full-width module, with its (shared) parameters."""
    full = copy.copy(flex.full)
    full._parameters = dict(flex._parameters)
    return full


def _full_width_dag(flex: FlexDagModule, full_args: dict[str, Any]) -> DagModule:
    vertices = []
    for v in flex:
        args = tuple(from_json(full_args[v.name][0])) if v.name in full_args else v.args
        module = full_view(v.module) if is_flex(v.module) else v.module
        vertices.append(Vertex(v.name, module, args, dict(v.kwargs), dict(v.meta)))
    return DagModule(flex.input_names, vertices, flex.output, flex.input_meta)
