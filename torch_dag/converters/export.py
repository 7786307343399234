"""The torch.export path: for models symbolic tracing cannot follow (control flow on values, helpers fx
cannot trace), trace with `torch.export` and map its ATen graph back to the calls the fx path sees.

`torch.export.export` records a graph of ATen ops over lifted parameters and buffers. Each op is turned
back into the torch-level call it stands for (`aten.conv2d` -> `F.conv2d` on the model's own weight,
`aten.batch_norm` -> `F.batch_norm`, `aten.view` -> `x.view(...)`, ...), parameters and buffers become
`get_attr` nodes of their original names, and the result goes through the same canonicalizer as a
symbolic trace, so a conv on its weight becomes a `Conv2d` vertex either way. ATen ops with no torch
counterpart here raise an error naming the node and op. The DAG is checked against the model on the
example inputs before it is returned.

Every size of a tensor input is exported as dynamic (`Dim.AUTO`): sizes the model fixes stay fixed,
the others become size reads, so the DAG runs at other batch sizes and sequence lengths. What export
assumed about the sizes (its range constraints) becomes assert vertices on the inputs. With
`dynamic_batch`, sizes of 1 are not specialized either (torch's `backed_size_oblivious`), so a DAG
traced at batch 1 also runs at batch 4 and one traced at batch 4 at batch 1; that reasoning assumes a
size is never 1 on a branch, so the caller checks the DAG at another batch and exports without it
when they differ (the DAG then asserts the traced batch).
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..core import functions
from ..core.errors import ConversionError
from . import canonical, stateful
from .tracer import _light

# ATen ops whose torch-level spelling takes its arguments in another order or form
_ADAPTERS: dict[str, Callable[..., tuple[Any, tuple, dict]]] = {
    "batch_norm": lambda x, w, b, mean, var, training, momentum, eps, *_: (
        F.batch_norm,
        (x, mean, var, w, b, training, momentum, eps),
        {},
    ),
    "layer_norm": lambda x, shape, w=None, b=None, eps=1e-5, *_: (F.layer_norm, (x, shape, w, b, eps), {}),
    "group_norm": lambda x, groups, w=None, b=None, eps=1e-5, *_: (F.group_norm, (x, groups, w, b, eps), {}),
    "split_with_sizes": lambda x, sizes, dim=0: (torch.split, (x, sizes, dim), {}),
    "embedding": lambda weight, ids, padding_idx=-1, *_: (
        F.embedding,
        (ids, weight, None if padding_idx == -1 else padding_idx),
        {},
    ),
}
_GRAD_MODE = {torch._C._set_grad_enabled, torch.ops.higher_order.wrap_with_set_grad_enabled}
_SIZE_MATH = {math.ceil: functions.size_ceil, math.floor: functions.size_floor}
_DROPPED = {"_assert_tensor_metadata", "sym_constrain_range_for_size"}
_METHODS = {
    "view",
    "contiguous",
    "expand",
    "repeat",
    "to",
    "type_as",
    "clone",
    "detach",
    "masked_fill",
    "new_zeros",
    "new_ones",
    "new_full",
    "new_empty",
    "fill_",
    "zero_",
    "copy_",
    "index_put_",
}


def _index(node: fx.Node, args: tuple) -> tuple:
    """`x[..., a:b:s]` / `x[..., i]` along dim for aten.slice / aten.select (their rank from the export)."""
    x, dim, *rest = args
    leading = (slice(None),) * (dim % cast(fx.Node, node.args[0]).meta["val"].dim())
    if _schema(node).name.endswith("select"):
        return x, (*leading, rest[0])
    start, end, step = (rest + [None, None, 1][len(rest) :])[:3]
    end = None if isinstance(end, int) and end >= 2**62 else end  # aten spells "to the end" as int64 max
    return x, (*leading, slice(start, end, step))


def trace(
    model: nn.Module, inputs: dict[str, Any], dynamic_batch: bool = False
) -> tuple[fx.Graph, list[str]]:
    """A torch-level fx graph of `model` (get_attr nodes name its own parameters and buffers), made with
    torch.export on the example `inputs` (keyword arguments of forward; Python constants among them are
    baked in), with each node's value kept in `meta["td_value"]` as the fx path keeps it; and the names
    of the inputs."""
    program = _export(model, inputs, dynamic_batch)
    signature = program.graph_signature
    attrs = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    if (
        signature.inputs_to_lifted_tensor_constants
        or signature.buffers_to_mutate
        or signature.user_inputs_to_mutate
    ):
        raise ConversionError(
            f"{type(model).__name__}: the exported program has tensor constants or mutates "
            "buffers or inputs, which the torch.export path does not map yet"
        )
    user_inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name not in attrs]
    constant = {n for n, v in inputs.items() if v is None or isinstance(v, (bool, int, float, str))}
    names = [n for n in inputs if n not in constant]
    if len(user_inputs) == len(inputs):  # export keeps a placeholder for a constant input too
        user_inputs = [node for node, name in zip(user_inputs, inputs) if name not in constant]
    if len(user_inputs) != len(names):
        raise ConversionError(
            f"{type(model).__name__}: torch.export flattened the inputs {names} into "
            f"{len(user_inputs)} tensors; only tensor inputs are mapped"
        )
    by_node = dict(zip(user_inputs, names))
    _refuse_writes(model, program, attrs, by_node)
    graph = _torch_level_graph(program, attrs, by_node)
    graph.eliminate_dead_code()
    _record_values(model, graph, inputs)
    return graph, names


def _refuse_writes(
    model: nn.Module, program: torch.export.ExportedProgram, attrs: dict[str, str], inputs: dict[fx.Node, str]
) -> None:
    """Refuse ATen ops that write (by their schema) to a parameter, a buffer or an input, or to a view
    of one: the exported graph keeps them as in-place calls, and a DAG would drop the update."""
    holds: dict[fx.Node, str] = {n: f"input '{name}'" for n, name in inputs.items()}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in attrs:
            holds[node] = f"'{attrs[node.name]}'"
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        named = {**dict(zip([a.name for a in schema.arguments], node.args)), **node.kwargs}
        for argument in schema.arguments:
            value = named.get(argument.name)
            if argument.alias_info is not None and argument.alias_info.is_write and value in holds:
                what = holds[value]
                remedy = stateful.REMEDY_INPUT if what.startswith("input") else stateful.REMEDY_STATE
                line = stateful.user_line(node.meta.get("stack_trace") or "")
                raise stateful.StatefulForward(
                    f"{type(model).__name__}.forward updates {what} in place ({schema.name}){line}; {remedy}"
                )
        first = node.args[0] if node.args else None
        if first in holds and schema.returns and schema.returns[0].alias_info is not None:
            holds[node] = holds[first]  # a view of it


def _export(model: nn.Module, inputs: dict[str, Any], dynamic_batch: bool) -> torch.export.ExportedProgram:
    """torch.export of `model` with every size of a tensor input free to vary (export keeps the ones the
    model fixes, and checks its assumptions on the others); a model that cannot be exported so is
    exported at the example's sizes (not with `dynamic_batch`: the caller then exports without it)."""
    dynamic = {
        name: (
            {d: torch.export.Dim.AUTO for d in range(value.dim())}
            if isinstance(value, torch.Tensor)
            else None
        )
        for name, value in inputs.items()
    }
    try:
        if dynamic_batch:
            with fx_config.patch(  # type: ignore[attr-defined]  # installed by install_config_module
                backed_size_oblivious=True
            ):
                return torch.export.export(model, (), dict(inputs), dynamic_shapes=dynamic, strict=False)
        try:
            return torch.export.export(model, (), dict(inputs), dynamic_shapes=dynamic, strict=False)
        except Exception:
            return torch.export.export(model, (), dict(inputs), strict=False)
    except Exception as e:
        raise ConversionError(
            f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: {str(e)[:500]}"
        ) from e


def _torch_level_graph(
    program: torch.export.ExportedProgram, attrs: dict[str, str], input_names: dict[fx.Node, str]
) -> fx.Graph:
    """The exported ATen graph mapped node by node to torch-level calls (`_call`); parameters and
    buffers become get_attr nodes, user inputs placeholders named as the model's keyword inputs."""
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    symbols: dict[Any, tuple[fx.Node, str]] = {}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in attrs:
            env[node] = graph.get_attr(attrs[node.name])
        elif node.op == "placeholder" and node not in input_names:  # a constant input, baked in
            env[node] = node.meta.get("val")
        elif node.op == "placeholder":
            env[node] = graph.placeholder(input_names[node])
            _check_sizes(graph, env[node], node, program.range_constraints, symbols)
        elif node.op == "get_attr":  # the body of a higher-order op (a grad-mode region): refused by _call
            env[node] = None
        elif node.op == "call_function":
            _refuse_grad_mode(node)
            env[node] = _call(graph, node, env)
        elif node.op == "output":
            outputs = [env[n] if isinstance(n, fx.Node) else n for n in node.args[0]]
            graph.output(pytree.tree_unflatten(outputs, program.call_spec.out_spec))
        else:
            raise ConversionError(f"exported node '{node.name}' (op={node.op}) has no torch-level form")
        if isinstance(env.get(node), fx.Node):
            for key in ("nn_module_stack", "stack_trace"):
                if key in node.meta:
                    env[node].meta[key] = node.meta[key]
    return graph


def _check_sizes(
    graph: fx.Graph,
    placeholder: fx.Node,
    node: fx.Node,
    ranges: dict,
    symbols: dict[Any, tuple[fx.Node, str]],
) -> None:
    """Assert, when the DAG runs, the sizes torch.export traced the model for: a fixed size, the range
    of a size it let vary (a branch on it narrows that range), and sizes it found equal (`symbols`: the
    first read of each size symbol, shared across inputs)."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return
    for dim, size in enumerate(value.shape):
        where = f"input {placeholder.target!r} dimension {dim}"
        read = graph.call_method("size", (placeholder, dim))
        if isinstance(size, torch.SymInt) and size.node.expr.is_number:  # specialized while tracing
            size = int(size.node.expr)
        if isinstance(size, int):
            _assert(graph, operator.eq, read, size, f"{where}: torch.export traced the model for size {size}")
            continue
        symbol = size.node.expr
        first = symbols.setdefault(symbol, (read, where))
        if first[0] is not read:
            _assert(graph, operator.eq, read, first[0], f"{where} must equal {first[1]}, as when traced")
        bounds = ranges.get(symbol)
        if bounds is not None:
            low, high = _finite(bounds.lower), _finite(bounds.upper)
            if low is not None:
                _assert(
                    graph,
                    operator.ge,
                    read,
                    low,
                    f"{where}: torch.export traced the model for sizes >= {low}",
                )
            if high is not None:
                _assert(
                    graph,
                    operator.le,
                    read,
                    high,
                    f"{where}: torch.export traced the model for sizes <= {high}",
                )


def _finite(bound: Any) -> int | None:
    """A range bound as an int (None for an infinite one)."""
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _assert(graph: fx.Graph, compare: Callable, size: fx.Node, bound: Any, message: str) -> None:
    graph.call_function(torch._assert, (graph.call_function(compare, (size, bound)), message))


def _refuse_grad_mode(node: fx.Node) -> None:
    """torch.export records `torch.no_grad()` regions as grad-mode switches, which are not mapped."""
    if node.target in _GRAD_MODE:
        raise ConversionError(
            f"exported node '{node.name}': the model switches grad mode (torch.no_grad(), enable_grad() or "
            f"set_grad_enabled()) inside forward{stateful.user_line(node.meta.get('stack_trace') or '')}; "
            "the torch.export path does not map grad-mode regions: convert with tracer='fx', which keeps them"
        )


def _call(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    """The torch-level node for an ATen call (None for checks that have no place in a DAG)."""
    args, kwargs = cast(tuple[tuple, dict], fx.node.map_arg((node.args, node.kwargs), lambda n: env[n]))
    target = cast(Callable[..., Any], node.target)  # the target of a call_function node
    if target in _SIZE_MATH:
        return graph.call_function(_SIZE_MATH[target], args, kwargs)
    if not isinstance(target, torch._ops.OpOverload) and target in canonical.OP_BY_TARGET:
        return graph.call_function(target, args, kwargs)  # getitem, arithmetic on sizes, sym_min, ...
    if not isinstance(target, torch._ops.OpOverload):
        raise ConversionError(f"exported node '{node.name}': call of {target} has no torch-level form")
    name = target._schema.name.split("::")[-1]
    if name == "sym_size":  # a size read at run time (dynamic batch / sequence length)
        return graph.call_method("size", args, kwargs)
    if name == "_assert_scalar":  # a condition export assumed on the sizes: checked when the DAG runs
        return graph.call_function(torch._assert, args, kwargs)
    if name in _DROPPED:
        return None
    if name in ("alias", "lift_fresh_copy") and not kwargs:  # the same values
        return args[0]
    if name in ("slice", "select") and not kwargs:
        return graph.call_function(operator.getitem, _index(node, args))
    if name == "index" and not kwargs:  # x[i, j] with index tensors (None: the whole axis)
        x, indices = args
        return graph.call_function(
            operator.getitem, (x, tuple(slice(None) if i is None else i for i in indices))
        )
    if name in ("_to_copy", "to"):  # a dtype / device change; layout and memory format stay as they are
        named = _by_name(node, args, kwargs)
        if "other" in named:
            return graph.call_method("to", (args[0], named["other"]), {})
        kept = {k: named[k] for k in ("dtype", "device") if named.get(k) is not None}
        return graph.call_method("to", args[:1], kept) if kept else args[0]
    if name.startswith("upsample_") and not kwargs:  # upsample_nearest2d, upsample_bilinear2d, ...
        named = _by_name(node, args, kwargs)
        mode = name.removeprefix("upsample_").rstrip("123d")  # nearest, linear, bilinear, bicubic, trilinear
        options = {"size": named.get("output_size"), "scale_factor": named.get("scale_factors"), "mode": mode}
        if "align_corners" in named:
            options["align_corners"] = named["align_corners"]
        return graph.call_function(F.interpolate, (args[0],), options)
    if name == "linalg_vector_norm":  # what F.normalize decomposes into
        named = _by_name(node, args, kwargs)
        options = {"p": named.get("ord", 2), "dim": named.get("dim"), "keepdim": named.get("keepdim", False)}
        if named.get("dtype") is not None:
            options["dtype"] = named["dtype"]
        return graph.call_function(torch.norm, (args[0],), options)
    if name.endswith("_") and "inplace" in _parameters(
        getattr(F, name[:-1], None)
    ):  # F.silu(x, inplace=True)
        return graph.call_function(getattr(F, name[:-1]), args, {**kwargs, "inplace": True})
    if name in _ADAPTERS:
        function, args, kwargs = _ADAPTERS[name](*args, **kwargs)
        return graph.call_function(function, args, kwargs)
    if name in _METHODS or (
        not hasattr(F, name) and not hasattr(torch, name) and hasattr(torch.Tensor, name)
    ):
        return graph.call_method(name, args, kwargs)
    function = getattr(F, name, None) or getattr(torch, name, None)
    if function is None:
        raise ConversionError(f"exported node '{node.name}': ATen op {target} has no torch-level form here")
    return graph.call_function(function, args, kwargs)


def _parameters(function: Callable | None) -> set[str]:
    try:
        return set(inspect.signature(function).parameters) if function is not None else set()
    except (TypeError, ValueError):
        return set()


def _by_name(node: fx.Node, args: tuple, kwargs: dict) -> dict[str, Any]:
    """An ATen call's arguments by their schema names."""
    names = [a.name for a in _schema(node).arguments]
    return {**dict(zip(names, args)), **kwargs}


def _schema(node: fx.Node) -> torch.FunctionSchema:
    """The schema of the ATen op an exported call_function node calls."""
    return cast(torch._ops.OpOverload, node.target)._schema


def _fetch(root: nn.Module, qualname: str) -> Any:
    obj: Any = root
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _record_values(model: nn.Module, graph: fx.Graph, inputs: dict[str, Any]) -> None:
    """Run the graph on the example inputs and keep each node's value (shape and dtype) as the fx path does."""
    module = fx.GraphModule(model, graph)

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            try:
                value = super().run_node(node)
            except Exception as e:
                raise ConversionError(
                    f"the torch-level form of exported node '{node.name}' ({node.op} "
                    f"{getattr(node.target, '__name__', node.target)}) does not run: "
                    f"{type(e).__name__}: {str(e)[:300]}"
                ) from e
            node.meta["td_value"] = _light(value)
            return value

    with torch.no_grad():
        Recorder(module).run(*[inputs[n.target] for n in graph.nodes if n.op == "placeholder"])
