"""`FlexDagModule`: a DagModule whose flexible vertices run at one of several nested widths (levels)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
from torch import nn

from ..core.dag import DagModule, Vertex
from ..core.errors import DagError
from .base import _copy_rest, submodule
from .delta_level import LevelDelta
from .modules import flex_layers, is_flex
from .widths import WidthPlan, apply_widths, placed_vertices

# vertex -> per level, the call template (args, kwargs): split sizes and reshapes that spell widths out
LevelArgs = dict[str, list[tuple[tuple, dict]]]


class FlexDagModule(DagModule):
    """A DagModule with flexible vertices, all with the same number of levels (0 the narrowest).

    `set_level_use(i)` switches every flexible vertex (and the call templates that spell widths out)
    to level i; `make_base_copy()` gives the plain DagModule of the level in use. `set_widths` runs any
    other sub-network given one width per channel group (see `make_flexible`).
    """

    def __init__(
        self,
        inputs: Sequence[str],
        vertices: Sequence[Vertex],
        output: Any,
        input_meta: dict[str, dict[str, Any]] | None = None,
        level_args: LevelArgs | None = None,
        width_info: dict[str, Any] | None = None,
    ):
        super().__init__(inputs, vertices, output, input_meta)
        layers = flex_layers(self)  # those inside vertices too (a mutable vertex's candidates, a block)
        counts = {layer.num_levels for layer in layers}
        if len(counts) != 1:
            raise DagError(
                "a flexible DAG needs flexible vertices that all have the same number of levels, "
                f"found {sorted(counts) or 'none'}"
            )
        self.num_levels: int = counts.pop()
        self.level_args: LevelArgs = dict(level_args or {})
        placed = placed_vertices(self) if self.level_args else {}
        for name, per_level in self.level_args.items():
            if name not in placed or len(per_level) != self.num_levels:
                raise DagError(
                    f"level call templates for {name!r}: the vertex must exist and have one "
                    f"template per level ({self.num_levels})"
                )
        # what `set_widths` needs to recompute the channel groups (JSON-able, saved with the model)
        self.width_info: dict[str, Any] | None = width_info
        self._width_plan: WidthPlan | None = None  # the analysis, made on first use
        self._widths: list[float | int] | None = None  # given to `set_widths`, while in use
        # the skeletons of custom widths, registered so their buffers (a batchnorm's statistics) are
        # saved, loaded, moved and switched to train / eval with the model (empty at a level)
        self.custom_layers = nn.ModuleDict()
        self._level: int | None = None
        in_use = {layer.level for layer in layers}  # a converted model keeps its level
        if in_use == {None}:  # every layer at custom widths (a model loaded so): kept as they are
            self._register_custom()
            return
        level = cast(int, in_use.pop()) if len(in_use) == 1 else self.num_levels - 1
        self._apply_level(level)

    # --- levels -----------------------------------------------------------------------------------

    def max_level(self) -> int:
        return self.num_levels - 1

    def current_level(self) -> int | None:
        """The level in use (None while running widths set by `set_widths`)."""
        return self._level

    def set_level_use(self, level: int) -> None:
        if not isinstance(level, (int, np.integer)) or not 0 <= level <= self.max_level():
            raise DagError(
                f"level {level!r} does not exist: this flexible model has levels 0..{self.max_level()}"
            )
        self._apply_level(int(level))

    def _apply_level(self, level: int) -> None:
        for layer in flex_layers(self):
            layer.set_level(level)
        changed: dict[int, DagModule] = {}  # the DAGs (this one, nested blocks) whose templates changed
        placed = placed_vertices(self) if self.level_args else {}
        for name, per_level in self.level_args.items():
            args, kwargs = per_level[level]
            for owner, vertex in placed[name]:
                if vertex.args != args or vertex.kwargs != kwargs:
                    vertex.args, vertex.kwargs, changed[id(owner)] = args, dict(kwargs), owner
        self._level, self._widths = level, None
        self.custom_layers.clear()
        for owner in changed.values():
            owner.recompile()

    def flex_vertices(self) -> list[Vertex]:
        return [v for v in self if is_flex(v.module)]

    # --- plain models -----------------------------------------------------------------------------

    def make_base_copy(self) -> DagModule:
        """A plain, independent DagModule of the level (or widths) in use: same outputs. Every flexible
        layer, those inside vertices included (a mutable vertex's candidates), becomes its plain layer."""
        memo: dict[int, Any] = {id(layer): layer.make_base_copy() for layer in flex_layers(self)}
        vertices = [
            Vertex(v.name, copy.deepcopy(v.module, memo), v.args, dict(v.kwargs), dict(v.meta)) for v in self
        ]
        plain = DagModule(self.input_names, vertices, self.output, self.input_meta)
        for vertex, source in zip(plain, self):
            vertex.module.train(source.module.training)
        plain.training = self.training
        return plain

    def load_from_base(self, plain: DagModule) -> None:
        """Copy a plain model's weights (of the level in use) into the flexible model's shared weights."""
        for vertex, module in self._pairs(plain):
            _copy_module(module, vertex.module, f"vertex {vertex.name!r}", into_flexible=True)

    def copy_to_base(self, plain: DagModule) -> None:
        """Copy the weights of the level in use into a plain model of that level (in place)."""
        for vertex, module in self._pairs(plain):
            _copy_module(module, vertex.module, f"vertex {vertex.name!r}", into_flexible=False)

    def _pairs(self, plain: DagModule) -> list[tuple[Vertex, nn.Module]]:
        """(plain vertex, this model's module) for every module of this model; vertex names must match."""
        if [v.name for v in plain] != [v.name for v in self]:
            raise DagError(
                "the plain model does not have this flexible model's vertices (same names, same "
                "order): make it with make_base_copy()"
            )
        seen: set[int] = set()
        pairs = []
        for vertex, own in zip(plain, self):
            if id(own.module) in seen:
                continue
            seen.add(id(own.module))
            pairs.append((vertex, own.module))
        return pairs

    # --- widths per channel group -----------------------------------------------------------------

    @property
    def search_dimension(self) -> int:
        """How many channel groups `set_widths` takes a width for."""
        return len(self._plan().prunable)

    def set_widths(self, widths: Sequence[float | int]) -> None:
        """Run the sub-network with one width per prunable channel group: a fraction in (0, 1] or a
        channel count; each group keeps its most important channels (the order the levels use)."""
        apply_widths(self, self._plan(), widths)
        self._level = None
        self._widths = [w.item() if isinstance(w, np.generic) else w for w in widths]
        self._register_custom()

    def _register_custom(self) -> None:
        """Register the skeletons of the custom widths in use (in train / eval mode as their layers)."""
        self.custom_layers.clear()
        for index, layer in enumerate(flex_layers(self)):
            if layer.custom is not None:
                layer.custom[0].train(layer.training)
                self.custom_layers[str(index)] = layer.custom[0]

    def current_widths(self) -> list[float | int] | None:
        """The widths given to `set_widths` while they are in use (None at a level); saved with the
        model and set again when it loads."""
        return None if self._widths is None else list(self._widths)

    def _plan(self) -> WidthPlan:
        if self._width_plan is None:
            self._width_plan = WidthPlan.rebuild(self)
        return self._width_plan

    # --- deltas -----------------------------------------------------------------------------------

    def export_level_delta(self):
        """(down, up) at the level L in use: `up` turns a plain model of level L-1 into level L, `down`
        one of level L+1 into level L (None where that level does not exist)."""
        level = self._require_level("export_level_delta")
        inside = [v.name for v in self if not is_flex(v.module) and _holds_flex(v.module)]
        if inside:
            raise DagError(
                f"export_level_delta: vertices {inside[:6]} hold flexible layers inside them (mutable "
                "vertices), which level deltas do not cover: make plain models of each level with "
                "set_level_use(i) and make_base_copy() instead"
            )
        down = LevelDelta.between(self, level + 1, level) if level < self.max_level() else None
        up = LevelDelta.between(self, level - 1, level) if level > 0 else None
        return down, up

    def _require_level(self, what: str) -> int:
        if self._level is None:
            raise DagError(
                f"{what} works between levels; the model runs custom widths: set_level_use(i) first"
            )
        return self._level

    def __deepcopy__(self, memo: dict[int, Any]) -> FlexDagModule:
        clone = super().__deepcopy__(memo)
        clone._width_plan = None
        return clone

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.num_levels}, level={self._level}"


def _holds_flex(module: nn.Module) -> bool:
    """Whether `module` holds flexible layers (inside it, not being one)."""
    return any(is_flex(m) for m in module.modules() if m is not module)


def _copy_module(flexible: nn.Module, plain: nn.Module, where: str, into_flexible: bool) -> None:
    """Copy the weights of one vertex's module between the flexible model (at the width in use) and a
    plain one of that width, either way: every flexible layer in it (itself, a mutable vertex's
    candidates) with its plain counterpart at the same path, then the tensors outside them."""
    layers = [(path, m) for path, m in flexible.named_modules() if is_flex(m)]
    for path, layer in layers:
        other = submodule(plain, path, where)
        here = f"{where}, {path}" if path else where
        if into_flexible:
            layer.load_layer(other, here)
        else:
            layer.copy_layer_to(other, here)
    _copy_rest(flexible, plain, [path for path, _ in layers], into_flexible)
