"""`FlexDagModule`: a DagModule whose flexible vertices run at one of several nested widths (levels)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..core.dag import DagModule, Vertex
from ..core.errors import DagError
from .delta_level import LevelDelta
from .modules import is_flex
from .widths import WidthPlan, apply_widths

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
        counts = {v.module.num_levels for v in self if is_flex(v.module)}
        if len(counts) != 1:
            raise DagError(
                "a flexible DAG needs flexible vertices that all have the same number of levels, "
                f"found {sorted(counts) or 'none'}"
            )
        self.num_levels: int = counts.pop()
        self.level_args: LevelArgs = dict(level_args or {})
        for name, per_level in self.level_args.items():
            if name not in self or len(per_level) != self.num_levels:
                raise DagError(
                    f"level call templates for {name!r}: the vertex must exist and have one "
                    f"template per level ({self.num_levels})"
                )
        # what `set_widths` needs to recompute the channel groups (JSON-able, saved with the model)
        self.width_info: dict[str, Any] | None = width_info
        self._width_plan: WidthPlan | None = None  # the analysis, made on first use
        in_use = {v.module.level for v in self if is_flex(v.module)}  # a converted model keeps its level
        level = cast(int, in_use.pop()) if len(in_use) == 1 and None not in in_use else self.num_levels - 1
        self._level: int | None = level
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
        for vertex in self:
            if is_flex(vertex.module):
                vertex.module.set_level(level)
        changed = False
        for name, per_level in self.level_args.items():
            args, kwargs = per_level[level]
            vertex = self[name]
            if vertex.args != args or vertex.kwargs != kwargs:
                vertex.args, vertex.kwargs, changed = args, dict(kwargs), True
        self._level = level
        if changed:
            self.recompile()

    def flex_vertices(self) -> list[Vertex]:
        return [v for v in self if is_flex(v.module)]

    # --- plain models -----------------------------------------------------------------------------

    def make_base_copy(self) -> DagModule:
        """A plain, independent DagModule of the level (or widths) in use: same outputs."""
        copies: dict[int, nn.Module] = {}
        vertices = []
        for v in self:
            module = copies.get(id(v.module))
            if module is None:
                module = v.module.materialize() if is_flex(v.module) else copy.deepcopy(v.module)
                copies[id(v.module)] = module
            vertices.append(Vertex(v.name, module, v.args, dict(v.kwargs), dict(v.meta)))
        plain = DagModule(self.input_names, vertices, self.output, self.input_meta)
        for vertex, source in zip(plain, self):
            vertex.module.train(source.module.training)
        plain.training = self.training
        return plain

    def load_from_base(self, plain: DagModule) -> None:
        """Copy a plain model's weights (of the level in use) into the flexible model's shared weights."""
        for vertex, module in self._pairs(plain):
            with torch.no_grad():
                if not is_flex(module):
                    _copy_state(module, vertex.module, vertex.name)
                    continue
                skeleton, cuts = module.current()
                for name, param in module._parameters.items():
                    if param is None:
                        continue
                    value = cast(
                        torch.Tensor, vertex.module._parameters[name]
                    )  # a plain model of the level has it
                    _assign(param, cuts.get(name, []), value, vertex.name)
                _copy_buffers(skeleton, vertex.module, vertex.name)

    def copy_to_base(self, plain: DagModule) -> None:
        """Copy the weights of the level in use into a plain model of that level (in place)."""
        for vertex, module in self._pairs(plain):
            with torch.no_grad():
                if not is_flex(module):
                    _copy_state(vertex.module, module, vertex.name)
                    continue
                skeleton, cuts = module.current()
                for name in module._parameters:
                    target = vertex.module._parameters[name]
                    if target is None:
                        continue
                    source = cast(
                        torch.Tensor, module.sliced(name, cuts)
                    )  # the plain model has it: so has this
                    _check_shape(target, source, vertex.name, name)
                    target.copy_(source)
                _copy_buffers(vertex.module, skeleton, vertex.name)

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

    def _plan(self) -> WidthPlan:
        if self._width_plan is None:
            self._width_plan = WidthPlan.rebuild(self)
        return self._width_plan

    # --- deltas -----------------------------------------------------------------------------------

    def export_level_delta(self):
        """(down, up) at the level L in use: `up` turns a plain model of level L-1 into level L, `down`
        one of level L+1 into level L (None where that level does not exist)."""
        level = self._require_level("export_level_delta")
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


def _check_shape(target: torch.Tensor, source: torch.Tensor, vertex: str, name: str) -> None:
    if target.shape != source.shape:
        raise DagError(
            f"vertex {vertex!r}: {name} has shape {tuple(target.shape)} in the plain model and "
            f"{tuple(source.shape)} at this level: the plain model is of another level"
        )


def _assign(
    param: torch.Tensor, axes: list[tuple[int, np.ndarray]], value: torch.Tensor, vertex: str
) -> None:
    """Write `value` into the positions of `param` that a level's cuts (`axes`) select."""
    index: list[Any] = [slice(None)] * param.dim()
    for k, (axis, positions) in enumerate(axes):
        shape = [1] * len(axes)
        shape[k] = -1
        index[axis] = torch.from_numpy(positions).to(param.device).reshape(shape)
    region = param[tuple(index)] if axes else param
    _check_shape(region, value, vertex, "a weight")
    param[tuple(index)] = value.to(param.dtype)


def _copy_buffers(target: nn.Module, source: nn.Module, vertex: str) -> None:
    for name, buffer in target._buffers.items():
        if buffer is not None:
            other = cast(torch.Tensor, source._buffers[name])  # the same layer at the same level: it has it
            _check_shape(buffer, other, vertex, name)
            buffer.copy_(other)


def _copy_state(target: nn.Module, source: nn.Module, vertex: str) -> None:
    theirs = source.state_dict()
    for key, tensor in target.state_dict(keep_vars=True).items():
        _check_shape(tensor, theirs[key], vertex, key)
        tensor.data.copy_(theirs[key])
