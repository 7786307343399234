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
from ..core.ops import is_dag_module
from ..core.options import check_option, choices
from ..core.template import Ref, from_json
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
    # widths are multiples of this where a group is that wide; halved per group (8 -> 4 -> 2 -> 1) where it
    # would make two levels one (make_flexible records each group's in width_info["rounding"])
    round_to: int = 8
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
    rounding: list[int] | None = None  # per group (`choose_rounding`); None: `config.round_to` for all

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
        rounding = info.get("rounding")  # per group, as make_flexible chose it (absent in older files)
        if rounding is not None and not (
            isinstance(rounding, list)
            and len(rounding) == len(prunable)
            and all(type(r) is int and r >= 1 for r in rounding)
        ):
            raise DagError(
                f"the saved rounding {str(rounding)[:80]} is not one positive int per channel group "
                f"({len(prunable)}): make the flexible model again"
            )
        return cls(groups, prunable, ranked, must_keep(groups), config, rounding)

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
        rounded up to the group's rounding step and at least `min_channels`."""
        self._check_length(widths)
        return [
            self._rounded(group, self._kept(group, width), round_to)
            for group, width, round_to in zip(self.prunable, widths, self.roundings())
        ]

    def roundings(self) -> list[int]:
        """Per prunable group, the multiple (in channels) its widths are rounded to."""
        return list(self.rounding) if self.rounding else [self.config.round_to] * len(self.prunable)

    def choose_rounding(self, levels: Sequence[Sequence[float | int]]) -> list[int]:
        """Per group, the largest rounding (`config.round_to`, halved: 8 -> 4 -> 2 -> 1) that keeps apart
        the levels the widths keep apart: rounding 4 and 8 channels of a 16-channel group up to 8 would
        make two levels one. Sets and returns it."""
        for widths in levels:
            self._check_length(widths)
        chosen = []
        for index, group in enumerate(self.prunable):
            kept = [self._kept(group, widths[index]) for widths in levels]
            round_to = self.config.round_to
            while round_to > 1 and not _apart(kept, [self._rounded(group, k, round_to) for k in kept]):
                round_to //= 2
            chosen.append(round_to)
        self.rounding = chosen
        return chosen

    def _check_length(self, widths: Sequence[float | int]) -> None:
        if len(widths) != len(self.prunable):
            raise DagError(
                f"give one width per prunable channel group: {len(self.prunable)} (the search "
                f"dimension), got {len(widths)}"
            )

    def _kept(self, group: Group, width: float | int) -> int:
        """Classes of `group` that `width` keeps, before rounding (at least `min_channels`)."""
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
        return min(size, max(keep, min(self.config.min_channels, size)))

    @staticmethod
    def _rounded(group: Group, keep: int, round_to: int) -> int:
        """`keep` classes rounded up so the layers' widths are multiples of `round_to` channels, where
        the group is that wide (a class of several channels, an attention head, counts them all)."""
        size = len(group.channels)
        step = round_to // math.gcd(round_to, group.unit)
        if step > 1 and size >= step:
            keep = math.ceil(keep / step) * step
        return min(size, keep)


def _apart(kept: list[int], rounded: list[int]) -> bool:
    """Whether neighbouring levels that keep different numbers of classes still do after rounding."""
    return all(r0 != r1 for k0, k1, r0, r1 in zip(kept, kept[1:], rounded, rounded[1:]) if k0 != k1)


def apply_widths(flex: FlexDagModule, plan: WidthPlan, widths: Sequence[float | int]) -> None:
    """Switch `flex` to the sub-network of the given per-group widths (custom level), the flexible
    layers inside its vertices (a mutable vertex's candidates, a nested block) included."""
    keep = keep_mask(plan.groups, plan.removed(plan.counts(widths)))
    changed: dict[int, DagModule] = {}
    for name, placed in placed_vertices(flex).items():
        role = plan.groups.roles.get(name)
        if role is None:
            continue
        for owner, vertex in placed:
            for layer in own_flex_layers(vertex.module):
                layer.set_custom(*at_widths(full_view(layer), role, keep))
                # cut indices are cached by the id of their array: the arrays of the widths replaced are
                # freed, and a new one may reuse an id and be served the old slice
                layer._index_cache.clear()
            if role.rewrite is not None:
                vertex.args, changed[id(owner)] = role.rewrite(keep), owner
    for owner in changed.values():
        owner.recompile()


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
    for v in flat_vertices(flex):
        args = tuple(from_json(full_args[v.name][0])) if v.name in full_args else v.args
        module = full_view(v.module) if is_flex(v.module) else v.module
        vertices.append(Vertex(v.name, module, args, dict(v.kwargs), dict(v.meta)))
    return DagModule(flex.input_names, vertices, flex.output, flex.input_meta)


# --- flexible layers inside vertices: a mutable vertex's candidates, a nested block ----------------


def flat_dag(dag: DagModule) -> DagModule:
    """`dag` as the one flat DAG its channel analysis reads (`flat_vertices`), sharing its modules: runs
    what `dag` runs at the widths in use, with every block run, so every vertex of the analysis has a
    value."""
    return DagModule(dag.input_names, flat_vertices(dag), dag.output, dag.input_meta)


def flat_vertices(dag: DagModule) -> list[Vertex]:
    """The vertices of `dag` as its channel analysis sees them: a module standing for one of several
    layers (a mutable vertex) replaced by the one its `width_layer()` names (a kernel size: all have the
    same channels; a skippable block: the block, whose channels the identity only drops), and nested
    DAGs inlined under their own vertex names, which nesting keeps."""
    flat = []
    for v in dag:
        module = width_layer(v.module)
        if not is_dag_module(module):
            flat.append(Vertex(v.name, module, v.args, dict(v.kwargs), dict(v.meta)))
            continue
        bound = [a.name if isinstance(a, Ref) else None for a in v.args]
        if v.kwargs or bound != module.input_names or module.output != Ref(v.name):
            raise DagError(
                f"vertex {v.name!r}: a DAG nested in a flexible DAG must read its inputs under the names "
                f"of the values it is given and give its value under the vertex's name (as "
                f"td.nas.make_mutable's blocks do); it reads {module.input_names} given {list(v.args)}"
            )
        flat.extend(flat_vertices(module))
    return flat


def width_layer(module: nn.Module) -> nn.Module:
    """The layer `module` is for the channel analysis: its `width_layer()` where it has one (a mutable
    vertex), else itself."""
    pick = getattr(module, "width_layer", None)
    return pick() if callable(pick) else module


def nested_dags(module: nn.Module) -> list[DagModule]:
    """The outermost DagModules in `module` (itself, if it is one): the blocks of a mutable vertex."""
    if is_dag_module(module):
        return [module]
    return [dag for child in module.children() for dag in nested_dags(child)]


def own_flex_layers(module: nn.Module) -> list[FlexModule]:
    """The flexible layers a vertex's module is, or holds outside nested DAGs (a mutable vertex's kernel
    size candidates): all take that vertex's widths."""
    if is_flex(module):
        return [module]
    if is_dag_module(module):
        return []
    return [layer for child in module.children() for layer in own_flex_layers(child)]


def placed_vertices(dag: DagModule) -> dict[str, list[tuple[DagModule, Vertex]]]:
    """By name, every vertex of `dag` and of the DAGs nested in its vertices' modules that holds no DAG
    itself (the vertices of `flat_vertices`), with the DAG it belongs to (to recompile after an edit)."""
    found: dict[str, list[tuple[DagModule, Vertex]]] = {}
    for vertex in dag:
        inner = nested_dags(vertex.module)
        if not inner:
            found.setdefault(vertex.name, []).append((dag, vertex))
        for nested in inner:
            for name, placed in placed_vertices(nested).items():
                found.setdefault(name, []).extend(placed)
    return found
