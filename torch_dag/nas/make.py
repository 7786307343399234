"""`make_mutable`: matching vertices (or residual blocks) become mutable vertices holding candidates, each
candidate checked on example inputs to take the vertex's inputs and give its output's shape."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, cast

import torch
from torch import nn

from ..converters.canonical import FUNCTION_TO_MODULE, as_module_op
from ..core.dag import DagModule, Vertex, evaluating
from ..core.editor import Editor, first_input
from ..core.errors import DagError
from ..core.ops import FunctionOp
from ..core.template import Ref, is_constant, map_refs
from ..core.traits import Trait, has_trait
from ..flex.model import FlexDagModule, is_flex
from ..passes.hierarchy import nest
from ..passes.pattern import Pattern, find
from ..passes.prepare import as_inputs
from .candidates import Built, Factory, KernelSizes, Skippable, named_candidates
from .vertex import ElementwiseMutableOp, is_mutable, mutable_op

VertexTest = Callable[[Vertex, DagModule], bool]
PatternLike = type | tuple[type, ...] | VertexTest | Pattern
CandidatesLike = Mapping[str, "nn.Module | Factory"] | KernelSizes | Skippable


_NOT_WITH_WIDTHS = (
    "; on a flexible DAG, element-wise candidates (activations, the identity), kernel_sizes(...) and "
    "skippable() blocks keep the channels the widths vary; search other candidates on the plain DAG "
    "(make_flexible on such a DAG keeps the channels at mutable vertices fixed)"
)


def make_mutable(
    dag: DagModule,
    pattern: PatternLike,
    candidates: CandidatesLike,
    example_inputs: tuple | torch.Tensor | None = None,
) -> DagModule:
    """A searchable copy of `dag` in which every vertex `pattern` matches is a mutable vertex.

    `pattern`: module classes, a callable `(vertex, dag) -> bool`, or a pass-matcher pattern
    (`td.passes.pattern.op(...)`); with `skippable()`, the residual adds it matches (`residual`).
    `candidates`: `{name: module}` (copied per vertex), `{name: callable(vertex module) -> module}`,
    `kernel_sizes(3, 5, 7)` or `skippable()`. Each candidate runs on the example inputs (default: the
    DAG's recorded input shapes) and must give the vertex's output shape. A flexible DAG stays flexible
    (the result is a `FlexDagModule` at the same level or widths): a flexible conv's kernel sizes are
    flexible convs with its cuts, a skippable block keeps its flexible layers, and levels and widths
    reach them; other candidates that hold channels are refused there.
    """
    inputs = as_inputs(example_inputs) if example_inputs is not None else dag.example_inputs()
    work = copy.deepcopy(dag)
    names = matching(work, pattern)
    if not names:
        ops = sorted({v.op for v in work})
        raise DagError(f"make_mutable: no vertex matches {pattern!r}; the DAG's ops are {', '.join(ops)}")
    with torch.no_grad(), evaluating(work):
        values = work.run_collecting(*inputs)
    if isinstance(candidates, Skippable):
        return _rewrapped(dag, _skippable(work, names, values))
    editor = Editor(work)
    for name in names:
        editor.vertices[name] = _mutable_vertex(
            work[name], candidates, values, isinstance(dag, FlexDagModule)
        )
    return _rewrapped(dag, editor.build())


def _mutable_vertex(
    vertex: Vertex, candidates: CandidatesLike, values: dict[str, Any], flexible: bool
) -> Vertex:
    """`vertex` with a mutable of `candidates` (checked on `values`, the DAG's run) as its module."""
    where = f"vertex {vertex.name!r} ({vertex.op})"
    if is_mutable(vertex.module):
        raise DagError(f"{where} is mutable already: it cannot become a mutable; narrow the pattern")
    kernels = isinstance(candidates, KernelSizes)
    if is_flex(vertex.module) and not kernels:
        raise DagError(
            f"{where} is a flexible layer (it carries channels the widths vary): it cannot become a "
            f"mutable of these candidates; narrow the pattern{_NOT_WITH_WIDTHS}"
        )
    original, vertex = vertex, _module_form(vertex)
    built = (
        candidates.build(vertex.module, where)
        if isinstance(candidates, KernelSizes)
        else named_candidates(cast(Mapping, candidates), vertex.module, where)
    )
    equal = _check(built, vertex, values, where)
    module = mutable_op(
        built.modules, built.kind, built.values, built.chosen or (equal[0] if equal else None)
    )
    module.arity = len(vertex.args)
    if flexible and not kernels and not isinstance(module, ElementwiseMutableOp):
        raise DagError(
            f"{where}: these candidates are not all element-wise: they could change or fix the channels "
            f"the flexible widths vary{_NOT_WITH_WIDTHS}"
        )
    module.train(original.module.training)
    return replace(vertex, module=module)


def _module_form(vertex: Vertex) -> Vertex:
    """An activation function vertex (`F.gelu(x, approximate="tanh")`, `F.hardswish(x, inplace)`) as
    the call of its module form on its input (candidates are modules: they replace what it computes);
    any other vertex as it is."""
    if not isinstance(vertex.module, FunctionOp) or not has_trait(vertex.op, Trait.ACTIVATION):
        return vertex
    source = first_input(vertex)
    if source is None:
        return vertex
    form = as_module_op(vertex.op, vertex.args, vertex.kwargs, is_constant)
    if form is not None and form[1] == (Ref(source),):
        return replace(vertex, module=form[0], args=form[1], kwargs={})
    entry = FUNCTION_TO_MODULE.get(vertex.op)
    if (
        entry is None
        or vertex.kwargs
        or len(vertex.args) > 2
        or any(isinstance(a, Ref) for a in vertex.args[1:])
    ):
        return vertex
    # a lone positional option (`inplace`) the module form refused: it does not change what it computes
    return replace(vertex, module=entry[0](), args=(Ref(source),), kwargs={})


def residual(vertex: Vertex, dag: DagModule) -> bool:
    """A pattern: an `add` of two values one of which the other is computed from (`x + f(x)`)."""
    if vertex.op != "add" or vertex.kwargs.get("alpha", 1) != 1 or len(vertex.args) != 2:
        return False
    if not all(isinstance(a, Ref) for a in vertex.args):
        return False
    first, second = (a.name for a in vertex.args)
    return first in _ancestors(dag, second) or second in _ancestors(dag, first)


def matching(dag: DagModule, pattern: PatternLike) -> list[str]:
    """The names of the vertices `pattern` matches, in order."""
    if isinstance(pattern, Pattern):
        found = {m.vertex.name for m in find(dag, pattern)}
        return [v.name for v in dag if v.name in found]
    if isinstance(pattern, type):
        pattern = (pattern,)
    if isinstance(pattern, tuple):
        if not all(isinstance(c, type) for c in pattern):
            raise DagError(f"a pattern tuple must hold module classes, got {pattern}")
        classes = pattern
        return [v.name for v in dag if isinstance(_matched_layer(v), classes)]
    if callable(pattern):
        return [v.name for v in dag if pattern(v, dag)]
    raise DagError(
        f"pattern must be module classes, a callable (vertex, dag) -> bool or a Pattern: {pattern!r}"
    )


def _matched_layer(vertex: Vertex) -> nn.Module:
    """What a class pattern tests: the module form of an activation function, the plain layer of a
    flexible one (`nn.Conv2d` matches flexible convs too), else the vertex's module."""
    module = _module_form(vertex).module
    return module.full if is_flex(module) else module


def _check(built: Built, vertex: Vertex, values: dict[str, Any], where: str) -> list[str]:
    """Every candidate takes the vertex's inputs and gives its output's shape and dtype; the names of
    those that give its very output (the one to start with, so the DAG starts computing what it did)."""
    args = map_refs(vertex.args, lambda r: values[r.name])
    kwargs = map_refs(vertex.kwargs, lambda r: values[r.name])
    expected = values[vertex.name]
    equal = []
    for name, module in built.modules.items():
        try:
            with torch.no_grad(), evaluating(module):
                out = module(*args, **kwargs)
        except Exception as e:
            raise DagError(
                f"{where}: candidate {name!r} fails on the vertex's inputs: {type(e).__name__}: {e}"
            ) from None
        if _signature(out) != _signature(expected):
            raise DagError(
                f"{where}: candidate {name!r} gives {_signature(out)}, the vertex gives {_signature(expected)}: "
                "every candidate must give the same output shape"
            )
        if _equal(out, expected):
            equal.append(name)
    return equal


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), str(value.dtype).removeprefix("torch.")
    if isinstance(value, (tuple, list)):
        return type(value).__name__, tuple(_signature(v) for v in value)
    return type(value).__name__


def _skippable(work: DagModule, adds: list[str], values: dict[str, Any]) -> DagModule:
    """Each residual add with its block nested into one mutable vertex {"block", "identity"} (named as
    the add, so `values`, the DAG's run on the example inputs, still holds its inputs and output)."""
    for add in adds:
        vertex = work[add]
        if not residual(vertex, work):
            raise DagError(
                f"vertex {add!r} ({vertex.op}) is not a residual add x + f(x): it cannot be skipped"
            )
        first, second = (a.name for a in vertex.args)
        skip, body = (first, second) if first in _ancestors(work, second) else (second, first)
        members = (_ancestors(work, body) | {body}) - (_ancestors(work, skip) | {skip}) | {add}
        members = _with_checks({m for m in members if m not in work.input_names}, work, add)
        work = nest(work, members, add)
        block = work[add]
        if not isinstance(block.module.output, Ref):
            raise DagError(
                f"vertex {add!r}: values inside the block x + f(x) are read outside it: it cannot be skipped"
            )
        if list(block.args) != [Ref(skip)] or block.kwargs:
            outside = [a.name for a in block.args if isinstance(a, Ref) and a.name != skip]
            raise DagError(
                f"vertex {add!r}: the block x + f(x) also reads {outside} (besides its skip input {skip!r}): "
                "only a block of one input can be replaced by the identity"
            )
        built = Built(
            "op", {"block": block.module, "identity": nn.Identity()}, ["block", "identity"], "block"
        )
        _check(built, block, values, f"vertex {add!r} (a residual block)")
        module = mutable_op(built.modules, built.kind, built.values, built.chosen)
        module.train(block.module.training)
        editor = Editor(work)
        editor.set_module(add, module)
        work = editor.build()
    return work


def _with_checks(members: set[str], dag: DagModule, add: str) -> set[str]:
    """`members` with the vertices that read only members before `add` (shape checks, asserts on the
    block's tensors): they belong to the block."""
    inner = members - {add}
    grown = True
    while grown:
        grown = False
        for vertex in dag:
            if vertex.name not in members and vertex.predecessors and set(vertex.predecessors) <= inner:
                members.add(vertex.name)
                inner.add(vertex.name)
                grown = True
    return members


def _ancestors(dag: DagModule, name: str) -> set[str]:
    """The vertices `name` is computed from (graph inputs included, not `name` itself)."""
    seen: set[str] = set()
    stack = [name]
    while stack:
        current = stack.pop()
        if current not in dag:
            continue
        for pred in dag[current].predecessors:
            if pred not in seen:
                seen.add(pred)
                stack.append(pred)
    return seen


def _rewrapped(original: DagModule, built: DagModule) -> DagModule:
    """`built` as the class of `original`: a flexible DAG keeps its levels, widths analysis and level."""
    if not isinstance(original, FlexDagModule):
        return built
    flex = FlexDagModule(
        built.input_names,
        list(built),
        built.output,
        built.input_meta,
        copy.deepcopy(original.level_args),
        copy.deepcopy(original.width_info),
    )
    # the same channel analysis: it reads a mutable vertex as its block or the candidate in use
    flex._width_plan = original._width_plan
    widths = original.current_widths()
    if widths is not None:  # the candidates were made at these widths; the new DAG starts at a level
        flex.set_widths(widths)
    flex.train(built.training)
    return flex
