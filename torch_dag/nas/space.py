"""The search space of a searchable DAG as a whole: its mutables in a fixed order, choice dicts (dump,
set, sample, largest, smallest), the slimmable interface (`search_dim`, `decode`) and the plain
sub-network of a choice (`export_subnet`)."""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping, Sequence
from typing import Any

from ..core.dag import DagModule
from ..core.editor import Editor
from ..core.errors import DagError
from ..core.ops import is_dag_module
from ..flex.model import FlexDagModule
from . import channels
from .channels import DerivedWidth
from .mutable import ChannelMutable, Mutable, VertexMutable
from .vertex import is_mutable, mutable_vertices


def mutables(sdag: DagModule) -> list[Mutable]:
    """Every mutable of `sdag`: mutable vertices in graph order (those inside block candidates after
    their block), then, on a flexible DAG, one channel mutable per prunable channel group."""
    found: list[Mutable] = [VertexMutable(sdag, module, name) for name, module in mutable_vertices(sdag)]
    if isinstance(sdag, FlexDagModule) and sdag.width_info:
        found += [ChannelMutable(sdag, i, n) for i, n in enumerate(channels.channel_names(sdag))]
    names = [m.name for m in found]
    if len(set(names)) != len(names):
        raise DagError(f"mutable names are not unique: {sorted(n for n in names if names.count(n) > 1)}")
    return found


def derived(sdag: DagModule) -> list[DerivedWidth]:
    """The widths that follow channel mutables (kind "derived", no choice of their own)."""
    if isinstance(sdag, FlexDagModule) and sdag.width_info:
        return channels.derived(sdag)
    return []


def channel_grid(sdag: DagModule, fractions: Sequence[float], names: Sequence[str] | None = None) -> None:
    """Give channel mutables (all, or those named) the kept fractions `fractions` as choices (in place;
    saved with the DAG): a finer grid than the levels' for search."""
    values = sorted({float(f) for f in fractions})
    if not values or not all(0 < f <= 1 for f in values):
        raise DagError(f"channel_grid takes kept fractions in (0, 1], got {list(fractions)}")
    if not isinstance(sdag, FlexDagModule):
        raise DagError("channel mutables belong to flexible DAGs (td.make_flexible); this one is not")
    own = {m.name for m in mutables(sdag) if m.kind == "channel"}
    for name in names if names is not None else sorted(own):
        if name not in own:
            raise DagError(f"no channel mutable {name!r}; channel mutables: {sorted(own)}")
        channels.set_grid(sdag, name, values)


def dump_chosen(sdag: DagModule) -> dict[str, Any]:
    """{mutable name: its current choice}, JSON-able."""
    return {m.name: m.dump_chosen() for m in mutables(sdag)}


def set_chosen(sdag: DagModule, choice: Mapping[str, Any]) -> None:
    """Set every named mutable (in place). Unknown names or values raise `DagError` naming them; derived
    widths may be given and must equal what their sources give."""
    own = {m.name: m for m in mutables(sdag)}
    follows = {d.name: d for d in derived(sdag)}
    unknown = sorted(set(choice) - set(own) - set(follows))
    if unknown:
        raise DagError(f"no mutable named {unknown}; the mutables are {sorted(own)}")
    wrong = {n: v for n, v in choice.items() if n in own and not any(_same(v, c) for c in own[n].choices)}
    if wrong:
        raise DagError(
            "values outside the choices: "
            + "; ".join(f"{n} = {v!r} (choices {own[n].choices})" for n, v in wrong.items())
        )
    vertex = {n: v for n, v in choice.items() if n in own and own[n].kind != "channel"}
    for name, value in vertex.items():
        own[name].current_choice = value
    widths = [n for n in choice if n in own and own[n].kind == "channel"]
    if widths:
        assert isinstance(sdag, FlexDagModule)  # only flexible DAGs have channel mutables
        fractions = channels.current(sdag)
        for name in widths:
            fractions[own[name].index] = float(choice[name])  # type: ignore[attr-defined]
        channels.apply(sdag, fractions)
    for name in set(choice) & set(follows):
        assert isinstance(sdag, FlexDagModule)
        actual = channels.derived_value(sdag, follows[name], channels.current(sdag))
        if choice[name] != actual:
            raise DagError(f"derived width {name!r} = {choice[name]!r}, but its sources give {actual}")


def sample(sdag: DagModule, rng: random.Random | None = None) -> dict[str, Any]:
    """A random choice dict (not applied)."""
    return {m.name: m.sample_choice(rng) for m in mutables(sdag)}


def largest(sdag: DagModule) -> dict[str, Any]:
    """The choice of most FLOPs of every mutable (not applied)."""
    return {m.name: m.largest for m in mutables(sdag)}


def smallest(sdag: DagModule) -> dict[str, Any]:
    """The choice of fewest FLOPs of every mutable (not applied)."""
    return {m.name: m.smallest for m in mutables(sdag)}


def search_dim(sdag: DagModule) -> int:
    """How many numbers `decode` takes: one per mutable that is not fixed."""
    return sum(1 for m in mutables(sdag) if not m.is_fixed)


def decode(sdag: DagModule, vector: Sequence[float]) -> dict[str, Any]:
    """A choice dict from numbers in [0, 1], one per mutable that is not fixed (in `mutables` order):
    a channel mutable's number is a width multiplier (its smallest choice at least that, else its
    largest), another's the choice index scaled (`floor(x * n)`, 1 -> the last). Fixed mutables keep
    their value; derived widths are expanded (channels)."""
    free = [m for m in mutables(sdag) if not m.is_fixed]
    if len(vector) != len(free):
        raise DagError(f"decode takes {len(free)} numbers (search_dim), got {len(vector)}")
    chosen = {m.name: m.current_choice for m in mutables(sdag) if m.is_fixed}
    for m, x in zip(free, vector):
        x = float(x)
        if not 0 <= x <= 1:
            raise DagError(f"decode: the number for {m.name!r} is {x}, outside [0, 1]")
        if m.kind == "channel":
            chosen[m.name] = next((c for c in m.choices if c >= x), m.choices[-1])
        else:
            chosen[m.name] = m.choices[min(m.num_choices - 1, int(x * m.num_choices))]
    widths = derived(sdag)
    if widths:
        assert isinstance(sdag, FlexDagModule)
        fractions = channels.current(sdag)
        names = channels.channel_names(sdag)
        fractions = [float(chosen.get(n, f)) for n, f in zip(names, fractions)]
        chosen.update({d.name: channels.derived_value(sdag, d, fractions) for d in widths})
    return chosen


def export_subnet(sdag: DagModule, choice: Mapping[str, Any] | None = None) -> DagModule:
    """The plain, independent sub-network of `choice` (default: the current one): every mutable vertex
    replaced by its chosen candidate, a flexible DAG cut to its widths; same outputs as `sdag` at that
    choice. `sdag` is left as it was."""
    work = copy.deepcopy(sdag)
    if choice is not None:
        set_chosen(work, choice)
    plain = work.make_base_copy() if isinstance(work, FlexDagModule) else work
    fixed = _fixed(plain)
    fixed.train(sdag.training)
    return fixed


def _fixed(dag: DagModule) -> DagModule:
    editor = Editor(dag)
    for vertex in list(editor):
        module = vertex.module
        if is_mutable(module):
            training = module.training
            module = module.current_layer()
            module.train(training)
        if is_dag_module(module):
            module = _fixed(module)
        if module is not vertex.module:
            editor.set_module(vertex.name, module)
    plain = editor.build()
    plain.train(dag.training)
    for new, old in zip(plain, dag):
        new.module.train(old.module.training)
    return plain


def _same(value: Any, choice: Any) -> bool:
    if isinstance(choice, str) or isinstance(value, str):
        return value == choice
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == choice
