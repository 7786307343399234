"""Hierarchy: wrap a subgraph into a nested DagModule vertex (`nest`), inline them again (`flatten`),
and group a converted model by its source module hierarchy (`nest_by_module`)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from ..core.dag import DagModule, Vertex
from ..core.editor import Editor
from ..core.errors import DagError
from ..core.ops import FunctionOp, is_dag_module
from ..core.template import Ref, map_refs


def nest(dag: DagModule, vertex_names: Iterable[str], name: str) -> DagModule:
    """Wrap the named vertices into one vertex `name` whose module is a nested DagModule.

    The set must be convex (no path leaves it and comes back); its inputs are the values it reads
    from outside, its outputs the values read outside it (several outputs: the nested DAG returns a
    tuple and `name_out<i>` getitem vertices hand them out).
    """
    order = [v.name for v in dag]
    group = [n for n in order if n in set(vertex_names)]
    missing = set(vertex_names) - set(group)
    if missing:
        raise DagError(f"nest: no vertices named {sorted(missing)}")
    if not group:
        raise DagError("nest: no vertices given")
    editor = Editor(dag)
    if (name in editor.vertices and name not in group) or name in dag.input_names:
        raise DagError(f"nest: the name {name!r} is already used")
    members = set(group)
    _check_convex(dag, members)
    inputs = [p for n in group for p in dag[n].predecessors if p not in members]
    inputs = list(dict.fromkeys(inputs))
    users = dag.successors()
    outputs = [n for n in group if any(u not in members for u in users[n])]
    if not outputs:
        raise DagError(f"nest: nothing outside reads the vertices {group[:3]}...; remove them instead")
    inner_output: Any = Ref(outputs[0]) if len(outputs) == 1 else tuple(Ref(n) for n in outputs)
    inner_meta = {n: {"shape": dag[n].meta["shape"]} for n in inputs if n in dag and "shape" in dag[n].meta}
    inner_meta.update({n: dag.input_meta[n] for n in inputs if n in dag.input_meta})
    inner = DagModule(inputs, [editor[n] for n in group], inner_output, inner_meta)
    inner.train(dag.training)
    block = Vertex(name, inner, tuple(Ref(n) for n in inputs), meta={"nested": len(group)})
    position = order.index(group[-1])
    for n in group:
        del editor.vertices[n]
    editor.vertices[name] = block
    priority = {n: order.index(n) for n in editor.vertices if n in order and n != name}
    priority[name] = position
    if len(outputs) == 1:
        editor.rewire(outputs[0], name)
    else:
        for i, out in enumerate(outputs):
            getter = editor.fresh_name(f"{name}_out{i}")
            editor.vertices[getter] = Vertex(getter, FunctionOp("getitem"), (Ref(name), i))
            priority[getter] = position
            editor.rewire(out, getter, skip=[getter])
    editor.vertices = _stable_topological(editor.vertices, priority, set(dag.input_names))
    return editor.build()


def _check_convex(dag: DagModule, members: set[str]) -> None:
    """Refuse a set with a path that leaves it and re-enters (nesting it would create a cycle)."""
    users = dag.successors()
    frontier = [u for n in members for u in users[n] if u not in members and u != "<output>"]
    seen: set[str] = set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        for user in users[current]:
            if user in members:
                raise DagError(
                    f"nest: vertex {current!r} ({dag[current].op}) is outside the set but lies on "
                    f"a path from it back into it (to {user!r}); include it or nest less"
                )
            if user != "<output>":
                frontier.append(user)


def _stable_topological(
    vertices: dict[str, Vertex], priority: dict[str, int], inputs: set[str]
) -> dict[str, Vertex]:
    """Topological order that keeps the given priorities wherever the edges allow."""
    pending = {n: {p for p in v.predecessors if p not in inputs} for n, v in vertices.items()}
    users: dict[str, list[str]] = {}
    for n, preds in pending.items():
        for p in preds:
            users.setdefault(p, []).append(n)
    ready = [(priority[n], n) for n, preds in pending.items() if not preds]
    heapq.heapify(ready)
    ordered: dict[str, Vertex] = {}
    while ready:
        _, n = heapq.heappop(ready)
        ordered[n] = vertices[n]
        for user in users.get(n, []):
            pending[user].discard(n)
            if not pending[user]:
                heapq.heappush(ready, (priority[user], user))
    if len(ordered) != len(vertices):
        raise DagError("the edited graph has a cycle")
    return ordered


def flatten(dag: DagModule) -> DagModule:
    """Inline every nested DagModule vertex (recursively); inner vertices are named `<outer>_<inner>`."""
    editor = Editor(dag)
    for vertex in list(editor):
        if is_dag_module(vertex.module):
            _inline(editor, vertex, flatten(vertex.module))
    _simplify_getitems(editor)
    return editor.build()


def _inline(editor: Editor, vertex: Vertex, inner: DagModule) -> None:
    bound = dict(zip(inner.input_names, vertex.args))
    bound.update(vertex.kwargs)
    if set(bound) != set(inner.input_names):
        raise DagError(
            f"vertex {vertex.name!r}: arguments do not fit the nested DAG's inputs {inner.input_names}"
        )
    renamed: dict[str, str] = {}
    for inner_vertex in inner:
        renamed[inner_vertex.name] = editor.fresh_name(f"{vertex.name}_{inner_vertex.name}")
        editor.vertices[renamed[inner_vertex.name]] = inner_vertex  # reserve the name; replaced below
    reserved = set(renamed.values())

    def outer(ref: Ref) -> Any:
        return bound[ref.name] if ref.name in bound else Ref(renamed[ref.name])

    items: list[tuple[str, Vertex]] = []
    for name, value in editor.vertices.items():
        if name == vertex.name:
            items.extend(
                (
                    renamed[v.name],
                    replace(
                        v,
                        name=renamed[v.name],
                        args=map_refs(v.args, outer),
                        kwargs=map_refs(v.kwargs, outer),
                    ),
                )
                for v in inner
            )
        elif name not in reserved:
            items.append((name, value))
    editor.vertices = dict(items)
    editor.rewire(vertex.name, map_refs(inner.output, outer))


def _simplify_getitems(editor: Editor) -> None:
    """`getitem((a, b), 1)` (left by inlining a multi-output nested DAG) -> `b`."""
    for vertex in list(editor):
        if (
            vertex.op == "getitem"
            and isinstance(vertex.args[0], (tuple, list))
            and type(vertex.args[1]) is int
        ):
            editor.remove(vertex.name, replacement=vertex.args[0][vertex.args[1]])


def nest_by_module(dag: DagModule, depth: int = 2, *, strict: bool = False) -> DagModule:
    """One nested DAG per source submodule at `depth` levels of its path ("layer1.0" for depth 2),
    from the `module_path` the converter recorded. Groups that cannot be nested (not convex) stay flat,
    or raise with `strict=True`."""
    groups: dict[str, list[str]] = {}
    for vertex in dag:
        parts = vertex.meta.get("module_path", "").split(".")
        if len(parts) >= depth and all(parts[:depth]):
            groups.setdefault(".".join(parts[:depth]), []).append(vertex.name)
    for path, names in groups.items():
        if len(names) < 2:
            continue
        name = Editor(dag).fresh_name(path.replace(".", "_"))
        try:
            dag = nest(dag, names, name)
        except DagError:
            if strict:
                raise
    return dag


__all__ = ["flatten", "nest", "nest_by_module"]
