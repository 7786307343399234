"""`td.flex.Module`: the level API of every flexible module, a single layer or a model built from them.

The flexible layers (`Conv2d`, `Linear`, `BatchNorm2d`, `LayerNorm`, the layers `make_flexible` makes)
are its leaves; `MultiheadAttention` and a user's own class deriving from it (a flexible CNN or ViT block
written by hand) hold leaves as children, directly or inside plain containers. A module built from them
walks its leaves, which must all have the same number of levels:

    class Net(td.flex.Module):              # any nn.Module code, td.flex layers inside
        ...
    net.set_level_use(1); net.current_level(); net.max_level()
    plain = net.make_base_copy()            # the same class, plain torch layers of level 1's widths
    net.load_from_base(plain); net.copy_to_base(plain)
    down, up = net.export_level_delta()     # up.apply(plain_of_level_0) makes it level 1, in place

The parts of the model that are not td.flex layers are the same at every level (they are copied as they
are); a forward that reads widths from its layers (`reshape(b, n, -1, head_dim)`) runs at every level.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..core.errors import DagError

if TYPE_CHECKING:
    from .delta_level import LevelDelta


class Module(nn.Module):
    """A flexible module: its td.flex layers (the leaves) switch levels together."""

    def flex_leaves(self) -> list[tuple[str, Module]]:
        """(path, layer) of every flexible layer, in module order, each shared layer once."""
        found: list[tuple[str, Module]] = []
        _collect_leaves(self, "", found, set())
        return found

    def max_level(self) -> int:
        leaves = self.flex_leaves()
        counts = {path: leaf.max_level() for path, leaf in leaves}
        if not counts:
            raise DagError(
                f"{type(self).__name__} holds no td.flex layers: a flexible model is built from "
                "td.flex.Conv2d, Linear, BatchNorm2d, LayerNorm or MultiheadAttention"
            )
        if len(set(counts.values())) > 1:
            shown = ", ".join(f"{path or '(the model)'!r}: {n + 1}" for path, n in list(counts.items())[:8])
            raise DagError(
                f"{type(self).__name__}: its td.flex layers must all have the same number of levels, "
                f"found {shown}: give every layer one width per level"
            )
        return next(iter(counts.values()))

    def current_level(self) -> int | None:
        """The level in use (None while its layers are at different levels or custom widths)."""
        self.max_level()  # the layers agree on their levels
        levels = {leaf.current_level() for _, leaf in self.flex_leaves()}
        return levels.pop() if len(levels) == 1 else None

    def set_level_use(self, level: int) -> None:
        top = self.max_level()
        if not isinstance(level, (int, np.integer)) or isinstance(level, bool) or not 0 <= level <= top:
            raise DagError(f"level {level!r} does not exist: this flexible model has levels 0..{top}")
        for _, child in _top_flex_children(self):
            child.set_level_use(int(level))

    def make_base_copy(self) -> nn.Module:
        """A plain, independent copy at the level in use: every flexible layer replaced by the plain torch
        layer of its width (`MultiheadAttention` by `SelfAttention`), everything else copied."""
        self.max_level()
        memo: dict[int, Any] = {id(child): child.make_base_copy() for _, child in _top_flex_children(self)}
        return copy.deepcopy(self, memo)

    def load_from_base(self, plain: nn.Module) -> None:
        """Copy a plain model's weights (of the level in use, e.g. from `make_base_copy`) into this one."""
        leaves = self.flex_leaves()
        for path, leaf in leaves:
            leaf.load_layer(submodule(plain, path, type(self).__name__), f"layer {path!r}")
        _copy_rest(self, plain, [path for path, _ in leaves], into_flexible=True)

    def copy_to_base(self, plain: nn.Module) -> None:
        """Copy the weights of the level in use into a plain model of that level (in place)."""
        leaves = self.flex_leaves()
        for path, leaf in leaves:
            leaf.copy_layer_to(submodule(plain, path, type(self).__name__), f"layer {path!r}")
        _copy_rest(self, plain, [path for path, _ in leaves], into_flexible=False)

    def load_layer(self, plain: nn.Module, where: str) -> None:
        """`load_from_base`, with errors naming the model's part as `where` (a flexible layer's own)."""
        self.load_from_base(plain)

    def copy_layer_to(self, plain: nn.Module, where: str) -> None:
        """`copy_to_base`, with errors naming the model's part as `where` (a flexible layer's own)."""
        self.copy_to_base(plain)

    def export_level_delta(self) -> tuple[LevelDelta | None, LevelDelta | None]:
        """(down, up) at the level L in use: `up.apply(plain)` turns a plain model of level L-1 (the
        output of `make_base_copy` there) into level L in place, `down` one of level L+1 (None where that
        level does not exist)."""
        from .delta_tree import module_level_delta

        return module_level_delta(self)


def _collect_leaves(module: nn.Module, prefix: str, found: list, seen: set[int]) -> None:
    for name, child in module.named_children():
        if id(child) in seen:
            continue
        seen.add(id(child))
        path = f"{prefix}{name}"
        if isinstance(child, Module):
            found.extend((f"{path}.{p}" if p else path, leaf) for p, leaf in child.flex_leaves())
        else:
            _collect_leaves(child, f"{path}.", found, seen)


def _top_flex_children(module: nn.Module) -> list[tuple[str, Module]]:
    """The flexible modules below `module` that no other flexible module below it holds."""
    found: list[tuple[str, Module]] = []
    todo: list[tuple[str, nn.Module]] = [("", module)]
    seen: set[int] = set()
    while todo:
        prefix, parent = todo.pop()
        for name, child in parent.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            if isinstance(child, Module):
                found.append((f"{prefix}{name}", child))
            else:
                todo.append((f"{prefix}{name}.", child))
    return found


def submodule(plain: nn.Module, path: str, what: str) -> nn.Module:
    """The layer at `path` of a plain model (`what`: the flexible model, for the error)."""
    if not path:
        return plain
    try:
        return plain.get_submodule(path)
    except AttributeError:
        raise DagError(
            f"the plain model has no layer {path!r}, which the flexible {what} has: give a plain model "
            "of the same structure (make_base_copy() makes one)"
        ) from None


def _under(key: str, paths: list[str]) -> bool:
    return any(not p or key.startswith(p + ".") for p in paths)


def _copy_rest(flexible: nn.Module, plain: nn.Module, leaves: list[str], into_flexible: bool) -> None:
    """Copy the tensors outside the flexible layers (`leaves`), which are the same at every level, from
    the plain model into the flexible one or back; both must have the same ones."""
    ours = {k: t for k, t in flexible.state_dict(keep_vars=True).items() if not _under(k, leaves)}
    theirs = {k: t for k, t in plain.state_dict(keep_vars=True).items() if not _under(k, leaves)}
    if ours.keys() != theirs.keys():
        raise DagError(
            f"the plain model's tensors outside the flexible layers differ from the flexible model's: "
            f"only in the plain one {sorted(theirs.keys() - ours.keys())[:4]}, only in the flexible one "
            f"{sorted(ours.keys() - theirs.keys())[:4]}: give a plain model of the same structure "
            "(make_base_copy() makes one)"
        )
    with torch.no_grad():
        for key, tensor in ours.items():
            check_shape(theirs[key], tensor, "the model", key)
            target, source = (tensor, theirs[key]) if into_flexible else (theirs[key], tensor)
            target.copy_(source)


def check_shape(target: torch.Tensor, source: torch.Tensor, where: str, name: str) -> None:
    if target.shape != source.shape:
        raise DagError(
            f"{where}: {name} has shape {tuple(target.shape)} in the plain model and "
            f"{tuple(source.shape)} at this level: the plain model is of another level"
        )


def flexible_model_copy(source: nn.Module, target: nn.Module) -> None:
    """Copy the weights of one model into the other, one flexible (a `td.flex.Module` or a flexible DAG,
    at its level in use) and one plain of that level, either way round."""
    load, store = getattr(target, "load_from_base", None), getattr(source, "copy_to_base", None)
    if callable(load):
        load(source)
    elif callable(store):
        store(target)
    else:
        raise DagError(
            f"flexible_model_copy copies between a flexible model and a plain one, got a "
            f"{type(source).__name__} and a {type(target).__name__}"
        )
