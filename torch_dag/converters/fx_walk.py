"""`Canonicalizer`: one walk over a traced fx graph that turns each node into a vertex of the vocabulary.

Placeholders become inputs, parameters and buffers `Parameter` / `Constant` vertices, vocabulary layers
module vertices, and torch calls and tensor methods function vertices (or module vertices, when a layer
written functionally uses the model's own weights: `absorb.py`). In-place calls are functionalized.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_arg

from ..core.dag import DagModule, Vertex, is_valid_vertex_name
from ..core.errors import ConversionError
from ..core.ops import Constant, FunctionOp, Parameter
from ..core.template import Ref, is_constant, unique_refs
from ..core.traits import Trait, has_trait
from . import canonical, stateful
from .absorb import ABSORBERS, NotAbsorbable
from .tracer import ConcreteTracer, vocabulary_spec


class Canonicalizer:
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
        self.detached: dict[str, Ref] = {}  # vertex computed under no_grad -> its detached value

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
        return ConversionError(
            f"cannot convert fx node '{node.name}' (op={node.op}, target={target}"
            f"{', module ' + repr(self.module_path(node)) if self.module_path(node) else ''})"
            f": {message}"
        )

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

    def add(
        self,
        node: fx.Node,
        module: nn.Module,
        args: tuple = (),
        kwargs: dict | None = None,
        hint: str | None = None,
    ) -> Ref:
        name = self.fresh_name(hint or node.name)
        meta: dict[str, Any] = {}
        if self.module_path(node):
            meta["module_path"] = self.module_path(node)
        value = node.meta.get("td_value")
        if isinstance(value, torch.Tensor):
            meta["shape"] = list(value.shape)
        self.vertices[name] = Vertex(name, module, tuple(args), dict(kwargs or {}), meta)
        return Ref(name)

    def template(self, arg: Any, node: fx.Node) -> Any:
        reader_grad = node.op == "output" or node.meta.get("td_grad", True)

        def ref(n: fx.Node) -> Any:
            if n not in self.ref_of:
                raise self.error(node, f"reads {n.name}, which was not converted")
            if reader_grad and n.meta.get("td_grad", True) is False:
                return self.leave_no_grad(n, node)
            return self.ref_of[n]

        result = map_arg(arg, ref)
        if not is_constant(result) and not isinstance(result, Ref):
            bad = _first_unstorable(result)
            raise self.error(node, f"argument {bad!r} of type {type(bad).__name__} cannot be stored in a DAG")
        return result

    # --- node kinds -------------------------------------------------------------------------------

    def on_placeholder(self, node: fx.Node) -> Any:
        baked, value = self.tracer.baked_default(cast(str, node.target))
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
            self.input_meta[name] = {
                "shape": list(value.shape),
                "dtype": str(value.dtype).removeprefix("torch."),
            }
        return Ref(name)

    def on_get_attr(self, node: fx.Node) -> Ref:
        qualname = cast(str, node.target)
        tensor = self.root.get_parameter(qualname) if _is_parameter(self.root, qualname) else None
        if tensor is None:
            tensor = _fetch(self.root, qualname)
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
        source = self.root.get_submodule(cast(str, node.target))
        module = self.modules.get(id(source))
        if module is None:
            spec = vocabulary_spec(source)
            module = source
            if spec is not None and (type(source) is not spec.cls or getattr(source, "inplace", False)):
                module = copy.copy(source)  # shares parameters; we only change class / inplace flag
                module.__class__ = spec.cls
                if hasattr(module, "inplace"):
                    module.inplace = False  # type: ignore[assignment]  # torch's stub: only tensors, modules
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
            raise self.error(
                node,
                "this function is not in the op vocabulary "
                "(see torch_dag.known_ops()); if it is a helper of the model, make sure "
                "torch.fx traces through it",
            )
        if op == "add" and (spliced := self.spliced_sizes(node)) is not None:
            return spliced
        return self.on_call(node, op, self.template(node.args, node), self.template(node.kwargs, node))

    def spliced_sizes(self, node: fx.Node) -> list | None:
        """`x.size()[:-1] + (n,)`: a tuple of sizes spliced from parts stays a list of its entries (a
        size read from a tensor, a number), so a reshape to it sees each size, as if spelled out."""
        if len(node.args) != 2 or node.kwargs:
            return None
        values = [fx.node.map_arg(a, lambda n: n.meta.get("td_value")) for a in node.args]
        sizes = [v for v in values if isinstance(v, tuple) and all(type(i) is int for i in v)]
        if len(sizes) != 2:
            return None
        entries: list = []
        for arg, value in zip(node.args, sizes):
            part = self.template(arg, node)
            if isinstance(part, Ref):
                part = [self.add(node, FunctionOp("getitem"), (part, i)) for i in range(len(value))]
            entries.extend(part)
        return entries

    def on_call_method(self, node: fx.Node) -> Any:
        method = cast(str, node.target)
        op = canonical.OP_BY_METHOD.get(method)
        if op is None:
            raise self.error(node, f"tensor method .{node.target}() is not in the op vocabulary")
        args, kwargs = self.template(node.args, node), self.template(node.kwargs, node)
        values = tuple(a.meta.get("td_value") if isinstance(a, fx.Node) else a for a in node.args)
        args, kwargs = canonical.normalize_method(method, op, args, kwargs, values)
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
        built = self.absorb_weights(node, op, args, kwargs) or canonical.as_module_op(
            op, args, kwargs, is_constant
        )
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
        self.refuse_state_write(node, base or target.name)
        if base is not None:
            base_nodes = [n for n, r in self.ref_of.items() if r == Ref(base)]
            later = [u for n in base_nodes for u in n.users if self.position[u] > self.position[node]]
            if later:
                written = self.write_back(node, target, Ref(base), result)
                if written is None:
                    raise self.error(
                        node,
                        f"in-place update of a view of '{base}', which is read again "
                        f"afterwards by '{later[0].name}'; write it out of place",
                    )
                for base_node in base_nodes:
                    self.ref_of[base_node] = written
        for source_node in [n for n, ref in self.ref_of.items() if ref == target]:
            self.ref_of[source_node] = result  # later readers of the old value (and its aliases: the
            # result of an earlier in-place call on it, `y.mul_(2).add_(1)`) read the new one

    def write_back(self, node: fx.Node, view: Ref, base: Ref, result: Ref) -> Ref | None:
        """`b[i:j].zero_()` with `b` read afterwards: `b` becomes `index_put(b, index, result)` when the
        view is one indexing of the base and no other view of it is read later (it would see the
        write too); otherwise None."""
        vertex = self.vertices.get(view.name)
        if vertex is None or vertex.op != "getitem" or vertex.args[0] != base:
            return None
        others = [n for n, v in self.view_base.items() if v == base.name and n != view.name]
        for other in others:
            nodes = [n for n, r in self.ref_of.items() if r == Ref(other)]
            if any(self.position[u] > self.position[node] for n in nodes for u in n.users):
                return None
        return self.add(
            node, FunctionOp("index_put"), (base, vertex.args[1], result), hint=f"{base.name}_written"
        )

    def leave_no_grad(self, n: fx.Node, reader: fx.Node) -> Any:
        """A value computed under `torch.no_grad()` read where gradients flow: detached, as eager
        autograd sees it (one `detach` vertex per value)."""
        ref, value = self.ref_of[n], n.meta.get("td_value", stateful.UNKNOWN)
        if not isinstance(ref, Ref) or (
            value is not stateful.UNKNOWN and not stateful.contains_tensor(value)
        ):
            return ref
        if not isinstance(value, torch.Tensor):
            why = (
                "its value is not known (pass example inputs)"
                if value is stateful.UNKNOWN
                else "not a tensor"
            )
            raise self.error(
                reader,
                f"reads '{n.name}', computed under torch.no_grad() in forward, where gradients flow; "
                f"it must be detached there but {why}. Detach it in the model or convert with example inputs",
            )
        if ref.name not in self.detached:
            self.detached[ref.name] = self.add(n, FunctionOp("detach"), (ref,), hint=f"{ref.name}_no_grad")
        return self.detached[ref.name]

    def refuse_state_write(self, node: fx.Node, base: str) -> None:
        """An in-place write to an input, a parameter or a buffer (or a view of one) is a change the
        caller or the next call would see; a DAG cannot make it, so it is refused."""
        if base in self.inputs:
            what, remedy = f"input '{base}'", stateful.REMEDY_INPUT
        elif base in self.attr_of:
            what, remedy = f"'{self.attr_of[base][0]}'", stateful.REMEDY_STATE
        else:
            return
        line = stateful.user_line(node.meta.get("stack_trace") or "")
        message = f"{type(self.root).__name__}.forward updates {what} in place{line}; {remedy}"
        raise stateful.StatefulForward(str(self.error(node, message)))

    def absorb_weights(
        self, node: fx.Node, op: str, args: tuple, kwargs: dict
    ) -> tuple[nn.Module, tuple] | None:
        """`F.conv2d(x, self.weight, ...)` on the model's own parameters -> a `Conv2d` vertex sharing them."""
        maker = ABSORBERS.get(op)
        if maker is None or kwargs:
            return None
        try:
            return maker(self, args, node)
        except (NotAbsorbable, ValueError, TypeError):
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
    return (
        node.target in (torch._assert, operator.eq) and bool(inputs) and all(n in baked_nodes for n in inputs)
    )


def _live_vertices(vertices: list[Vertex], output: Any) -> list[Vertex]:
    """Drop vertices nothing reads, keeping side-effecting ones (asserts, guards)."""
    live = set(unique_refs(output))
    for vertex in reversed(vertices):
        if vertex.name in live or has_trait(vertex.op, Trait.SIDE_EFFECT):
            live.add(vertex.name)
            live.update(vertex.predecessors)
    return [v for v in vertices if v.name in live]
