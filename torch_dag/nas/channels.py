"""Channel mutables: on a flexible DAG, one per prunable channel group of its width analysis (tied
residual widths are one group, so one mutable), whose choices are the kept fractions of the DAG's levels
(or a grid given with `channel_grid`); and the derived widths, which follow others (a concat's width is
the sum of its parts'), with no choice of their own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.dag import evaluating
from ..core.errors import DagError
from ..flex.model import FlexDagModule
from ..flex.widths import WidthPlan, flat_dag

GRID_KEY = "nas_grid"  # in the flexible DAG's width_info (saved with it): channel mutable -> its choices


def plan_of(flex: FlexDagModule) -> WidthPlan:
    return flex._plan()


def channel_names(flex: FlexDagModule) -> list[str]:
    """One name per prunable group, after the group's first producer."""
    return [f"width:{group.producers[0]}" for group in plan_of(flex).prunable]


def level_fractions(flex: FlexDagModule) -> list[list[float]]:
    """Per level, each prunable group's kept fraction, measured on the level's shapes (cached)."""
    cached = flex.__dict__.get("_nas_level_fractions")
    if cached is not None:
        return cached
    plan = plan_of(flex)
    producers = [_pure_producer(plan, g) for g in range(len(plan.prunable))]
    was, state = flex.current_level(), flex.current_widths()
    inputs = flex.example_inputs()
    fractions = []
    try:
        for level in range(flex.num_levels):
            flex.set_level_use(level)
            flat = flat_dag(flex)  # producers inside blocks (of skippable vertices) run too
            with torch.no_grad(), evaluating(flat):
                values = flat.run_collecting(*inputs)
            fractions.append([_kept(plan, p, values[p]) for p in producers])
    finally:
        if was is not None:
            flex.set_level_use(was)
        elif state is not None:
            flex.set_widths(state)
    flex.__dict__["_nas_level_fractions"] = fractions
    return fractions


def grid(flex: FlexDagModule, index: int) -> list[float]:
    """The choices of channel mutable `index`: the user's grid, else its levels' kept fractions."""
    name = channel_names(flex)[index]
    given = (flex.width_info or {}).get(GRID_KEY, {}).get(name)
    if given is not None:
        return list(given)
    return sorted({level[index] for level in level_fractions(flex)})


def set_grid(flex: FlexDagModule, name: str, values: Sequence[float]) -> None:
    if flex.width_info is None:
        raise DagError("channel mutables need a flexible DAG made by make_flexible (it knows the groups)")
    flex.width_info.setdefault(GRID_KEY, {})[name] = [float(v) for v in values]


def current(flex: FlexDagModule) -> list[float]:
    """Each group's kept fraction in use: its level's, or the widths set through the mutables."""
    level = flex.current_level()
    if level is not None:
        return list(level_fractions(flex)[level])
    state = flex.current_widths()
    if state is None or not all(isinstance(w, float) for w in state):
        raise DagError(
            f"the flexible DAG runs widths {state} (channel counts, not kept fractions): set_level_use(i), "
            "set_widths with fractions, or set the channel mutables (td.nas.set_chosen)"
        )
    return list(state)


def apply(flex: FlexDagModule, fractions: list[float]) -> None:
    """Run the widths `fractions` (one per group): a level where they are one, else custom widths."""
    for level, own in enumerate(level_fractions(flex)):
        if own == fractions:
            flex.set_level_use(level)
            return
    flex.set_widths(fractions)


def _pure_producer(plan: WidthPlan, index: int) -> str:
    """A producer of group `index` whose output carries that group's channels only."""
    group, groups = plan.prunable[index], plan.groups
    own = set(group.channels)
    for producer in group.producers:
        carried = groups.carried.get(producer)
        if carried is not None and len(carried) and set(groups.root(carried).tolist()) <= own:
            return producer
    raise DagError(
        f"the channel group of {group.producers[0]} has no producer carrying only its channels: its kept "
        "fraction per level cannot be measured; give its choices with td.nas.channel_grid"
    )


def _kept(plan: WidthPlan, producer: str, value: Any) -> float:
    """The fraction of `producer`'s channels its output keeps at this level (one axis shrinks, or none)."""
    full = plan.groups.shapes.get(producer)
    if full is None or not isinstance(value, torch.Tensor):
        raise DagError(f"vertex {producer!r}: no tensor shape to measure its kept channels on")
    shrunk = [(now, was) for now, was in zip(value.shape, full) if now != was]
    if not shrunk:
        return 1.0
    if len(shrunk) > 1 or len(value.shape) != len(full):
        raise DagError(
            f"vertex {producer!r}: its shape {tuple(value.shape)} at a level differs from {full} on several axes"
        )
    now, was = shrunk[0]
    return now / was


@dataclass(frozen=True)
class DerivedWidth:
    """A width that follows others (a concat of groups, a group next to fixed channels): the channels
    of `vertex`'s output, the sum of the kept channels of `sources` (and of `fixed` unprunable ones)."""

    name: str
    vertex: str
    sources: list[str]
    fixed: int

    kind = "derived"


def derived(flex: FlexDagModule) -> list[DerivedWidth]:
    """The widths made of several groups' channels, one per distinct composition, named by the first
    vertex that carries it."""
    plan = plan_of(flex)
    names = channel_names(flex)
    group_of = {root: g for g, group in enumerate(plan.prunable) for root in group.channels}
    seen, found = set(), []
    for vertex in flex:
        carried = plan.groups.carried.get(vertex.name)
        if carried is None or not len(carried):
            continue
        roots = plan.groups.root(carried).tolist()
        parts = tuple(dict.fromkeys(group_of[r] for r in roots if r in group_of))
        fixed = sum(1 for r in roots if r not in group_of)
        if not parts or (len(parts) == 1 and not fixed) or (parts, fixed) in seen:
            continue
        seen.add((parts, fixed))
        found.append(DerivedWidth(f"width:{vertex.name}", vertex.name, [names[g] for g in parts], fixed))
    return found


def derived_value(flex: FlexDagModule, width: DerivedWidth, fractions: list[float]) -> int:
    """The channels `width.vertex` carries when the groups keep `fractions`."""
    plan = plan_of(flex)
    removed = plan.removed(plan.counts(fractions))
    roots = plan.groups.root(plan.groups.carried[width.vertex])
    return int(np.count_nonzero(~removed[roots]))
