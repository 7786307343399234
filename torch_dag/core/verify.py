"""`verify(dag)`: the graph invariants every pass keeps."""

from __future__ import annotations

import inspect

from .dag import DagModule, is_valid_vertex_name
from .errors import UnknownOpError, VerifyError
from .ops import FunctionOp, is_dag_module, op_name
from .template import iter_refs


def verify(dag: DagModule) -> DagModule:
    """Check names, topological order, known ops, arity and outputs; return `dag` or raise `VerifyError`."""
    problems: list[str] = []
    seen: set[str] = set()
    for name in dag.input_names:
        if not is_valid_vertex_name(name):
            problems.append(f"input {name!r}: not a valid identifier")
        seen.add(name)
    for vertex in dag:
        where = f"vertex {vertex.name!r}"
        if vertex.name in seen:
            problems.append(f"{where}: name used twice")
        try:
            op = op_name(vertex.module)
        except UnknownOpError as e:
            problems.append(f"{where}: {e}")
            op = "?"
        where += f" (op {op})"
        if dag.vertex_modules[vertex.name] is not vertex.module:
            problems.append(f"{where}: registered module differs from the vertex's module")
        for ref in iter_refs((vertex.args, vertex.kwargs)):
            if ref.name not in seen:
                later = ref.name in dag
                problems.append(
                    f"{where}: reads {ref.name!r}, which "
                    + ("comes later (not topological order)" if later else "does not exist")
                )
        if is_dag_module(vertex.module):
            try:
                verify(vertex.module)
            except VerifyError as e:
                problems.append(f"{where}: nested DAG: {e}")
        elif op != "?":
            problem = arity_problem(vertex)
            if problem:
                problems.append(f"{where}: {problem}")
        seen.add(vertex.name)
    for ref in iter_refs(dag.output):
        if ref.name not in seen:
            problems.append(f"output reads {ref.name!r}, which does not exist")
    if problems:
        raise VerifyError("DagModule is invalid:\n  " + "\n  ".join(problems))
    return dag


def arity_problem(vertex) -> str | None:
    """Whether the vertex's arguments fit its op's signature (when the op has a Python one)."""
    if isinstance(vertex.module, FunctionOp):
        signature = vertex.module.spec.signature
    else:
        signature = _forward_signature(vertex.module)
    if signature is None:
        return None
    try:
        signature.bind(*vertex.args, **vertex.kwargs)
    except TypeError as e:
        return f"arguments do not fit the op: {e}"
    return None


_SIGNATURES: dict[type, inspect.Signature] = {}  # module class -> its forward's signature, without self


def _forward_signature(module) -> inspect.Signature:
    """The signature of `module.forward` (cached per class: reading one costs ~0.1 ms)."""
    if "forward" in module.__dict__:  # a forward set on the instance
        return inspect.signature(module.forward)
    cls = type(module)
    signature = _SIGNATURES.get(cls)
    if signature is None:
        signature = _SIGNATURES[cls] = inspect.signature(module.forward)
    return signature
