"""`Editor`: a working copy of a DAG's structure that passes change, then turn into a new DagModule.

Passes never mutate their input: they open an editor on it, edit vertex records (sharing the input's
modules unless they replace them, as torch.fx transformations do) and `build()` a new, verified
DagModule. Use `copy.deepcopy` on the result for weights independent of the input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from torch import nn

from .dag import DagModule, Vertex, is_valid_vertex_name
from .errors import DagError
from .template import Ref, map_refs, unique_refs
from .traits import Trait, has_trait
from .verify import verify


class Editor:
    """Ordered, editable vertex records of one DAG; `build()` makes the new DagModule."""

    def __init__(self, dag: DagModule):
        self.inputs = list(dag.input_names)
        self.input_meta = dict(dag.input_meta)
        self.vertices: dict[str, Vertex] = {
            v.name: replace(v, kwargs=dict(v.kwargs), meta=dict(v.meta)) for v in dag
        }
        self.output = dag.output
        self.training = dag.training

    # --- queries ----------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Vertex:
        return self.vertices[name]

    def __iter__(self):
        return iter(list(self.vertices.values()))

    def users(self, name: str) -> list[str]:
        """Vertices reading `name`, in order (plus '<output>' if the DAG returns it)."""
        users = [v.name for v in self.vertices.values() if name in v.predecessors]
        if name in unique_refs(self.output):
            users.append("<output>")
        return users

    def fresh_name(self, hint: str) -> str:
        name = hint if is_valid_vertex_name(hint) else f"v_{hint}"
        base, k = name, 1
        while name in self.vertices or name in self.inputs:
            name = f"{base}_{k}"
            k += 1
        return name

    # --- edits ------------------------------------------------------------------------------------

    def set_module(self, name: str, module: nn.Module) -> None:
        self.vertices[name].module = module

    def rewire(
        self, old: str, new: Any, *, only: Iterable[str] | None = None, skip: Iterable[str] = ()
    ) -> None:
        """Make readers of `old` read `new` (a vertex name, or any template value) instead."""
        target = Ref(new) if isinstance(new, str) else new
        only = set(only) if only is not None else None
        skip = set(skip)

        def swap(ref: Ref) -> Any:
            return target if ref.name == old else ref

        for vertex in self.vertices.values():
            if vertex.name in skip or (only is not None and vertex.name not in only):
                continue
            if old in vertex.predecessors:
                vertex.args = map_refs(vertex.args, swap)
                vertex.kwargs = map_refs(vertex.kwargs, swap)
        if (only is None or "<output>" in only) and "<output>" not in skip:
            self.output = map_refs(self.output, swap)

    def insert(self, vertex: Vertex, *, after: str | None = None, before: str | None = None) -> Vertex:
        """Place a new vertex right after (or before) a named one in the order."""
        if vertex.name in self.vertices or vertex.name in self.inputs:
            raise DagError(f"vertex name {vertex.name!r} is already used")
        anchor = after if after is not None else before
        items = list(self.vertices.items())
        if anchor is None or anchor in self.inputs:
            index = 0
        else:
            index = [n for n, _ in items].index(anchor) + (1 if after is not None else 0)
        items.insert(index, (vertex.name, vertex))
        self.vertices = dict(items)
        return vertex

    def remove(self, name: str, *, replacement: Any = None) -> None:
        """Drop a vertex; its readers read `replacement` (a name or template value) instead."""
        if replacement is not None:
            self.rewire(name, replacement)
        elif self.users(name):
            raise DagError(
                f"cannot remove vertex {name!r} ({self.vertices[name].op}): "
                f"{self.users(name)} still read it; give a replacement"
            )
        del self.vertices[name]

    def remove_dead(self) -> list[str]:
        """Drop vertices nothing reads (side-effecting ops such as guards stay); return their names."""
        live = set(unique_refs(self.output))
        for vertex in reversed(list(self.vertices.values())):
            if vertex.name in live or _has_side_effect(vertex):
                live.add(vertex.name)
                live.update(vertex.predecessors)
        dead = [n for n in self.vertices if n not in live]
        for name in dead:
            del self.vertices[name]
        return dead

    def build(self) -> DagModule:
        dag = DagModule(self.inputs, list(self.vertices.values()), self.output, self.input_meta)
        dag.training = self.training
        return verify(dag)


def _has_side_effect(vertex: Vertex) -> bool:
    return has_trait(vertex.op, Trait.SIDE_EFFECT)


def first_input(vertex: Vertex) -> str | None:
    """The vertex's first positional reference: the tensor a unary layer transforms."""
    for arg in vertex.args:
        if isinstance(arg, Ref):
            return arg.name
    return None


def transform(dag: DagModule, edit: Callable[[Editor], None]) -> DagModule:
    """Run `edit` on a working copy of `dag` and return the new, verified DAG."""
    editor = Editor(dag)
    edit(editor)
    return editor.build()
