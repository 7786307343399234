"""Moving a DAG to an edited graph JSON without rebuilding it whole (how flexible DAGs step between
levels): `rebuild` gives a new DAG, `update_in_place` changes the DAG itself."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..core.dag import DagModule, Vertex
from ..core.errors import DagError, LoadError
from ..core.ops import clone_module, is_dag_module
from ..core.verify import arity_problem
from .build import build_vertex, finish, restore_training_flags
from .limits import Limits
from .schema import expect
from .weights import assign, stored_weights


def rebuild(
    dag: DagModule, graph: dict[str, Any], changed: set[str], tensors: dict[str, torch.Tensor], where: str
) -> DagModule:
    """A DagModule for `graph` (the JSON of `dag` with the entries of the vertices `changed` edited) and
    its `tensors`, built like `build` but reusing `dag`'s other modules (copies of them, so `dag` is
    untouched): the cheap way to move between graphs that differ in a few vertices."""
    expect(type(dag) is DagModule, f"{where}: rebuild takes a plain DagModule")
    entries = _vertex_entries(graph, dag, where)
    limits = Limits.of(tensors, graph)
    vertices: list[Vertex] = []
    by_name: dict[str, Vertex] = {}
    for index, (entry, old) in enumerate(zip(entries, dag)):
        if entry["name"] in changed or "same_module_as" in entry:
            vertex = build_vertex(entry, index, by_name, 0, limits, dag.input_names)
        else:
            vertex = Vertex(old.name, _shallow_copy(old.module), old.args, dict(old.kwargs), dict(old.meta))
        by_name[vertex.name] = vertex
        vertices.append(vertex)
    try:
        moved = DagModule(dag.input_names, vertices, dag.output, dag.input_meta)
    except DagError as e:
        raise LoadError(f"{where}: {e}") from None
    return finish(moved, graph, tensors, where)


def update_in_place(
    dag: DagModule, graph: dict[str, Any], changed: set[str], tensors: dict[str, torch.Tensor], where: str
) -> None:
    """Move `dag` itself to `graph` (its JSON with the entries of the vertices `changed` edited) and
    `tensors`. When the edits keep every vertex's op and inputs (new widths, say) and touch no shared or
    nested module, only the changed vertices are rebuilt; otherwise `dag` takes over a `rebuild`.
    Everything is built and checked before `dag` is touched: on an error it stays as it was."""
    expect(type(dag) is DagModule, f"{where}: update_in_place takes a plain DagModule")
    entries = _vertex_entries(graph, dag, where)
    limits = Limits.of(tensors, graph)
    vertices: dict[str, Vertex] = {}
    for index, (entry, old) in enumerate(zip(entries, dag)):
        if entry["name"] not in changed and "same_module_as" not in entry:
            continue
        vertex = None if "same_module_as" in entry else build_vertex(entry, index, {}, 0, limits)
        if (
            vertex is None
            or is_dag_module(vertex.module)
            or is_dag_module(old.module)
            or vertex.op != old.op
            or vertex.predecessors != old.predecessors
        ):
            moved = rebuild(dag, graph, changed, tensors, where)
            dag.__dict__.clear()
            dag.__dict__.update(moved.__dict__)
            return
        problem = arity_problem(vertex)
        expect(problem is None, f"{where}: vertex {vertex.name!r} (op {vertex.op}): {problem}")
        vertices[vertex.name] = vertex
    expected = {
        f"vertex_modules.{v.name}.{key}": value
        for v in dag
        for key, value in vertices.get(v.name, v).module.state_dict(keep_vars=True).items()
    }
    weights = stored_weights(expected, tensors, graph, where)
    dag.replace_vertices(list(vertices.values()))
    for key, tensor in weights.items():
        assign(dag, key, tensor)
    training = graph.get("training") is True
    if dag.training != training:
        restore_training_flags(dag, graph)
        return
    flags = {entry["name"]: entry.get("training") for entry in entries if entry["name"] in vertices}
    for name, vertex in vertices.items():  # the others keep their modes
        flag = flags[name]
        vertex.module.train(flag if isinstance(flag, bool) else training)


def _vertex_entries(graph: dict[str, Any], dag: DagModule, where: str) -> list[dict[str, Any]]:
    """The graph's vertex entries, checked to be objects naming `dag`'s vertices in order."""
    entries = graph.get("vertices")
    if not (
        isinstance(entries, list)
        and [e.get("name") if isinstance(e, dict) else None for e in entries] == [v.name for v in dag]
    ):
        raise LoadError(f"{where}: the graph must have the model's vertices, in order")
    return entries


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose tensors can be reassigned without touching the original's (a nested
    DagModule, whose vertices name its modules, is copied whole)."""
    return copy.deepcopy(module) if is_dag_module(module) else clone_module(module)
