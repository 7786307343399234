"""`Mutable`: one searchable choice of a DAG, read and set through the DAG itself (so two handles on the
same DAG agree): a mutable vertex's candidates (kind "op" or "value") or a flexible group's width
(kind "channel")."""

from __future__ import annotations

import random
from typing import Any

import torch

from ..analysis.flops import count_flops
from ..core.dag import DagModule, Vertex, evaluating
from ..core.errors import DagError
from ..core.ops import is_dag_module
from ..core.template import Ref
from ..flex.model import FlexDagModule
from . import channels
from .vertex import MutableOp, mutable_vertices


class Mutable:
    """A choice of a searchable DAG: `choices`, `current_choice` (settable: the DAG computes it),
    `sample_choice`, `fix_chosen`, `dump_chosen`, and the choices of most and fewest FLOPs."""

    name: str
    kind: str

    @property
    def choices(self) -> list[Any]:
        raise NotImplementedError

    @property
    def current_choice(self) -> Any:
        raise NotImplementedError

    @current_choice.setter
    def current_choice(self, value: Any) -> None:
        self._set(value)

    def _set(self, value: Any) -> None:
        raise NotImplementedError

    def fix_chosen(self, value: Any) -> None:
        """Freeze the mutable at `value` (its only choice from now on, saved with the DAG)."""
        raise NotImplementedError

    @property
    def num_choices(self) -> int:
        return len(self.choices)

    @property
    def is_fixed(self) -> bool:
        return self.num_choices == 1

    def sample_choice(self, rng: random.Random | None = None) -> Any:
        return (rng or random).choice(self.choices)

    def dump_chosen(self) -> Any:
        return self.current_choice

    @property
    def largest(self) -> Any:
        return self.choices[-1]

    @property
    def smallest(self) -> Any:
        return self.choices[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, kind={self.kind}, choices={self.choices}, current={self.current_choice!r})"


class VertexMutable(Mutable):
    """A mutable vertex (possibly inside a block candidate): its candidates' names or values."""

    def __init__(self, sdag: DagModule, module: MutableOp, name: str):
        self.sdag, self.module, self.name, self.kind = sdag, module, name, module.kind

    @property
    def choices(self) -> list[Any]:
        return self.module.choices

    @property
    def current_choice(self) -> Any:
        return self.module.current_value

    @current_choice.setter
    def current_choice(self, value: Any) -> None:
        self._set(value)

    def _set(self, value: Any) -> None:
        try:
            self.module.choose(value)
        except DagError as e:
            raise DagError(f"mutable {self.name!r}: {e}") from None

    def fix_chosen(self, value: Any) -> None:
        self._set(value)
        self.module.allowed = [self.module.chosen]

    @property
    def largest(self) -> Any:
        flops = self._flops()
        return max(self.choices, key=lambda c: (flops[c], -self.choices.index(c)))

    @property
    def smallest(self) -> Any:
        flops = self._flops()
        return min(self.choices, key=lambda c: (flops[c], self.choices.index(c)))

    def _flops(self) -> dict[Any, int]:
        """Each allowed candidate's FLOPs on the inputs the vertex gets in the DAG (example inputs)."""
        cache = self.sdag.__dict__.setdefault("_nas_flops", {})
        key = (self.name, tuple(map(repr, self.choices)), _widths_key(self.sdag))
        if key not in cache:
            args = _vertex_inputs(self.sdag, self.module)
            cache[key] = {
                value: _candidate_flops(self.module.candidates[self.module.name_of(value)], args)
                for value in self.choices
            }
        return cache[key]


class ChannelMutable(Mutable):
    """The width of one prunable channel group of a flexible DAG, as a kept fraction."""

    kind = "channel"

    def __init__(self, sdag: FlexDagModule, index: int, name: str):
        self.sdag, self.index, self.name = sdag, index, name

    @property
    def choices(self) -> list[Any]:
        return channels.grid(self.sdag, self.index)

    @property
    def current_choice(self) -> Any:
        return channels.current(self.sdag)[self.index]

    @current_choice.setter
    def current_choice(self, value: Any) -> None:
        self._set(value)

    def _set(self, value: Any) -> None:
        if not isinstance(value, (int, float)) or not any(value == c for c in self.choices):
            raise DagError(f"mutable {self.name!r}: {value!r} is not one of its choices {self.choices}")
        fractions = channels.current(self.sdag)
        fractions[self.index] = float(value)
        channels.apply(self.sdag, fractions)

    def fix_chosen(self, value: Any) -> None:
        self._set(value)
        channels.set_grid(self.sdag, self.name, [float(value)])


def _widths_key(sdag: DagModule) -> tuple:
    """What the inputs of mutable vertices depend on besides the example inputs: the channel widths."""
    if isinstance(sdag, FlexDagModule) and sdag.width_info:
        return tuple(channels.current(sdag))
    return ()


def _vertex_inputs(sdag: DagModule, module: MutableOp) -> tuple[tuple, dict]:
    """The arguments `module` is called with when `sdag` runs on its example inputs (every mutable's,
    recorded in one run and kept until the widths change)."""
    key = _widths_key(sdag)
    cache = sdag.__dict__.setdefault("_nas_inputs", {})
    if key not in cache or id(module) not in cache[key]:
        cache.clear()
        cache[key] = _record_inputs(sdag)
    found = cache[key].get(id(module))
    if found is None:
        raise DagError("a mutable vertex did not run on the DAG's example inputs: its FLOPs are unknown")
    return found


def _record_inputs(sdag: DagModule) -> dict[int, tuple[tuple, dict]]:
    """Each mutable vertex's first call on the example inputs, with every block chosen (a mutable
    inside one runs only then)."""
    seen: dict[int, tuple[tuple, dict]] = {}

    def record(module: Any, args: tuple, kwargs: dict) -> None:
        seen.setdefault(id(module), (args, kwargs))

    was = {id(m): (m, m.chosen) for _, m in mutable_vertices(sdag)}
    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m, _ in was.values()]
    for other, _ in was.values():
        other.chosen = next((n for n in other.allowed if is_dag_module(other.candidates[n])), other.chosen)
    try:
        with torch.no_grad(), evaluating(sdag):
            sdag(*sdag.example_inputs())
    finally:
        for handle in handles:
            handle.remove()
        for other, chosen in was.values():
            other.chosen = chosen
    return seen


def _candidate_flops(candidate: Any, call: tuple[tuple, dict]) -> int:
    args, kwargs = call
    names = [f"x{i}" for i in range(len(args))]
    one = DagModule(
        names, [Vertex("candidate", candidate, tuple(Ref(n) for n in names), kwargs)], Ref("candidate")
    )
    return count_flops(one, *args).total_flops
