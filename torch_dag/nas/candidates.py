"""What a mutable vertex may become: named modules (copied per vertex), factories of the vertex's module,
and the value helpers: kernel sizes of k x k convs and depth (a residual block or nothing)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..core.errors import DagError
from ..flex.modules import FlexModule, is_flex
from ..flex.widths import full_view
from ..serde.limits import valid_name
from .vertex import MutableKind

Factory = Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class Built:
    """The candidates made for one vertex: names, modules, choice values, the one matching the vertex."""

    kind: MutableKind
    modules: dict[str, nn.Module]
    values: list[Any]
    chosen: str | None = None


@dataclass(frozen=True)
class KernelSizes:
    """Kernel sizes of a k x k convolution (`kernel_sizes(3, 5, 7)`): a larger kernel is the original
    zero-padded (so it starts equal), a smaller one its centre; padding keeps the output size."""

    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.sizes or any(type(s) is not int or s < 1 or s % 2 == 0 for s in self.sizes):
            raise DagError(f"kernel_sizes takes odd positive integers, got {self.sizes}")
        if len(set(self.sizes)) != len(self.sizes):
            raise DagError(f"kernel_sizes takes distinct sizes, got {self.sizes}")

    def build(self, module: nn.Module, where: str) -> Built:
        """One candidate per size; a flexible conv's are flexible convs with the same cuts (levels and
        widths read the same channels of each), each with its own full-width kernel."""
        flexible = module if is_flex(module) else None
        if flexible is not None:
            module = full_view(flexible)
        if type(module) is not nn.Conv2d:
            raise DagError(
                f"{where}: kernel_sizes applies to Conv2d vertices, this one is {type(module).__name__}"
            )
        k, dilation = module.kernel_size, module.dilation
        if k[0] != k[1] or dilation[0] != dilation[1] or module.padding_mode != "zeros":
            raise DagError(f"{where}: kernel_sizes needs a square kernel, equal dilations and zero padding")
        if module.padding != ((k[0] // 2) * dilation[0],) * 2:
            raise DagError(
                f"{where}: padding {module.padding} does not keep the output size (kernel {k[0]}, dilation "
                f"{dilation[0]} needs {(k[0] // 2) * dilation[0]}), so other kernel sizes would change it"
            )
        modules: dict[str, nn.Module] = {
            f"k{s}": resized_conv(module, s) if flexible is None else resized_flex(flexible, s)
            for s in sorted(self.sizes)
        }
        chosen = f"k{k[0]}" if k[0] in self.sizes else None
        return Built("value", modules, sorted(self.sizes), chosen)


@dataclass(frozen=True)
class Skippable:
    """Depth: a residual block `y = x + f(x)` becomes a mutable {"block": f and the add, "identity"}."""


def kernel_sizes(*sizes: int) -> KernelSizes:
    """Candidates for every matched k x k Conv2d: one kernel size each, e.g. `kernel_sizes(3, 5, 7)`."""
    return KernelSizes(tuple(sizes))


def skippable() -> Skippable:
    """Candidates for residual blocks (use with the `residual` pattern): the block, or the identity."""
    return Skippable()


def named_candidates(candidates: Mapping[str, nn.Module | Factory], module: nn.Module, where: str) -> Built:
    """{name: module} copied for this vertex, or {name: factory(vertex module)}."""
    if not candidates:
        raise DagError("give at least one candidate")
    modules = {}
    for name, candidate in candidates.items():
        if not valid_name(name):
            raise DagError(
                f"candidate name {name!r} must be an identifier (it names a submodule and a choice)"
            )
        if isinstance(candidate, nn.Module):
            modules[name] = copy.deepcopy(candidate)
        elif callable(candidate):
            made = candidate(module)
            if not isinstance(made, nn.Module):
                raise DagError(f"{where}: candidate {name!r} made a {type(made).__name__}, not an nn.Module")
            modules[name] = made
        else:
            raise DagError(f"candidate {name!r} must be an nn.Module or a callable(module) -> module")
    return Built("op", modules, list(modules))


def resized_flex(flex: FlexModule, size: int) -> FlexModule:
    """A flexible conv of kernel `size` from a flexible conv: its full-width kernel resized as
    `resized_conv` does, every level's layer (and custom widths in use) resized alike, the same cuts; at
    the same level or widths."""
    full = resized_conv(cast(nn.Conv2d, full_view(flex)), size)
    levels = [resized_conv(cast(nn.Conv2d, flex.materialize(i)), size) for i in range(flex.num_levels)]
    resized = FlexModule(full, levels, flex.cuts)
    if flex.custom is not None:
        resized.set_custom(resized_conv(cast(nn.Conv2d, flex.materialize()), size), flex.custom[1])
    else:
        resized.set_level(cast(int, flex.level))
    resized.train(flex.training)
    return resized


def resized_conv(conv: nn.Conv2d, size: int) -> nn.Conv2d:
    """`conv` with kernel `size`: the weights zero-padded around (larger) or cropped to the centre."""
    k, dilation = conv.kernel_size[0], conv.dilation[0]
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        size,
        stride=conv.stride,  # type: ignore[arg-type]
        padding=(size // 2) * dilation,
        dilation=dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        if size >= k:
            start = (size - k) // 2
            new.weight[:, :, start : start + k, start : start + k] = conv.weight
        else:
            start = (k - size) // 2
            new.weight.copy_(conv.weight[:, :, start : start + size, start : start + size])
        if conv.bias is not None and new.bias is not None:
            new.bias.copy_(conv.bias)
    new.train(conv.training)
    return new
