"""Building a DagModule from a graph JSON: modules only from the registered vocabulary, every entry
validated first, nothing named in the file imported or run."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.dag import DagModule, Vertex
from ..core.errors import DagError, LoadError, UnknownOpError, VerifyError
from ..core.functions import FUNCTIONS
from ..core.ops import CUSTOM_OPS, FunctionOp, is_dag_module, module_op_spec, op_name
from ..core.template import Ref, from_json, iter_refs
from ..core.verify import verify
from .configs import STORABLE_DTYPES, TENSOR_COUNT, check_config
from .limits import Limits, valid_name
from .schema import EXTENSION_DAGS, expect
from .weights import load_weights

_MAX_DEPTH = 16
STORABLE_NAMES = {str(d).removeprefix("torch."): d for d in STORABLE_DTYPES}


def build(graph: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> DagModule:
    """A DagModule from a checked graph JSON and its tensors (as `graph_and_tensors` gives them)."""
    return finish(_build_dag(graph, 0, Limits.of(tensors, graph)), graph, tensors, where)


def finish(dag: DagModule, graph: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> DagModule:
    """Give a freshly built DAG its tensors and train/eval flags, and check it."""
    load_weights(dag, tensors, graph, where)
    restore_training_flags(dag, graph)
    try:
        verify(dag)
    except VerifyError as e:
        raise LoadError(f"{where}: {e}") from None
    return dag


def restore_training_flags(dag: DagModule, graph: dict[str, Any]) -> None:
    """Train/eval as saved: the DAG's flag, then vertices saved in the other mode (a frozen BN, say)."""
    dag.train(graph.get("training") is True)
    entries = {e.get("name"): e for e in graph.get("vertices", []) if isinstance(e, dict)}
    for vertex in dag:
        flag = entries.get(vertex.name, {}).get("training")
        if isinstance(flag, bool):
            vertex.module.train(flag)
        if is_dag_module(vertex.module) and isinstance(entries.get(vertex.name, {}).get("config"), dict):
            restore_training_flags(
                vertex.module, {"training": vertex.module.training, **entries[vertex.name]["config"]}
            )


def _build_dag(graph: Any, depth: int, limits: Limits) -> DagModule:
    expect(depth <= _MAX_DEPTH, f"DAGs nested more than {_MAX_DEPTH} levels deep")
    expect(isinstance(graph, dict), "graph must be an object")
    inputs, entries = graph.get("inputs"), graph.get("vertices")
    expect(
        isinstance(inputs, list) and all(valid_name(n) for n in inputs) and len(set(inputs)) == len(inputs),
        f"inputs must be a list of distinct identifiers, got {str(inputs)[:80]}",
    )
    expect(isinstance(entries, list), "vertices must be a list")
    limits.take_vertices(len(entries))
    vertices: list[Vertex] = []
    by_name: dict[str, Vertex] = {}
    for index, entry in enumerate(entries):
        vertex = build_vertex(entry, index, by_name, depth, limits, inputs)
        expect(
            vertex.name not in by_name and vertex.name not in inputs,
            f"vertex name {vertex.name!r} is used twice",
        )
        by_name[vertex.name] = vertex
        vertices.append(vertex)
    expect("output" in graph, "the graph has no output: the file is damaged")
    output = from_json(graph["output"])
    _check_reads(output, by_name, inputs, "the output")
    input_meta = graph.get("input_meta", {})
    expect(
        isinstance(input_meta, dict) and all(isinstance(v, dict) for v in input_meta.values()),
        "input_meta must map input names to objects",
    )
    try:
        for key, (_, _, build_) in EXTENSION_DAGS.items():
            if key in graph:
                return build_(graph[key], inputs, vertices, output, input_meta)
        return DagModule(inputs, vertices, output, input_meta)
    except (DagError, LoadError) as e:
        raise LoadError(str(e)) from None
    except Exception as e:  # an extension's builder missed a check: still the file's fault
        raise LoadError(f"the graph cannot be built ({type(e).__name__}: {str(e)[:200]})") from None


def build_vertex(
    entry: Any,
    index: int,
    by_name: dict[str, Vertex],
    depth: int,
    limits: Limits,
    inputs: list[str] | None = None,
) -> Vertex:
    """The vertex of a graph entry; with `inputs`, its references are checked to name an input or a vertex
    of `by_name` (the earlier ones)."""
    expect(isinstance(entry, dict), f"vertex #{index} must be an object")
    name, op = entry.get("name"), entry.get("op")
    expect(valid_name(name), f"vertex #{index} has an invalid name {str(name)[:40]!r}")
    expect(isinstance(op, str), f"vertex {name!r} has no op name")
    where = f"vertex {name!r} (op {op})"
    args, kwargs = from_json(entry.get("args", [])), entry.get("kwargs", {})
    expect(isinstance(args, list), f"{where}: args must be a list")
    expect(
        isinstance(kwargs, dict) and all(isinstance(k, str) and k.isidentifier() for k in kwargs),
        f"{where}: kwargs must map identifiers to values",
    )
    kwargs = {k: from_json(v) for k, v in kwargs.items()}
    if inputs is not None:
        _check_reads([args, kwargs], by_name, inputs, where)
    meta = entry.get("meta", {})
    expect(isinstance(meta, dict), f"{where}: meta must be an object")
    if "same_module_as" in entry:
        other = by_name.get(entry["same_module_as"]) if isinstance(entry["same_module_as"], str) else None
        if other is None:
            raise LoadError(f"{where}: same_module_as names no earlier vertex")
        expect(other.op == op, f"{where}: shares the module of {other.name!r}, whose op is {other.op}")
        module = other.module
    else:
        module = _build_module(op, entry.get("config"), where, depth, limits)
        _set_dtypes(module, entry.get("dtypes", {}), where)
    return Vertex(name, module, tuple(args), kwargs, dict(meta))


def _check_reads(template: Any, by_name: dict[str, Vertex], inputs: list[str], where: str) -> None:
    """Every reference in `template` names an input or an earlier vertex (not the reader itself)."""
    for ref in iter_refs(template):
        expect(
            isinstance(ref, Ref) and (ref.name in by_name or ref.name in inputs),
            f"{where} reads {str(ref.name)[:40]!r}, which is neither an input nor an earlier vertex",
        )


def _set_dtypes(module: nn.Module, dtypes: Any, where: str) -> None:
    expect(isinstance(dtypes, dict), f"{where}: dtypes must be an object")
    if not dtypes:
        return
    state = module.state_dict(keep_vars=True)
    for key, name in dtypes.items():
        expect(key in state, f"{where}: dtypes names {key!r}, which the module does not have")
        dtype = STORABLE_NAMES.get(name) if isinstance(name, str) else None
        expect(
            dtype is not None,
            f"{where}: unknown dtype {str(name)[:40]!r}; a stored tensor is one of {sorted(STORABLE_NAMES)}",
        )
        owner_path, _, attr = key.rpartition(".")
        owner = module.get_submodule(owner_path)
        tensor = state[key].to(dtype)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        else:
            owner._buffers[attr] = tensor


def _build_module(op: str, config: Any, where: str, depth: int, limits: Limits) -> nn.Module:
    if op == "DagModule":
        return _build_dag(config, depth + 1, limits)
    if op in CUSTOM_OPS:
        limits.check_custom_config(config, where)
        try:
            return CUSTOM_OPS[op].from_config(config, where)
        except LoadError:
            raise
        except Exception as e:  # a custom op's own checks missed something: still the file's fault
            raise LoadError(f"{where}: malformed config ({type(e).__name__}: {str(e)[:200]})") from None
    if op in FUNCTIONS:
        expect(config is None, f"{where}: a function op takes no config")
        return FunctionOp(op)
    try:
        spec = module_op_spec(op)
    except UnknownOpError as e:
        raise LoadError(f"{where}: {e}") from None
    expect(isinstance(config, dict), f"{where}: config must be an object")
    allowed = spec.param_names
    unknown = sorted(set(config) - allowed)
    expect(not unknown, f"{where}: unknown config keys {unknown}; {op} takes {sorted(allowed)}")
    values = {k: from_json(v) for k, v in config.items()}
    check_config(spec, values, where)
    if op in TENSOR_COUNT:
        limits.check_tensor_count(TENSOR_COUNT[op](values), where)
    try:
        module = spec.build(values)
    except Exception as e:  # the constructor rejected the values: say which vertex and why
        raise LoadError(f"{where}: cannot build from config {config}: {type(e).__name__}: {e}") from None
    expect(op_name(module) == op, f"{where}: config built a {type(module).__name__}")
    return module
