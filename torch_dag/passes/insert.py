"""`insert_after` / `insert_before`: add a module next to every vertex a pattern matches."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet

from torch import nn

from ..core.dag import DagModule, Vertex
from ..core.editor import Editor, first_input
from ..core.errors import DagError
from ..core.template import Ref
from .pattern import Pattern, find

Factory = Callable[[Vertex], nn.Module | None]


def insert_after(dag: DagModule, pattern: Pattern, factory: Factory, *, suffix: str = "after") -> DagModule:
    """After each vertex matching `pattern`, insert `factory(vertex)` (skipped when it returns None);
    every reader of the vertex then reads the new one.

        td.passes.insert_after(dag, op(CONVS, where=not_followed_by(BATCH_NORMS)),
                               lambda v: nn.BatchNorm2d(v.module.out_channels))
    """
    editor = Editor(dag)
    for match in find(dag, pattern):
        module = factory(match.vertex)
        if module is None:
            continue
        name = editor.fresh_name(f"{match.vertex.name}_{suffix}")
        editor.rewire(match.vertex.name, name)
        editor.insert(
            Vertex(name, _check(module, match.vertex), (Ref(match.vertex.name),)), after=match.vertex.name
        )
    return editor.build()


def insert_before(dag: DagModule, pattern: Pattern, factory: Factory, *, suffix: str = "before") -> DagModule:
    """Before each vertex matching `pattern`, insert `factory(vertex)` on its first tensor input."""
    editor = Editor(dag)
    for match in find(dag, pattern):
        source = first_input(match.vertex)
        module = factory(match.vertex)
        if module is None:
            continue
        if source is None:
            raise DagError(
                f"vertex {match.vertex.name!r} ({match.vertex.op}) has no tensor input to insert before"
            )
        name = editor.fresh_name(f"{match.vertex.name}_{suffix}")
        editor.insert(Vertex(name, _check(module, match.vertex), (Ref(source),)), before=match.vertex.name)
        editor.rewire(source, name, only=[match.vertex.name])
    return editor.build()


def _check(module: object, vertex: Vertex) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise DagError(f"factory for vertex {vertex.name!r} ({vertex.op}) returned {type(module).__name__}")
    return module


def not_followed_by(ops: AbstractSet[str]):
    """A `where` check: the vertex has a reader and none of its readers is one of `ops`."""
    return lambda vertex, view: (
        bool(view.users(vertex.name))
        and not any(u != "<output>" and view[u].op in ops for u in view.users(vertex.name))
    )
