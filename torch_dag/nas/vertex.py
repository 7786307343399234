"""The mutable vertex: a custom op holding named candidate modules (same inputs, same output shape), of
which one, the current choice, runs. FLOP counting and the in-place analysis see the chosen candidate
through the core's `LayerProxy` protocol (`current_layer()`).

Two ops share the class: `MutableElementwise` when every candidate is an element-wise op (an
activation: channels pass through, so a flexible DAG's channel analysis sees through it) and `Mutable`
for anything else (kernel sizes, blocks: their channels are fixed for pruning).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..core.errors import DagError
from ..core.ops import is_dag_module, op_name
from ..core.traits import Trait, has_trait
from ..flex.modules import is_flex

MutableKind = Literal["op", "value"]


class MutableOp(nn.Module):
    """Named candidates, their choice values (candidate names for op mutables, ints for value mutables),
    the choices still allowed (one after `fix_chosen`) and the one in use."""

    def __init__(
        self,
        candidates: dict[str, nn.Module],
        kind: MutableKind = "op",
        values: Sequence[Any] | None = None,
        chosen: str | None = None,
        allowed: Sequence[str] | None = None,
    ):
        super().__init__()
        if not candidates:
            raise DagError("a mutable vertex needs at least one candidate")
        self.candidates = nn.ModuleDict(candidates)
        self.kind: MutableKind = kind
        self.arity: int = 1  # positional inputs the candidates take (how the file stores them)
        names = list(candidates)
        self.values: list[Any] = list(values) if values is not None else names
        if len(self.values) != len(names) or len(set(map(repr, self.values))) != len(names):
            raise DagError(f"a mutable vertex needs one distinct value per candidate, got {self.values}")
        self.allowed: list[str] = list(allowed) if allowed is not None else names
        unknown = [a for a in self.allowed if a not in candidates]
        if unknown or not self.allowed:
            raise DagError(f"allowed choices {self.allowed} must be candidates among {names}")
        self.chosen: str = chosen if chosen is not None else self.allowed[-1]
        if self.chosen not in self.allowed:
            raise DagError(f"choice {self.chosen!r} is not among the allowed candidates {self.allowed}")

    def name_of(self, value: Any) -> str:
        """The candidate whose choice value is `value`."""
        for name, own in zip(self.candidates, self.values):
            if own == value and type(own) is type(value):
                return name
        raise DagError(f"{value!r} is not a choice of this mutable; its choices are {self.choices}")

    @property
    def choices(self) -> list[Any]:
        return [v for n, v in zip(self.candidates, self.values) if n in self.allowed]

    @property
    def current_value(self) -> Any:
        return self.values[list(self.candidates).index(self.chosen)]

    def choose(self, value: Any) -> None:
        name = self.name_of(value)
        if name not in self.allowed:
            raise DagError(f"{value!r} is fixed out of this mutable: its choices are {self.choices}")
        self.chosen = name

    def current_layer(self) -> nn.Module:
        """The candidate in use (the core's `LayerProxy`: FLOPs count what runs); a flexible candidate
        (a kernel size of a flexible conv) as a plain copy of its layer at the widths in use."""
        chosen = self.candidates[self.chosen]
        if not is_flex(chosen):
            return chosen
        plain = chosen.make_base_copy()
        # kept until the next call: analyses tell parameters apart by id, and a copy freed at once could
        # hand its ids to the next one (counted as seen)
        object.__setattr__(self, "_layer_in_use", plain)
        return plain

    def width_layer(self) -> nn.Module:
        """The candidate a flexible DAG's channel analysis reads (`td.flex` widths): the block of a
        skippable vertex (the identity drops its channels, it adds none), else the candidate in use
        (kernel sizes, activations: every candidate carries the channels alike)."""
        blocks = [c for c in self.candidates.values() if is_dag_module(c)]
        return blocks[0] if blocks else self.candidates[self.chosen]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.candidates[self.chosen](*args, **kwargs)
        if isinstance(out, torch.Tensor) and _shares_storage(out, args):
            # the DAG's in-place plan was made at another choice, which may have made fresh storage:
            # an aliasing candidate (an identity) hands out a copy, so later in-place ops spare its input
            out = out.clone()
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind}, choices={self.choices}, chosen={self.current_value!r}"


class ElementwiseMutableOp(MutableOp):
    """A mutable whose candidates are all element-wise ops of one input (activations)."""


def _shares_storage(out: torch.Tensor, args: tuple) -> bool:
    pointer = out.untyped_storage().data_ptr()
    return any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == pointer for a in args)


def is_mutable(module: nn.Module) -> bool:
    return isinstance(module, MutableOp)


def elementwise(candidates: dict[str, nn.Module]) -> bool:
    """Whether every candidate is an element-wise op of the vocabulary, an identity or a dropout (one
    output value per position: channels pass through it)."""
    for module in candidates.values():
        if is_dag_module(module):
            return False
        try:
            op = op_name(module)
        except Exception:
            return False
        if not any(has_trait(op, t) for t in (Trait.ELEMENTWISE, Trait.IDENTITY, Trait.DROPOUT)):
            return False
    return True


def mutable_op(
    candidates: dict[str, nn.Module],
    kind: MutableKind = "op",
    values: Sequence[Any] | None = None,
    chosen: str | None = None,
    allowed: Sequence[str] | None = None,
) -> MutableOp:
    """The mutable vertex module for `candidates`: the element-wise op where every candidate is one."""
    cls = ElementwiseMutableOp if elementwise(candidates) else MutableOp
    return cls(candidates, kind, values, chosen, allowed)


def mutable_vertices(dag: Any) -> Iterator[tuple[str, MutableOp]]:
    """(vertex name, module) of every mutable vertex of `dag`, those in nested DAGs and in block
    candidates included (after the vertex holding them)."""
    for vertex in dag:  # a DagModule: its vertices
        module = vertex.module
        if is_mutable(module):
            yield vertex.name, module
            for candidate in module.candidates.values():
                if is_dag_module(candidate):
                    yield from mutable_vertices(candidate)
        elif is_dag_module(module):
            yield from mutable_vertices(module)
