"""`Vertex` and `DagModule`: the one representation every part of torch_dag reads and writes."""

from __future__ import annotations

import contextlib
import keyword
import linecache
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import DagError
from .inplace import in_place_calls
from .ops import Constant, Parameter, callable_of, op_name
from .template import DTYPES, Ref, iter_refs, map_refs, unique_refs

_RESERVED = frozenset(dir(nn.ModuleDict)) | {"self"}


def is_valid_vertex_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name.isidentifier()
        and not keyword.iskeyword(name)
        and not name.startswith("__")
        and name not in _RESERVED
    )


@dataclass
class Vertex:
    """One node of the DAG: a unique name, an atomic module, and what is passed to it.

    `args` and `kwargs` are call templates: `Ref(name)` marks the output of another vertex (or an
    input). `meta` holds information such as the source module path; passes may drop it.
    """

    name: str
    module: nn.Module
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def op(self) -> str:
        return op_name(self.module)

    @property
    def predecessors(self) -> list[str]:
        """Names of the vertices (or inputs) this one reads, in argument order, without repeats."""
        return unique_refs(self.args, self.kwargs)

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name} = {self.op}({', '.join(parts)})"


_fresh_ids = count()
_DagT = TypeVar("_DagT", bound="DagModule")


class DagModule(nn.Module):
    """An `nn.Module` whose forward is a DAG of atomic vertices, in topological order.

    The modules of the vertices are registered submodules (under `vertex_modules[name]`), so
    `state_dict`, `.to()`, optimizers, DDP and `torch.compile` treat it like any module. A module
    used by two vertices is registered once per vertex and shared. `forward` is generated
    straight-line Python (like torch.fx's code generation), so it costs nothing beyond the ops.
    """

    _is_torch_dag_module = True
    traced_with: str  # on converted DAGs: the tracer that made it, "fx" or "export"

    def __init__(
        self,
        inputs: Sequence[str],
        vertices: Sequence[Vertex],
        output: Any,
        input_meta: dict[str, dict[str, Any]] | None = None,
    ):
        super().__init__()
        self.input_names: list[str] = list(inputs)
        # per input: what it was converted with, e.g. {"shape": [1, 3, 224, 224], "dtype": "float32"}
        self.input_meta: dict[str, dict[str, Any]] = dict(input_meta or {})
        self._vertices: dict[str, Vertex] = {}
        for vertex in vertices:
            if vertex.name in self._vertices or vertex.name in self.input_names:
                raise DagError(f"vertex name {vertex.name!r} is used twice")
            self._vertices[vertex.name] = vertex
        self.output = output
        self.vertex_modules = nn.ModuleDict()
        for vertex in vertices:
            if not is_valid_vertex_name(vertex.name):
                raise DagError(f"vertex name {vertex.name!r} is not a valid identifier for a vertex")
            self.vertex_modules[vertex.name] = vertex.module
        self.recompile()

    @classmethod
    def from_dag(cls: type[_DagT], dag: DagModule, **kwargs: Any) -> _DagT:
        """`dag`'s graph (its vertices and modules, shared) as a DAG of this class, in `dag`'s train/eval
        mode; `kwargs` go to the constructor."""
        made = cls(dag.input_names, dag.vertices, dag.output, dag.input_meta, **kwargs)
        made.train(dag.training)
        return made

    # --- graph access -----------------------------------------------------------------------------

    @property
    def vertices(self) -> list[Vertex]:
        return list(self._vertices.values())

    def __iter__(self) -> Iterator[Vertex]:
        return iter(self._vertices.values())

    def __len__(self) -> int:
        return len(self._vertices)

    def __contains__(self, name: object) -> bool:
        return name in self._vertices

    def __getitem__(self, name: str) -> Vertex:
        try:
            return self._vertices[name]
        except KeyError:
            raise KeyError(f"no vertex named {name!r} in this DagModule") from None

    def successors(self) -> dict[str, list[str]]:
        """For each input and vertex name, the vertices that read it (and '<output>' if returned)."""
        users: dict[str, list[str]] = {name: [] for name in [*self.input_names, *self._vertices]}
        for vertex in self:
            for name in vertex.predecessors:
                users[name].append(vertex.name)
        for name in unique_refs(self.output):
            users[name].append("<output>")
        return users

    @property
    def output_names(self) -> list[str]:
        return unique_refs(self.output)

    # --- execution --------------------------------------------------------------------------------

    def recompile(self) -> None:
        """Regenerate `forward` after the vertex list changed (passes build new DAGs instead)."""
        predecessors = [v.predecessors for v in self]  # read once, for the code and the in-place analysis
        self._code, self._line_to_vertex = _generate(self, predecessors)
        self._fn = _compile_source(self._code)
        self._calls = tuple(callable_of(v.module) for v in self)
        self._inference_calls = in_place_calls(self, predecessors)
        self._constants = tuple(_collect_constants(self))

    def replace_vertices(self, vertices: Sequence[Vertex]) -> None:
        """Swap vertices for new ones of the same names, ops and predecessors (other modules or arguments,
        such as new widths and the reshape sizes that go with them): the cheap way to edit a DAG in place.
        The forward is regenerated only when arguments changed."""
        for new in vertices:
            old = self[new.name]
            if new.op != old.op or new.predecessors != old.predecessors:
                raise DagError(
                    f"vertex {new.name!r} ({old.op} of {old.predecessors}) can only be replaced by "
                    f"one of the same op and inputs, not {new.op} of {new.predecessors}"
                )
        same_code = all(self[v.name].args == v.args and self[v.name].kwargs == v.kwargs for v in vertices)
        for new in vertices:
            self._vertices[new.name] = new
            self.vertex_modules[new.name] = new.module
        if same_code:
            self._calls = tuple(callable_of(v.module) for v in self)
            self._inference_calls = in_place_calls(self)
        else:
            self.recompile()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            calls = self._calls if torch.is_grad_enabled() else self._inference_calls
            return self._fn(calls, self._constants, *args, **kwargs)
        except Exception as error:
            _annotate(error, self)
            raise

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Random inputs shaped like the ones the DAG was converted with (from `input_meta`)."""
        inputs = []
        for name in self.input_names:
            meta = self.input_meta.get(name)
            if not meta or "shape" not in meta:
                raise DagError(f"input {name!r} has no recorded shape; pass inputs explicitly")
            dtype, shape = DTYPES.get(meta.get("dtype", "float32")), meta["shape"]
            if (
                dtype is None
                or not isinstance(shape, list)
                or not all(type(d) is int and d >= 0 for d in shape)
            ):
                raise DagError(f"input {name!r} has an unusable recorded shape/dtype {meta}")
            inputs.append(
                torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
            )
        return tuple(inputs)

    def run_collecting(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Run vertex by vertex and return every input's and vertex's value, keyed by name (slow path
        for analysis passes: shapes, activations for calibration)."""
        values = dict(zip(self.input_names, args))
        values.update(kwargs)
        missing = [n for n in self.input_names if n not in values]
        if missing:
            raise TypeError(f"missing inputs {missing} (inputs: {self.input_names})")
        for vertex in self:
            call_args = map_refs(vertex.args, lambda r: values[r.name])
            call_kwargs = map_refs(vertex.kwargs, lambda r: values[r.name])
            try:
                values[vertex.name] = callable_of(vertex.module)(*call_args, **call_kwargs)
            except Exception as error:
                _add_note(error, f"in torch_dag vertex {vertex!r}")
                raise
        return values

    @property
    def code(self) -> str:
        """The generated forward source, for reading and debugging."""
        return self._code

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_fn", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fn = _compile_source(self._code)

    def __deepcopy__(self: _DagT, memo: dict[int, Any]) -> _DagT:
        import copy

        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        state = {k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k != "_fn"}
        clone.__dict__.update(state)
        clone._fn = self._fn  # generated code is stateless: it reads calls/constants passed in
        return clone

    def extra_repr(self) -> str:
        return f"inputs={self.input_names}, vertices={len(self)}, outputs={self.output_names}"


# --- code generation ------------------------------------------------------------------------------


def _is_literal(value: Any) -> bool:
    """Values whose repr is plain, safe Python source (numbers, bools, None)."""
    if value is None or type(value) in (bool, int):
        return True
    return type(value) is float and math.isfinite(value)


def _collect_constants(dag: DagModule) -> list[Any]:
    constants: list[Any] = []
    _walk_constants(dag, constants.append)
    return constants


def _walk_constants(dag: DagModule, emit) -> None:
    """Visit the non-literal constants of every template in generation order."""

    def visit(template: Any) -> None:
        if isinstance(template, Ref) or _is_literal(template):
            return
        if isinstance(template, (list, tuple)):
            for item in template:
                visit(item)
        elif isinstance(template, dict):
            for key, value in template.items():
                emit(key)
                visit(value)
        elif isinstance(template, slice) and any(
            isinstance(x, Ref) for x in (template.start, template.stop, template.step)
        ):
            for item in (template.start, template.stop, template.step):
                visit(item)
        else:
            emit(template)

    for vertex in dag:
        visit(vertex.args)
        for value in vertex.kwargs.values():
            visit(value)
    visit(dag.output)


def _generate(dag: DagModule, predecessors: list[list[str]]) -> tuple[str, dict[int, str]]:
    """The source of `forward` for `dag` and, per line number, the vertex that line computes."""
    names = _local_names(dag)
    expr = _expression_writer(names)
    params = ", ".join(["__C", "__K", *dag.input_names])
    lines = [f"def forward({params}):"]
    calls = [f"__c{i}" for i in range(len(dag))]
    if calls:
        lines.append(f"    {', '.join(calls)}, = __C")
    line_to_vertex = {}
    dead_after = _dead_after(dag, predecessors, names)
    for i, vertex in enumerate(dag):
        line_to_vertex[len(lines) + 1] = vertex.name
        lines.append(f"    {names[vertex.name]} = {_call_code(vertex, calls[i], expr)}")
        if i in dead_after:  # free intermediates as soon as nothing reads them again, as eager code does
            lines.append(f"    {' = '.join(dead_after[i])} = None")
    lines.append(f"    return {expr(dag.output)}")
    return "\n".join(lines) + "\n", line_to_vertex


def _local_names(dag: DagModule) -> dict[str, str]:
    """The local variable of each vertex (`__v<i>`) and input (its own name) in the generated code."""
    names = {name: f"__v{i}" for i, name in enumerate(dag._vertices)}
    for name in dag.input_names:
        if not is_valid_vertex_name(name):
            raise DagError(f"input name {name!r} is not a valid identifier")
        names[name] = name
    return names


def _expression_writer(names: dict[str, str]) -> Callable[[Any], str]:
    """A function writing a call template as Python source: references become locals, literals their
    repr, and any other constant `__K[k]`, k counting up in the order `_walk_constants` visits them."""
    n_constants = count()

    def expr(template: Any) -> str:
        if isinstance(template, Ref):
            if template.name not in names:
                raise DagError(f"reference to unknown vertex {template.name!r}")
            return names[template.name]
        if _is_literal(template):
            return repr(template)
        if isinstance(template, list):
            return "[" + ", ".join(expr(x) for x in template) + "]"
        if isinstance(template, tuple):
            items = [expr(x) for x in template]
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        if isinstance(template, dict):
            return "{" + ", ".join(f"__K[{next(n_constants)}]: {expr(v)}" for v in template.values()) + "}"
        if isinstance(template, slice) and any(
            isinstance(x, Ref) for x in (template.start, template.stop, template.step)
        ):
            return f"slice({expr(template.start)}, {expr(template.stop)}, {expr(template.step)})"
        return f"__K[{next(n_constants)}]"

    return expr


def _dead_after(dag: DagModule, predecessors: list[list[str]], names: dict[str, str]) -> dict[int, list[str]]:
    """Per vertex index, the locals of intermediate vertices read for the last time there."""
    last_use: dict[str, int] = {}
    for i, names_read in enumerate(predecessors):
        for name in names_read:
            last_use[name] = i
    returned = set(unique_refs(dag.output))
    dead_after: dict[int, list[str]] = {}
    for name, i in last_use.items():
        if name in dag._vertices and name not in returned:
            dead_after.setdefault(i, []).append(names[name])
    return dead_after


def _call_code(vertex: Vertex, call: str, expr: Callable[[Any], str]) -> str:
    """The expression computing `vertex`, whose callable is the local `call`."""
    if isinstance(vertex.module, Parameter):
        return f"{call}.weight"
    if isinstance(vertex.module, Constant):
        return f"{call}.value"
    args = [expr(a) for a in vertex.args]
    for key, value in vertex.kwargs.items():
        if not key.isidentifier() or keyword.iskeyword(key):
            raise DagError(f"vertex {vertex.name!r}: keyword {key!r} is not an identifier")
        args.append(f"{key}={expr(value)}")
    return f"{call}({', '.join(args)})"


def _compile_source(source: str):
    """The forward function of generated `source`. The code is stateless (it reads the calls and
    constants passed in), so DAGs of the same source share one function: a level move back to a
    width seen before, or a load of a model built before, compiles nothing."""
    forward = _COMPILED.pop(source, None)
    if forward is None:
        filename = f"<torch_dag forward {next(_fresh_ids)}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        namespace: dict[str, Any] = {}
        exec(compile(source, filename, "exec"), {"__builtins__": {"slice": slice}}, namespace)  # our own code
        forward = namespace["forward"]
    _COMPILED[source] = forward  # the most recently used last
    while len(_COMPILED) > _MAX_COMPILED:
        _COMPILED.pop(next(iter(_COMPILED)))
    return forward


_COMPILED: dict[str, Any] = {}  # generated source -> its forward
_MAX_COMPILED = 256


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode for the block, then every submodule back in its own mode (a model whose
    parts were in different modes comes back as it was, which `train(was_training)` would not do)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def _add_note(error: BaseException, note: str) -> None:
    if sys.version_info >= (3, 11) and note not in getattr(error, "__notes__", ()):
        error.add_note(note)


def _annotate(error: BaseException, dag: DagModule) -> None:
    """Name the vertex whose line in the generated forward raised."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is dag._fn.__code__:
            name = dag._line_to_vertex.get(tb.tb_lineno)
            if name is not None:
                _add_note(error, f"in torch_dag vertex {dag[name]!r}")
            return
        tb = tb.tb_next


def iter_all_refs(dag: DagModule) -> Iterator[tuple[str, Ref]]:
    for vertex in dag:
        for ref in iter_refs((vertex.args, vertex.kwargs)):
            yield vertex.name, ref
