"""Flexible atomic modules: one layer that runs at several widths (levels) from one set of weights.

A `FlexModule` holds the full-width parameters once. For each level it keeps a *skeleton*: the layer as
it is at that level (its config, and its own buffers, so a batchnorm has statistics per level) with no
parameters, plus which indices along which axes of each parameter the level reads. Levels are nested:
level i's channels contain level i-1's. At run time the skeleton is called with the sliced parameters,
so gradients reach the shared full-width weights from every level.

The hand-written building blocks (`Conv2d`, `Linear`, `BatchNorm2d`, `LayerNorm`, `MultiheadAttention`)
use prefixes of the channels; `make_flexible` builds the same `FlexModule` after sorting channels by
importance, so its levels too take prefixes (of each run of a group's channels, e.g. per attention
projection); both kinds convert, save, load and move between levels alike. Contiguous index sets are
read as views (`narrow`), others with `index_select`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, TypeGuard, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import DagError
from .base import Module, check_shape

# attr -> [(axis, indices kept along it)]; indices are sorted and nested from level to level
Cuts = dict[str, list[tuple[int, np.ndarray]]]


class FlexModule(Module):
    """A layer whose level i uses the channels `cuts[i]` of shared full-width parameters.

    `full` is the layer at full width and `levels[i]` the layer at level i; both are used without their
    parameters (the flexible module owns them). `level` is the level in use (the last one to start).
    It is a `td.flex.Module` of one leaf, itself: `set_level_use`, `make_base_copy`, `load_from_base`...
    """

    def __init__(self, full: nn.Module, levels: Sequence[nn.Module], cuts: Sequence[Cuts]):
        super().__init__()
        if len(levels) != len(cuts) or not levels:
            raise DagError(
                f"a flexible layer needs one skeleton and one cut per level, got {len(levels)} "
                f"and {len(cuts)}"
            )
        if any(p is not None for m in full.children() for p in m.parameters()):
            raise DagError(
                f"{type(full).__name__}: only layers whose parameters are their own can be flexible"
            )
        for name, param in full._parameters.items():  # None (bias=False) too: the skeletons read it
            self.register_parameter(name, param)
        self.full = _skeleton(full)
        self.levels = nn.ModuleList(_skeleton(m) for m in levels)
        self.cuts = [
            {attr: [(int(a), np.asarray(i, dtype=np.int64)) for a, i in axes] for attr, axes in c.items()}
            for c in cuts
        ]
        self.level: int | None = len(levels) - 1
        self.custom: tuple[nn.Module, Cuts] | None = None  # set by `set_widths`: a width not among the levels
        self._index_cache: dict[tuple, torch.Tensor | tuple[int, int]] = {}

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def op(self) -> str:
        """The op of the layer it makes flexible (`Conv2d`, `Linear`, ...)."""
        from ..core.ops import op_name

        return op_name(self.full)

    def set_level(self, level: int) -> None:
        if not 0 <= level < len(self.levels):
            raise DagError(f"level {level} does not exist: this layer has levels 0..{len(self.levels) - 1}")
        self.level, self.custom = level, None

    # --- the td.flex.Module API of one layer ------------------------------------------------------

    def flex_leaves(self) -> list[tuple[str, Module]]:
        return [("", self)]

    def max_level(self) -> int:
        return len(self.levels) - 1

    def current_level(self) -> int | None:
        """The level in use (None while custom widths are set)."""
        return self.level

    def set_level_use(self, level: int) -> None:
        if not isinstance(level, (int, np.integer)) or isinstance(level, bool):
            raise DagError(f"level {level!r} does not exist: this layer has levels 0..{self.max_level()}")
        self.set_level(int(level))

    def make_base_copy(self) -> nn.Module:
        """The plain torch layer of the level in use (an independent copy)."""
        plain = self.materialize()
        plain.train(self.training)
        return plain

    def load_from_base(self, plain: nn.Module) -> None:
        self.load_layer(plain, f"a flexible {self.op}")

    def copy_to_base(self, plain: nn.Module) -> None:
        self.copy_layer_to(plain, f"a flexible {self.op}")

    def load_layer(self, plain: nn.Module, where: str) -> None:
        """Write a plain layer of the width in use (its weights and buffers) into this layer."""
        skeleton, cuts = self._matching(plain, where)
        with torch.no_grad():
            for name, param in self._parameters.items():
                if param is not None:
                    value = cast(torch.Tensor, plain._parameters[name])  # checked by `_matching`
                    _assign(param, cuts.get(name, []), value, f"{where}, {name}")
            _copy_buffers(skeleton, plain, where)

    def copy_layer_to(self, plain: nn.Module, where: str) -> None:
        """Write the weights and buffers of the width in use into a plain layer of that width."""
        skeleton, cuts = self._matching(plain, where)
        with torch.no_grad():
            for name in self._parameters:
                target = plain._parameters[name]
                if target is not None:
                    source = cast(torch.Tensor, self.sliced(name, cuts))  # checked by `_matching`
                    check_shape(target, source, where, name)
                    target.copy_(source)
            _copy_buffers(plain, skeleton, where)

    def _matching(self, plain: nn.Module, where: str) -> tuple[nn.Module, Cuts]:
        skeleton, cuts = self.current()
        mine = {k for k, v in self._parameters.items() if v is not None}
        theirs = {k for k, v in plain._parameters.items() if v is not None}
        if type(plain) is not type(skeleton) or mine != theirs:
            raise DagError(
                f"{where}: the plain layer is a {type(plain).__name__} with parameters {sorted(theirs)}, "
                f"expected a {type(skeleton).__name__} with {sorted(mine)} ({_describe(skeleton)})"
            )
        return skeleton, cuts

    def set_custom(self, skeleton: nn.Module, cuts: Cuts) -> None:
        """Run at widths that are not one of the levels (`FlexDagModule.set_widths`)."""
        self.level, self.custom = None, (_skeleton(skeleton), cuts)

    def current(self) -> tuple[nn.Module, Cuts]:
        """The skeleton and cuts in use."""
        if self.custom is not None:
            return self.custom
        level = cast(int, self.level)  # None only while custom widths are set
        return self.levels[level], self.cuts[level]

    def sliced(self, name: str, cuts: Cuts) -> torch.Tensor | None:
        """Parameter `name` as a level reads it (a view where its indices are a contiguous range)."""
        tensor: torch.Tensor | None = self._parameters[name]
        if tensor is None:
            return None
        for axis, index in cuts.get(name, ()):
            key = (id(index), tensor.device)
            where = self._index_cache.get(key)
            if where is None:
                where = _as_range(index) or torch.from_numpy(index).to(tensor.device)
                self._index_cache[key] = where
            tensor = (
                tensor.narrow(axis, *where) if isinstance(where, tuple) else tensor.index_select(axis, where)
            )
        return tensor

    def current_layer(self) -> nn.Module:
        """The plain layer at the width in use (the core's `LayerProxy` protocol: FLOPs, aliasing)."""
        return self.view()

    def view(self, level: int | None = None) -> nn.Module:
        """The layer at `level` (default: the one in use) reading the shared parameters, for inspection
        (FLOP counting, configs); not registered anywhere, not for training."""
        skeleton, cuts = self.current() if level is None else (self.levels[level], self.cuts[level])
        view = copy.copy(skeleton)
        view.__dict__.update({name: self.sliced(name, cuts) for name in self._parameters})
        return view

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        skeleton, cuts = self.current()
        state = skeleton.__dict__
        for name in self._parameters:
            state[name] = self.sliced(name, cuts)
        try:
            return skeleton(*args, **kwargs)
        except Exception as error:
            where = (
                f"level {self.level} of 0..{len(self.levels) - 1}" if self.custom is None else "custom widths"
            )
            if hasattr(error, "add_note"):
                error.add_note(f"in a flexible {self.op} at {where} ({_describe(skeleton)})")
            raise
        finally:
            for name in self._parameters:
                state.pop(name, None)

    def materialize(self, level: int | None = None) -> nn.Module:
        """A plain, independent copy of the layer at `level` (default: the one in use)."""
        skeleton, cuts = self.current() if level is None else (self.levels[level], self.cuts[level])
        plain = copy.deepcopy(skeleton)
        for name, param in self._parameters.items():
            if param is None:
                plain._parameters[name] = None
                continue
            value = cast(torch.Tensor, self.sliced(name, cuts)).detach().clone()  # param is not None
            plain._parameters[name] = nn.Parameter(value, requires_grad=param.requires_grad)
        return plain

    def __deepcopy__(self, memo: dict[int, Any]) -> FlexModule:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        state = {k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k != "_index_cache"}
        clone.__dict__.update(state)
        clone._index_cache = {}
        return clone

    def extra_repr(self) -> str:
        return f"{self.op}, levels: " + ", ".join(_describe(m) for m in self.levels)

    def __repr__(self) -> str:  # the skeletons have no parameters for their own reprs to read
        return f"{type(self).__name__}({self.extra_repr()})"


def _skeleton(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` without parameters (buffers kept)."""
    skeleton = copy.copy(module)
    skeleton._parameters = {}
    skeleton._buffers = dict(module._buffers)
    skeleton._modules = dict(module._modules)
    return skeleton


def _assign(param: torch.Tensor, axes: list[tuple[int, np.ndarray]], value: torch.Tensor, where: str) -> None:
    """Write `value` into the positions of `param` that a level's cuts (`axes`) select."""
    index: list[Any] = [slice(None)] * param.dim()
    for k, (axis, positions) in enumerate(axes):
        shape = [1] * len(axes)
        shape[k] = -1
        index[axis] = torch.from_numpy(positions).to(param.device).reshape(shape)
    region = param[tuple(index)] if axes else param
    check_shape(value, region, where, "the tensor")
    param[tuple(index)] = value.to(param.dtype)


def _copy_buffers(target: nn.Module, source: nn.Module, where: str) -> None:
    for name, buffer in target._buffers.items():
        if buffer is not None:
            other = source._buffers.get(name)
            if other is None:
                raise DagError(f"{where}: the plain layer has no buffer {name!r}")
            check_shape(buffer, other, where, name)
            buffer.copy_(other)


def _as_range(index: np.ndarray) -> tuple[int, int] | None:
    """(start, length) when `index` is a contiguous run of integers."""
    if len(index) and index[-1] - index[0] + 1 == len(index):
        return int(index[0]), len(index)
    return None


def _describe(module: nn.Module) -> str:
    for a, b in (("in_channels", "out_channels"), ("in_features", "out_features")):
        if hasattr(module, a):
            return f"{getattr(module, a)}->{getattr(module, b)}"
    for attr in ("num_features", "normalized_shape", "num_channels"):
        if hasattr(module, attr):
            return f"{attr}={getattr(module, attr)}"
    return type(module).__name__


# --- hand-written building blocks -----------------------------------------------------------------


def _prefixes(counts: Sequence[int], what: str) -> list[np.ndarray]:
    counts = [int(c) for c in counts]
    if not counts or any(c < 1 for c in counts) or counts != sorted(counts):
        raise DagError(f"{what} per level must be positive and non-decreasing, got {counts}")
    return [np.arange(c) for c in counts]


def _levels(counts_in: Sequence[int], counts_out: Sequence[int]) -> int:
    if len(counts_in) != len(counts_out):
        raise DagError(
            f"one input and one output width per level: got {len(counts_in)} and {len(counts_out)}"
        )
    return len(counts_in)


class Conv2d(FlexModule):
    """`nn.Conv2d` whose level i maps `in_channels[i]` inputs to `out_channels[i]` outputs (prefixes of
    one shared weight); `groups` (the same at every level) must divide every width."""

    def __init__(
        self, in_channels: Sequence[int], out_channels: Sequence[int], kernel_size: Any, **kwargs: Any
    ):
        n = _levels(in_channels, out_channels)
        ins, outs = _prefixes(in_channels, "in_channels"), _prefixes(out_channels, "out_channels")
        full = nn.Conv2d(len(ins[-1]), len(outs[-1]), kernel_size, **kwargs)
        groups = full.groups
        if 1 < groups < full.in_channels:
            raise DagError(
                "a hand-written flexible Conv2d is dense or depthwise; grouped convs become "
                "flexible through make_flexible, which keeps their group structure"
            )
        levels, cuts = [], []
        for i in range(n):
            level = copy.copy(full)
            level.in_channels, level.out_channels = len(ins[i]), len(outs[i])
            if groups > 1 and groups == full.in_channels:  # depthwise: one channel per group
                level.groups = len(ins[i])
                cut = {"weight": [(0, outs[i])]}
            else:
                cut = {"weight": [(0, outs[i]), (1, ins[i])]}
            if full.bias is not None:
                cut["bias"] = [(0, outs[i])]
            levels.append(level)
            cuts.append(cut)
        super().__init__(full, levels, cuts)


class Linear(FlexModule):
    """`nn.Linear` whose level i maps `in_features[i]` to `out_features[i]` (prefixes of one weight)."""

    def __init__(self, in_features: Sequence[int], out_features: Sequence[int], bias: bool = True):
        n = _levels(in_features, out_features)
        ins, outs = _prefixes(in_features, "in_features"), _prefixes(out_features, "out_features")
        full = nn.Linear(len(ins[-1]), len(outs[-1]), bias=bias)
        levels, cuts = [], []
        for i in range(n):
            level = copy.copy(full)
            level.in_features, level.out_features = len(ins[i]), len(outs[i])
            cut = {"weight": [(0, outs[i]), (1, ins[i])]}
            if bias:
                cut["bias"] = [(0, outs[i])]
            levels.append(level)
            cuts.append(cut)
        super().__init__(full, levels, cuts)


def _norm_levels(full: nn.Module, counts: Sequence[int], configure) -> tuple[list[nn.Module], list[Cuts]]:
    levels, cuts = [], []
    for index in _prefixes(counts, "num_features"):
        level = copy.copy(full)
        level._buffers = {
            k: (None if v is None else v[: len(index)].clone() if v.dim() else v.clone())
            for k, v in full._buffers.items()
        }
        configure(level, len(index))
        levels.append(level)
        cuts.append({k: [(0, index)] for k, v in full._parameters.items() if v is not None})
    return levels, cuts


class BatchNorm2d(FlexModule):
    """`nn.BatchNorm2d` over `num_features[i]` channels at level i, with running statistics per level."""

    def __init__(self, num_features: Sequence[int], **kwargs: Any):
        full = nn.BatchNorm2d(int(num_features[-1]), **kwargs)
        levels, cuts = _norm_levels(full, num_features, lambda m, n: setattr(m, "num_features", n))
        super().__init__(full, levels, cuts)


class LayerNorm(FlexModule):
    """`nn.LayerNorm` over the last `normalized_shape[i]` features at level i."""

    def __init__(self, normalized_shape: Sequence[int], **kwargs: Any):
        full = nn.LayerNorm(int(normalized_shape[-1]), **kwargs)
        levels, cuts = _norm_levels(full, normalized_shape, lambda m, n: setattr(m, "normalized_shape", (n,)))
        super().__init__(full, levels, cuts)


class SelfAttention(nn.Module):
    """Plain self-attention over tokens (B x N x embed_dim): `q`, `k`, `v` project to `width` features
    (heads of `head_dim`), `proj` back to `embed_dim`; the plain form of a flexible `MultiheadAttention`
    at one level (its `make_base_copy`)."""

    def __init__(self, embed_dim: int, width: int, head_dim: int, bias: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v = (nn.Linear(embed_dim, width, bias) for _ in range(3))
        self.proj = nn.Linear(width, embed_dim, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _attend(self, x)


class MultiheadAttention(Module):
    """Self-attention over tokens (B x N x embed_dim) with `num_heads[i]` heads of `head_dim` at level i
    (a prefix of the heads in the query, key, value and output projections). Built from flexible
    `Linear`s and the vocabulary's attention op, so a model using it converts like any other; its plain
    form at a level is a `SelfAttention`."""

    def __init__(
        self, embed_dim: int | Sequence[int], num_heads: Sequence[int], head_dim: int, bias: bool = True
    ):
        super().__init__()
        widths = [h * head_dim for h in num_heads]
        embed = list(embed_dim) if isinstance(embed_dim, Sequence) else [embed_dim] * len(widths)
        self.head_dim = head_dim
        self.q, self.k, self.v = (Linear(embed, widths, bias) for _ in range(3))
        self.proj = Linear(widths, embed, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _attend(self, x)

    def make_base_copy(self) -> nn.Module:
        q = cast(nn.Linear, self.q.make_base_copy())
        plain = SelfAttention(q.in_features, q.out_features, self.head_dim, q.bias is not None)
        for name in ("q", "k", "v", "proj"):
            setattr(plain, name, cast(FlexModule, getattr(self, name)).make_base_copy())
        return plain.train(self.training)


def _attend(attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Self-attention of `attention`'s projections (`q`, `k`, `v`, `proj`) with heads of `head_dim`."""
    head_dim = cast(int, attention.head_dim)
    project = [cast(nn.Module, getattr(attention, name)) for name in ("q", "k", "v", "proj")]
    b, n = x.shape[0], x.shape[1]
    q, k, v = (f(x).reshape(b, n, -1, head_dim).transpose(1, 2) for f in project[:3])
    out = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(head_dim))
    return project[3](out.transpose(1, 2).reshape(b, n, -1))


def flex_layers(module: nn.Module) -> list[FlexModule]:
    return [m for m in module.modules() if isinstance(m, FlexModule)]


def is_flex(module: nn.Module) -> TypeGuard[FlexModule]:
    """A flexible layer (`FlexModule`, hand-written or made by `make_flexible`)."""
    return isinstance(module, FlexModule)


def index_runs(index: np.ndarray) -> list[list[int]]:
    """Sorted indices as runs [start, stop)."""
    if not len(index):
        return []
    breaks = np.flatnonzero(np.diff(index) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(index)]])
    return [[int(index[a]), int(index[b - 1]) + 1] for a, b in zip(starts, stops)]
