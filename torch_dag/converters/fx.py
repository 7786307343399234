"""`build_from_unstructured_module`: any traceable `nn.Module` -> `DagModule` of vocabulary ops."""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_arg

from ..core.compare import compare_outputs
from ..core.dag import DagModule, Vertex, is_valid_vertex_name
from ..core.errors import ConversionError
from ..core.ops import Constant, FunctionOp, Parameter, custom_op_spec
from ..core.template import Ref, is_constant, unique_refs
from ..core.traits import Trait, has_trait
from . import canonical
from .patterns import raise_weight_standardization
from .tracer import ConcreteTracer, vocabulary_spec


def _as_dag_class(dag: DagModule) -> DagModule:
    """The DAG as the `DagModule` subclass its custom ops ask for (hand-written flexible layers make a
    flexible DAG), or as it is."""
    classes = {spec.dag_class for v in dag if (spec := custom_op_spec(v.module)) and spec.dag_class}
    if len(classes) > 1:
        names = ", ".join(sorted(c.__name__ for c in classes))
        raise ConversionError(f"the model mixes custom layers that need different DAG classes ({names})")
    return classes.pop().from_dag(dag) if classes else dag


def build_from_unstructured_module(
    model: nn.Module,
    example_inputs: Sequence[Any] | Any | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    tracer: str = "auto",
) -> DagModule:
    """Trace `model` into a `DagModule` of atomic vertices with equal outputs.

    `example_inputs` (a tensor or a tuple of positional inputs) and `example_kwargs` let the tracer run
    the model while it traces, which resolves Python control flow on shapes (each such decision becomes
    a run-time guard). Without them, timm-style models use `model.pretrained_cfg['input_size']`, and
    anything else is traced purely symbolically. Parameters and buffers are shared with `model`.

    `tracer`: "fx" (symbolic tracing), "export" (torch.export, mapped back to the same vocabulary; needs
    example inputs) or "auto": fx, then torch.export when fx fails and example inputs are given. The
    DAG's `traced_with` says which one made it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if tracer not in ("auto", "fx", "export"):
        raise ValueError(f"tracer must be 'auto', 'fx' or 'export', got {tracer!r}")
    inputs = _bind_example_inputs(model, example_inputs, example_kwargs)
    if tracer == "export":
        return _from_export(model, inputs)
    try:
        return _from_fx(model, inputs)
    except ConversionError as fx_error:
        if tracer == "fx" or inputs is None:
            raise
        try:
            return _from_export(model, inputs)
        except ConversionError as export_error:
            raise ConversionError(f"{fx_error}\n(torch.export fallback: {export_error})") from fx_error


def _from_export(model: nn.Module, inputs: dict[str, Any] | None) -> DagModule:
    from . import export

    if inputs is None:
        raise ConversionError("the torch.export path needs example inputs")
    was_training = model.training
    model.eval()
    try:
        graph, _ = export.trace(model, inputs)
        tracer = ConcreteTracer(inputs)
        dag = raise_weight_standardization(_Canonicalizer(model, graph, tracer).run()).eval()
        with torch.no_grad():
            equal, worst, why = compare_outputs(model(**_clone(inputs)), dag(**_clone(inputs)))
        if not equal:
            raise ConversionError(f"the DAG made through torch.export differs from {type(model).__name__} on the "
                                  f"example inputs (max difference {worst:.3g}: {why}); not returned")
        dag.traced_with = "export"
        return dag.train(was_training)
    finally:
        model.train(was_training)


def _from_fx(model: nn.Module, inputs: dict[str, Any] | None) -> DagModule:
    if vocabulary_spec(model) is not None:  # fx never treats the root as a leaf: wrap it
        model = _Root(model)
        inputs = {"input": inputs[next(iter(inputs))]} if inputs else None
    was_training = model.training
    snapshot = {module: [(state, dict(state)) for state in (vars(module), module._buffers, module._parameters)]
                for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            graph, tracer = _trace(model, inputs)
        dag = raise_weight_standardization(_Canonicalizer(model, graph, tracer).run())
        dag = _as_dag_class(dag)
        dag.traced_with = "fx"
        return dag.train(was_training)
    finally:
        _restore_attributes(snapshot)
        model.train(was_training)


def _restore_attributes(snapshot: dict[nn.Module, list[tuple[dict, dict]]]) -> None:
    """Undo what tracing left on the model: fx's `_tensor_constant` attributes and values a forward
    caches on itself (`self.rel_indices = ...`, even into buffers), which would hold proxies."""
    for states in snapshot.values():
        for state, before in states:
            for key in [k for k in state if k not in before]:
                del state[key]
            for key, value in before.items():
                if state.get(key, value) is not value:
                    state[key] = value


class _Root(nn.Module):
    """Holder that lets a single vocabulary layer (an `nn.LSTM`, a `Conv2d`) be traced as a leaf."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.layer = module

    def forward(self, input):
        return self.layer(input)


def _bind_example_inputs(model: nn.Module, example_inputs: Any, example_kwargs: dict | None
                         ) -> dict[str, Any] | None:
    if example_inputs is None and example_kwargs is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
            example_inputs = (torch.randn(1, *cfg["input_size"]),)
        else:
            return None
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*(example_inputs or ()), **(example_kwargs or {}))
    except TypeError as e:
        raise ConversionError(f"example inputs do not fit {type(model).__name__}.forward{signature}: {e}") from e
    arguments = {}
    for name, value in bound.arguments.items():  # **kwargs: its entries are inputs of their own names
        kind = signature.parameters[name].kind
        arguments.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    return {name: _clone(value) for name, value in arguments.items()}


def _clone(value: Any) -> Any:
    """Copy example tensors so in-place ops during tracing leave the caller's inputs alone."""
    return fx.node.map_aggregate(value, lambda v: v.clone() if isinstance(v, torch.Tensor) else v)


def _trace(model: nn.Module, inputs: dict[str, Any] | None) -> tuple[fx.Graph, ConcreteTracer]:
    tracer = ConcreteTracer(inputs)
    signature = inspect.signature(model.forward)
    concrete_args = {}
    for name, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConversionError(f"{type(model).__name__}.forward takes *{name}: give it named inputs")
        if (inputs is None or name not in inputs) and param.default is not param.empty:
            concrete_args[name] = param.default
    tracer.concrete_defaults = concrete_args
    try:
        with tracer.patch_size_taking(), tracer.trace_through_fx_wraps():
            graph = tracer.trace(model, concrete_args=concrete_args or None)
    except ConversionError:
        raise
    except Exception as e:
        where = _current_module(tracer)
        raise ConversionError(
            f"torch.fx could not trace {type(model).__name__}{where}: {type(e).__name__}: {e}. "
            + ("" if inputs is not None else "Passing example_inputs resolves shape-dependent control flow.")
        ) from e
    return graph, tracer


def _current_module(tracer: ConcreteTracer) -> str:
    stack = getattr(tracer, "module_stack", None)
    if stack:
        path, cls = list(stack.values())[-1] if isinstance(stack, dict) else (None, None)
        if path:
            return f" (inside module '{path}' of type {getattr(cls, '__name__', cls)})"
    return ""


def _owner(root: nn.Module, qualname: str) -> nn.Module | None:
    path = qualname.rsplit(".", 1)[0] if "." in qualname else ""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


class _Canonicalizer:
    """Walks the fx graph once, turning each node into a vertex of the vocabulary."""

    def __init__(self, root: nn.Module, graph: fx.Graph, tracer: ConcreteTracer):
        self.root = root
        self.graph = graph
        self.tracer = tracer
        self.vertices: dict[str, Vertex] = {}
        self.inputs: list[str] = []
        self.input_meta: dict[str, dict[str, Any]] = {}
        self.ref_of: dict[fx.Node, Any] = {}  # fx node -> Ref (or a constant for baked defaults)
        self.position = {node: i for i, node in enumerate(graph.nodes)}
        self.tensor_vertex: dict[int, str] = {}  # id(tensor) -> Parameter/Constant vertex name
        self.attr_of: dict[str, tuple[str, torch.Tensor]] = {}  # vertex -> (qualname, tensor)
        self.modules: dict[int, nn.Module] = {}  # id(source module) -> vocabulary module
        self.view_base: dict[str, str] = {}  # vertex -> the vertex it is a view of
        self.used_names: set[str] = set()
        self.baked_nodes: set[fx.Node] = set()  # fx's checks of baked default arguments
        self.transposed: dict[int, nn.Parameter] = {}  # id((in, out) weight) -> its (out, in) copy

    # --- driver -----------------------------------------------------------------------------------

    def run(self) -> DagModule:
        output = None
        for node in self.graph.nodes:
            try:
                if node.op == "output":
                    output = self.template(node.args[0], node)
                else:
                    self.ref_of[node] = getattr(self, f"on_{node.op}")(node)
            except ConversionError:
                raise
            except Exception as e:
                raise self.error(node, f"{type(e).__name__}: {e}") from e
        vertices = _live_vertices(list(self.vertices.values()), output)
        return DagModule(self.inputs, vertices, output, self.input_meta)

    def error(self, node: fx.Node, message: str) -> ConversionError:
        target = getattr(node.target, "__qualname__", node.target)
        return ConversionError(f"cannot convert fx node '{node.name}' (op={node.op}, target={target}"
                               f"{', module ' + repr(self.module_path(node)) if self.module_path(node) else ''})"
                               f": {message}")

    @staticmethod
    def module_path(node: fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack")
        return list(stack.values())[-1][0] if stack else ""

    def fresh_name(self, hint: str) -> str:
        name = hint if is_valid_vertex_name(hint) else f"v_{hint.strip('_')}"
        if not is_valid_vertex_name(name):
            name = "v"
        base, k = name, 1
        while name in self.used_names:
            name = f"{base}_{k}"
            k += 1
        self.used_names.add(name)
        return name

    def add(self, node: fx.Node | None, module: nn.Module, args: tuple = (), kwargs: dict | None = None,
            hint: str | None = None) -> Ref:
        name = self.fresh_name(hint or node.name)
        meta = {}
        if node is not None:
            if self.module_path(node):
                meta["module_path"] = self.module_path(node)
            value = node.meta.get("td_value")
            if isinstance(value, torch.Tensor):
                meta["shape"] = list(value.shape)
        self.vertices[name] = Vertex(name, module, tuple(args), dict(kwargs or {}), meta)
        return Ref(name)

    def template(self, arg: Any, node: fx.Node) -> Any:
        def ref(n: fx.Node) -> Any:
            if n not in self.ref_of:
                raise self.error(node, f"reads {n.name}, which was not converted")
            return self.ref_of[n]

        result = map_arg(arg, ref)
        if not is_constant(result) and not isinstance(result, Ref):
            bad = _first_unstorable(result)
            raise self.error(node, f"argument {bad!r} of type {type(bad).__name__} cannot be stored in a DAG")
        return result

    # --- node kinds -------------------------------------------------------------------------------

    def on_placeholder(self, node: fx.Node) -> Any:
        baked, value = self.tracer.baked_default(node.target)
        if baked:
            self.baked_nodes.add(node)
            return value
        name = str(node.target)
        if not is_valid_vertex_name(name):
            raise self.error(node, f"input name {name!r} cannot name a DAG input")
        self.used_names.add(name)
        self.inputs.append(name)
        value = node.meta.get("td_value")
        if isinstance(value, torch.Tensor):
            self.input_meta[name] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        return Ref(name)

    def on_get_attr(self, node: fx.Node) -> Ref:
        tensor = self.root.get_parameter(node.target) if _is_parameter(self.root, node.target) else None
        if tensor is None:
            tensor = _fetch(self.root, node.target)
        if not isinstance(tensor, torch.Tensor):
            raise self.error(node, f"attribute of type {type(tensor).__name__} is not a tensor")
        if id(tensor) in self.tensor_vertex:
            return Ref(self.tensor_vertex[id(tensor)])
        if isinstance(tensor, nn.Parameter):
            module = Parameter.__new__(Parameter)
            nn.Module.__init__(module)
            module.weight = tensor
        else:
            module = Constant.__new__(Constant)
            nn.Module.__init__(module)
            module.register_buffer("value", tensor)
        ref = self.add(node, module, hint=node.name)
        self.tensor_vertex[id(tensor)] = ref.name
        self.attr_of[ref.name] = (str(node.target), tensor)
        return ref

    def on_call_module(self, node: fx.Node) -> Ref:
        source = self.root.get_submodule(node.target)
        module = self.modules.get(id(source))
        if module is None:
            spec = vocabulary_spec(source)
            module = source
            if spec is not None and (type(source) is not spec.cls or getattr(source, "inplace", False)):
                module = copy.copy(source)  # shares parameters; we only change class / inplace flag
                module.__class__ = spec.cls
                if hasattr(module, "inplace"):
                    module.inplace = False
            self.modules[id(source)] = module
        args, kwargs = self.template(node.args, node), self.template(node.kwargs, node)
        ref = self.add(node, module, args, kwargs)
        if getattr(source, "inplace", False) and args and isinstance(args[0], Ref):
            self.functionalize(node, args[0], ref)
        return ref

    def on_call_function(self, node: fx.Node) -> Any:
        if node.target is getattr:
            return self.on_getattr(node)
        if _is_fx_internal_check(node, self.baked_nodes):
            self.baked_nodes.add(node)
            return None
        op = canonical.OP_BY_TARGET.get(node.target)
        if op is None:
            raise self.error(node, "this function is not in the op vocabulary "
                             "(see torch_dag.known_ops()); if it is a helper of the model, make sure "
                             "torch.fx traces through it")
        return self.on_call(node, op, self.template(node.args, node), self.template(node.kwargs, node))

    def on_call_method(self, node: fx.Node) -> Any:
        op = canonical.OP_BY_METHOD.get(node.target)
        if op is None:
            raise self.error(node, f"tensor method .{node.target}() is not in the op vocabulary")
        args, kwargs = self.template(node.args, node), self.template(node.kwargs, node)
        values = tuple(a.meta.get("td_value") if isinstance(a, fx.Node) else a for a in node.args)
        args, kwargs = canonical.normalize_method(node.target, op, args, kwargs, values)
        return self.on_call(node, op, args, kwargs)

    def on_getattr(self, node: fx.Node) -> Ref:
        source, attr = node.args
        x = self.template(source, node)
        value = source.meta.get("td_value") if isinstance(source, fx.Node) else None
        if attr == "shape":
            return self.add(node, FunctionOp("size"), (x,))
        if attr == "ndim":
            return self.add(node, FunctionOp("dim"), (x,))
        if attr == "dtype":
            return self.add(node, FunctionOp("dtype_of"), (x,))
        if attr == "device":
            return self.add(node, FunctionOp("device_of"), (x,))
        if attr == "data":
            return self.add(node, FunctionOp("detach"), (x,))
        if attr == "mT":
            return self.add(node, FunctionOp("transpose"), (x, -2, -1))
        if attr in ("values", "indices") and not isinstance(value, torch.Tensor):  # torch.max(x, dim) & co.
            fields = getattr(value, "_fields", ("values", "indices"))
            return self.add(node, FunctionOp("getitem"), (x, fields.index(attr)))
        if attr == "T" and isinstance(value, torch.Tensor):
            return self.add(node, FunctionOp("permute"), (x, tuple(range(value.dim() - 1, -1, -1))))
        raise self.error(node, f"attribute .{attr} of a traced value is not supported")

    def on_call(self, node: fx.Node, op: str, args: tuple, kwargs: dict) -> Ref:
        in_place = canonical.is_in_place(node.op, node.target, node.kwargs)
        args, kwargs = canonical.bind_canonical(op, args, kwargs)
        built = self.absorb_weights(node, op, args, kwargs) or canonical.as_module_op(op, args, kwargs,
                                                                                      is_constant)
        if built is not None:
            module, args = built
            path = self.module_path(node)  # a layer written functionally is named after its module
            ref = self.add(node, module, args, {}, hint=path.replace(".", "_") if path else None)
        else:
            ref = self.add(node, FunctionOp(op), args, kwargs)
        if has_trait(op, Trait.VIEW) and args and isinstance(args[0], Ref):  # in place on it mutates the base
            self.view_base[ref.name] = self.view_base.get(args[0].name, args[0].name)
        if in_place and args and isinstance(args[0], Ref):
            self.functionalize(node, args[0], ref)
        return ref

    # --- helpers ----------------------------------------------------------------------------------

    def functionalize(self, node: fx.Node, target: Ref, result: Ref) -> None:
        """`x.add_(y)` became `result = add(x, y)`: later readers of `x` must read `result`.

        A mutation through a view would also change the view's base; unless nothing reads the
        base afterwards, that cannot be expressed without aliasing, so it is refused.
        """
        base = self.view_base.get(target.name)
        if base is not None:
            base_nodes = [n for n, r in self.ref_of.items() if r == Ref(base)]
            later = [u for n in base_nodes for u in n.users if self.position[u] > self.position[node]]
            if later:
                raise self.error(node, f"in-place update of a view of '{base}', which is read again "
                                       f"afterwards by '{later[0].name}'; write it out of place")
        source_node = next(n for n in node.all_input_nodes if self.ref_of.get(n) == target)
        self.ref_of[source_node] = result  # every later node that reads the old value reads the new one

    def absorb_weights(self, node: fx.Node, op: str, args: tuple, kwargs: dict
                       ) -> tuple[nn.Module, tuple] | None:
        """`F.conv2d(x, self.weight, ...)` on the model's own parameters -> a `Conv2d` vertex sharing them."""
        maker = _ABSORBERS.get(op)
        if maker is None or kwargs:
            return None
        try:
            return maker(self, args, node)
        except (_NotAbsorbable, ValueError, TypeError):
            return None


def _first_unstorable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        for item in value:
            if not (is_constant(item) or isinstance(item, Ref)):
                return _first_unstorable(item)
    if isinstance(value, dict):
        for item in value.values():
            if not (is_constant(item) or isinstance(item, Ref)):
                return _first_unstorable(item)
    return value


def _is_parameter(root: nn.Module, qualname: str) -> bool:
    try:
        root.get_parameter(qualname)
        return True
    except AttributeError:
        return False


def _fetch(root: nn.Module, qualname: str) -> Any:
    obj: Any = root
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _is_fx_internal_check(node: fx.Node, baked_nodes: set[fx.Node]) -> bool:
    """fx checks that baked default arguments keep their value; no input exists for them in a DAG."""
    if getattr(node.target, "__name__", "") == "_assert_is_none":
        return True
    inputs = node.all_input_nodes
    return node.target in (torch._assert, operator.eq) and bool(inputs) and all(n in baked_nodes for n in inputs)


def _live_vertices(vertices: list[Vertex], output: Any) -> list[Vertex]:
    """Drop vertices nothing reads, keeping side-effecting ones (asserts, guards)."""
    live = set(unique_refs(output))
    for vertex in reversed(vertices):
        if vertex.name in live or has_trait(vertex.op, Trait.SIDE_EFFECT):
            live.add(vertex.name)
            live.update(vertex.predecessors)
    return [v for v in vertices if v.name in live]


# --- functional layers on the model's own parameters -> modules sharing them -----------------------


class _NotAbsorbable(Exception):
    pass


def _attr(c: _Canonicalizer, arg: Any, *, parameter: bool = True) -> torch.Tensor | None:
    """The model tensor an argument reads directly (None for None); anything else is not absorbable."""
    if arg is None:
        return None
    if isinstance(arg, Ref) and arg.name in c.attr_of:
        tensor = c.attr_of[arg.name][1]
        if not parameter or isinstance(tensor, nn.Parameter):
            return tensor
    raise _NotAbsorbable


def _constants(*values: Any) -> None:
    if not all(is_constant(v) for v in values):
        raise _NotAbsorbable


def _meta_module(cls: type[nn.Module], **config: Any) -> nn.Module:
    with torch.device("meta"):
        return cls(**config)


def _absorb_linear(c: _Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    x, weight, bias = args
    weight, bias = _attr(c, weight), _attr(c, bias)
    if weight is None or weight.dim() != 2:
        raise _NotAbsorbable
    module = _meta_module(nn.Linear, in_features=weight.shape[1], out_features=weight.shape[0],
                          bias=bias is not None)
    module.weight, module.bias = weight, bias
    return module, (x,)


def _absorb_addmm(c: _Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    """`torch.addmm(bias, x, weight)` on the model's own (in, out) weight, a linear layer written as a
    matrix product (GPT-2's Conv1D) -> a `Linear` vertex. Its weight is a transposed copy, made once per
    source weight so that a weight used twice stays shared in the DAG (not with the source model)."""
    bias, x, weight = args
    bias, weight = _attr(c, bias), _attr(c, weight)
    if weight is None or weight.dim() != 2 or bias is None or tuple(bias.shape) != (weight.shape[1],):
        raise _NotAbsorbable
    if id(weight) not in c.transposed:
        c.transposed[id(weight)] = nn.Parameter(weight.detach().t().contiguous(), weight.requires_grad)
    module = _meta_module(nn.Linear, in_features=weight.shape[0], out_features=weight.shape[1])
    module.weight, module.bias = c.transposed[id(weight)], bias
    return module, (x,)


def _absorb_conv(cls: type[nn.Module]):
    def absorb(c: _Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
        x, weight, bias, stride, padding, dilation, groups = args
        weight, bias = _attr(c, weight), _attr(c, bias)
        _constants(stride, padding, dilation, groups)
        if weight is None:
            raise _NotAbsorbable
        module = _meta_module(cls, in_channels=weight.shape[1] * groups, out_channels=weight.shape[0],
                              kernel_size=tuple(weight.shape[2:]), stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=bias is not None)
        module.weight, module.bias = weight, bias
        return module, (x,)

    return absorb


def _absorb_batch_norm(c: _Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    """An eval-mode `F.batch_norm` in a BatchNorm subclass's own forward, on its own tensors (timm's
    BatchNormAct2d): in training it would have used batch statistics, exactly as `nn.BatchNorm2d` does."""
    x, running_mean, running_var, weight, bias, training, _momentum, eps = args
    mean = _attr(c, running_mean, parameter=False)
    if mean is None or training is not False:
        raise _NotAbsorbable
    owner_path = c.attr_of[running_mean.name][0].rpartition(".")[0]
    if owner_path != c.module_path(node):
        raise _NotAbsorbable
    owner = _owner(c.root, c.attr_of[running_mean.name][0])
    cls = next((k for k in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) if isinstance(owner, k)), None)
    if cls is None or owner.running_mean is not mean or owner.running_var is not _attr(
            c, running_var, parameter=False):
        raise _NotAbsorbable
    affine = owner.affine and _attr(c, weight) is owner.weight and _attr(c, bias) is owner.bias
    if not affine and (weight is not None or bias is not None):
        raise _NotAbsorbable
    _constants(eps)
    module = _meta_module(cls, num_features=mean.shape[0], eps=eps, momentum=owner.momentum,
                          affine=affine, track_running_stats=True)
    if affine:
        module.weight, module.bias = owner.weight, owner.bias
    module.running_mean, module.running_var = owner.running_mean, owner.running_var
    module.num_batches_tracked = owner.num_batches_tracked
    return module, (x,)


def _absorb_layer_norm(c: _Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    x, shape, weight, bias, eps = args
    weight, bias = _attr(c, weight), _attr(c, bias)
    _constants(shape, eps)
    module = _meta_module(nn.LayerNorm, normalized_shape=shape, eps=eps, elementwise_affine=weight is not None,
                          bias=bias is not None)
    if weight is None and bias is not None:
        raise _NotAbsorbable
    module.weight, module.bias = weight, bias
    return module, (x,)


def _absorb_group_norm(c: _Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    x, groups, weight, bias, eps = args
    weight, bias = _attr(c, weight), _attr(c, bias)
    _constants(groups, eps)
    if weight is None or bias is None:
        raise _NotAbsorbable
    module = _meta_module(nn.GroupNorm, num_groups=groups, num_channels=weight.shape[0], eps=eps)
    module.weight, module.bias = weight, bias
    return module, (x,)


def _absorb_rms_norm(c: _Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    x, shape, weight, eps = args
    weight = _attr(c, weight)
    _constants(shape, eps)
    module = _meta_module(nn.RMSNorm, normalized_shape=shape, eps=eps, elementwise_affine=weight is not None)
    module.weight = weight
    return module, (x,)


def _absorb_embedding(c: _Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    ids, weight, *options = args
    weight = _attr(c, weight)
    padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse = (*options, None, None, 2.0, False, False)[:5]
    if weight is None or weight.dim() != 2 or max_norm is not None:
        raise _NotAbsorbable
    _constants(padding_idx, norm_type, scale_grad_by_freq, sparse)
    module = _meta_module(nn.Embedding, num_embeddings=weight.shape[0], embedding_dim=weight.shape[1],
                          padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)
    module.weight = weight
    return module, (ids,)


_ABSORBERS = {
    "embedding": _absorb_embedding,
    "linear": _absorb_linear,
    "addmm": _absorb_addmm,
    "conv1d": _absorb_conv(nn.Conv1d),
    "conv2d": _absorb_conv(nn.Conv2d),
    "conv3d": _absorb_conv(nn.Conv3d),
    "batch_norm": _absorb_batch_norm,
    "layer_norm": _absorb_layer_norm,
    "group_norm": _absorb_group_norm,
    "rms_norm": _absorb_rms_norm,
}

__all__ = ["build_from_unstructured_module"]
