"""A torch.fx tracer that also runs the model on example inputs while it traces.

Every proxy carries the concrete value its node computed. When model code needs a real Python
value from a proxy (an `if` on a shape, `int(x.shape[1])`, `for t in x.unbind(1)`, `math.ceil(h / 7)`),
the tracer hands out the concrete value and records a `guard` vertex that re-checks it at run time,
so a DAG can never silently take a different branch than the source model would. Without example
inputs it behaves like plain `torch.fx.symbolic_trace`.
"""

from __future__ import annotations

import contextlib
import functools
import keyword
import math
import operator
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate

from ..core.errors import ConversionError
from ..core.functions import FUNCTIONS
from ..core.ops import MODULE_OPS, ModuleOpSpec, custom_op_spec
from ..core.traits import Trait, ops_with
from .stateful import StateWatch, has_proxy

_MISSING = object()
_GUARD = FUNCTIONS["guard"].fn
# Functions whose int-list arguments often hold traced sizes: torch's argument parser would turn a proxy
# into a constant (or fail) before fx sees the call, so while tracing they record a node whenever any
# argument is a proxy. Besides the FACTORY ops (`torch.zeros(B, C)`, `x.new_zeros(B, C)`), these torch
# functions and methods of real tensors take sizes (`torch.reshape(x, (B, -1))`, `buf.expand(B, -1)`):
_SIZE_TAKING = (
    (torch, ("reshape", "tile", "broadcast_to", "roll", "narrow", "split", "unflatten")),
    (torch.nn.functional, ("pad",)),
)
_SIZE_TAKING_METHODS = ("expand", "view", "reshape", "repeat", "tile", "narrow", "unflatten", "split")


def _size_taking() -> tuple[list[tuple[Any, str]], list[str]]:
    """(namespace, name) of the functions and the names of the tensor methods that take sizes: the
    FACTORY ops' torch and method spellings (not `*_like`, which take a tensor) and the ones above."""
    functions = [(namespace, name) for namespace, names in _SIZE_TAKING for name in names]
    methods = list(_SIZE_TAKING_METHODS)
    for op in sorted(ops_with(Trait.FACTORY)):
        spellings = FUNCTIONS[op].spellings if op in FUNCTIONS else None
        if spellings is not None and not op.endswith("_like"):
            functions += [(torch, name) for name in spellings.torch]
            methods += list(spellings.methods)
    return functions, methods


def vocabulary_spec(module: nn.Module) -> ModuleOpSpec | None:
    """The vocabulary entry a module *is*: its class, or a subclass that keeps the base's forward. A
    parametrized layer (`nn.utils.parametrizations.weight_norm`) is none: its weight is computed on
    each call, so it is traced through and the parametrization becomes ops on the stored tensors."""
    if torch.nn.utils.parametrize.is_parametrized(module):
        return None
    for cls in type(module).__mro__:
        spec = MODULE_OPS.get(cls)
        if spec is not None:
            return spec if type(module).forward is spec.cls.forward else None
    return None


def named_forward(forward: Callable[..., Any], names: list[str], positional: int) -> Callable[..., Any]:
    """`forward(self, x, *args, **kwargs)` as a function of exactly the inputs `names` (the first
    `positional` passed by position, the rest by keyword): fx makes one placeholder per parameter of
    the function it traces, and would make single `*args` / `**kwargs` placeholders of a variadic one."""
    for name in names:
        if not name.isidentifier() or keyword.iskeyword(name) or name in ("self", "_td_forward"):
            raise ConversionError(
                f"input name {name!r} of {forward.__qualname__} is not a Python identifier a DAG input "
                "can take: give the input another name"
            )
    call = ", ".join([*names[:positional], *(f"{n}={n}" for n in names[positional:])])
    source = f"def forward(self, {', '.join(names)}):\n    return _td_forward(self, {call})\n"
    namespace: dict[str, Any] = {"_td_forward": forward}
    exec(compile(source, f"<inputs of {forward.__qualname__}>", "exec"), namespace)
    return namespace["forward"]


def without_caches(output: Any) -> Any:
    """`output` with its cache objects (an instance of a class named `...Cache`, such as a Hugging Face
    model's key/value cache) replaced by None: a DAG computes outputs, it keeps no state between calls.
    Dicts (a `ModelOutput`) are updated in place; any other object is left for the converter to refuse."""
    if type(output).__name__.endswith("Cache") and not isinstance(output, (torch.Tensor, fx.Proxy)):
        return None
    if type(output) in (tuple, list):
        return type(output)(without_caches(v) for v in output)
    if isinstance(output, dict):
        for key, value in list(output.items()):
            kept = without_caches(value)
            if kept is not value:
                output[key] = kept
    return output


def _value(arg: Any) -> Any:
    return map_aggregate(arg, lambda a: a._td_value if isinstance(a, ConcreteProxy) else a)


def _light(value: Any) -> Any:
    """What the converter keeps of a traced value: tensors become meta tensors (shape and dtype only)."""
    try:
        return map_aggregate(value, lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v)
    except Exception:  # exotic containers (return types of torch ops): nothing is kept
        return None


class ConcreteProxy(fx.Proxy):
    """A proxy that knows the value its node had on the example inputs."""

    def __init__(self, node: fx.Node, tracer: ConcreteTracer, value: Any = _MISSING):
        super().__init__(node, tracer)
        self._td_value = value

    @property
    def _known(self) -> bool:
        return self._td_value is not _MISSING

    def _specialize(self, value: Any, how: str, what: str) -> Any:
        """Hand out `value` (= how(self)) and record a guard that `how(self)` stays `value` at run time."""
        self.tracer.create_proxy("call_function", _GUARD, (self, how, value, what), {})
        return value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_td_value":
            raise AttributeError(name)
        return ConcreteAttribute.make(self, name)

    def __bool__(self) -> bool:
        if not self._known:
            return super().__bool__()
        return self._specialize(bool(self._td_value), "bool", f"the condition {self.node.name}")

    def __int__(self) -> int:
        if not self._known:
            raise fx.proxy.TraceError(f"int() of a symbolic value {self.node.name}")
        return self._specialize(int(self._td_value), "int", f"the integer {self.node.name}")

    def __index__(self) -> int:
        if not self._known:
            raise fx.proxy.TraceError(f"symbolic value {self.node.name} used as an index")
        return self._specialize(operator.index(self._td_value), "index", f"the index {self.node.name}")

    def __float__(self) -> float:
        if not self._known:
            raise fx.proxy.TraceError(f"float() of a symbolic value {self.node.name}")
        return self._specialize(float(self._td_value), "float", f"the number {self.node.name}")

    def __ceil__(self) -> int:
        return self._specialize(math.ceil(self._td_value), "ceil", f"ceil of {self.node.name}")

    def __floor__(self) -> int:
        return self._specialize(math.floor(self._td_value), "floor", f"floor of {self.node.name}")

    def __round__(self, ndigits: int | None = None) -> Any:
        if ndigits is not None:
            raise fx.proxy.TraceError(f"round({self.node.name}, ndigits) is not supported")
        return self._specialize(round(self._td_value), "round", f"round of {self.node.name}")

    def __trunc__(self) -> int:
        return self._specialize(math.trunc(self._td_value), "trunc", f"trunc of {self.node.name}")

    def __len__(self) -> int:
        if not self._known:
            return super().__len__()
        value = self._td_value
        if isinstance(value, torch.Tensor):
            size0 = cast(ConcreteProxy, self.tracer.create_proxy("call_method", "size", (self, 0), {}))
            return size0._specialize(len(value), "int", f"the size of dim 0 of {self.node.name}")
        return len(value)

    def __iter__(self) -> Iterator[Any]:
        if not self._known:
            return super().__iter__()
        return iter([self[i] for i in range(len(self))])  # type: ignore[index]  # fx adds it at run time

    def __contains__(self, item: Any) -> bool:
        if not self._known:
            raise fx.proxy.TraceError(f"'in' on a symbolic value {self.node.name}")
        raise fx.proxy.TraceError(f"'in' on a traced value {self.node.name} is not supported")

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})

    def keys(self) -> Any:
        return self._td_value.keys()


def _in_place_operator(name: str) -> Any:
    """`x += y` on a proxy: fx's Proxy has no `__iadd__`, so Python would rebind `x` to `x + y` and every
    other reference to the tensor (an input, a view's base, `y = x`) would miss the update. Recorded as
    the in-place operator instead, the converter functionalizes it (or refuses it, on an input)."""

    def method(self: ConcreteProxy, other: Any) -> Any:
        return self.tracer.create_proxy("call_function", getattr(operator, name), (self, other), {})

    method.__name__ = f"__{name}__"
    return method


for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor"):
    setattr(ConcreteProxy, f"__{_name}__", _in_place_operator(_name))


class ConcreteAttribute(fx.proxy.Attribute, ConcreteProxy):
    """`proxy.attr`: a getattr node (made lazily) or, when called, a method call."""

    def __init__(self, root: ConcreteProxy, attr: str):
        fx.proxy.Attribute.__init__(self, root, attr)
        value = getattr(root._td_value, attr, _MISSING) if root._known else _MISSING
        self._td_value = value

    @staticmethod
    def make(root: ConcreteProxy, attr: str) -> Any:
        """`x.device.type`, `x.dtype.is_floating_point`: facts about where and how a tensor is stored
        are read as constants (the DAG is moved with `.to()` like any module)."""
        if root._known and isinstance(root._td_value, (torch.device, torch.dtype)):
            return getattr(root._td_value, attr)
        return ConcreteAttribute(root, attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tracer.create_proxy("call_method", self.attr, (self.root, *args), kwargs)


class ConcreteTracer(fx.Tracer):
    """fx tracer over vocabulary leaves that computes concrete values alongside the graph."""

    def __init__(self, inputs: dict[str, Any] | None):
        super().__init__(autowrap_modules=(), autowrap_functions=())  # type: ignore[arg-type]  # stub: 1-tuple
        self.inputs = inputs
        self._eager = False  # True while running real values: fx's module patches step aside

    concrete_defaults: dict[str, Any] = {}
    named_inputs: tuple[list[str], int] | None = None  # a variadic forward's inputs: see `named_forward`
    watch: StateWatch | None = None  # set while tracing a model: refuses state updates, tracks grad mode
    _names_of: tuple[nn.Module, dict[int, str], dict[int, str]]  # set by `_tensor_names`

    def baked_default(self, placeholder: str) -> tuple[bool, Any]:
        """fx names the placeholder of a baked default argument `<name>_<k>`; is this one?"""
        base, _, k = placeholder.rpartition("_")
        if k.isdigit() and base in self.concrete_defaults:
            return True, self.concrete_defaults[base]
        return False, None

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        if self.named_inputs is not None:
            root_fn = named_forward(root_fn, *self.named_inputs)
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        return (lambda *a: without_caches(fn(*a))), args

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._eager or isinstance(attr_val, fx.Proxy):  # a value the trace stored on the module
            return attr_val
        if isinstance(attr_val, torch.Tensor):  # fx searches every parameter on each access: use an index
            params, buffers = self._tensor_names()
            name = params.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
            if name is None and self.proxy_buffer_attributes:
                name = buffers.get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)  # a tensor made since: search

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor) and not isinstance(a, fx.Proxy):  # a parameter/buffer: by index
            params, buffers = self._tensor_names()
            name = params.get(id(a)) if isinstance(a, nn.Parameter) else buffers.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def _tensor_names(self) -> tuple[dict[int, str], dict[int, str]]:
        """id -> qualified name of the root's parameters and buffers (the first name of a shared one)."""
        if getattr(self, "_names_of", None) is None or self._names_of[0] is not self.root:
            params = {id(p): n for n, p in reversed(list(self.root.named_parameters()))}
            buffers = {id(b): n for n, b in reversed(list(self.root.named_buffers()))}
            self._names_of = (self.root, params, buffers)
        return self._names_of[1], self._names_of[2]

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self._eager:
            return forward(*args, **kwargs)
        if not self.is_leaf_module(m, "") and not self._installed(m):
            return forward(*args, **kwargs)  # a module made on the fly (a kernel hub's layer): inline it
        return super().call_module(m, forward, args, kwargs)

    def _installed(self, m: nn.Module) -> bool:
        try:
            self.path_of_module(m)
            return True
        except NameError:
            return False

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return vocabulary_spec(m) is not None or custom_op_spec(m) is not None

    def proxy(self, node: fx.Node) -> ConcreteProxy:
        return ConcreteProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        watch = None if self._eager else self.watch
        if watch is not None:
            watch.before_call(kind, target, args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if watch is not None and isinstance(proxy, fx.Proxy):
            watch.after_call(proxy.node, kind, target, args, kwargs)
        if self.inputs is not None and isinstance(proxy, ConcreteProxy):
            self._eager = True
            try:
                proxy._td_value = self._run(self.inputs, kind, target, args, kwargs)
            finally:
                self._eager = False
            proxy.node.meta["td_value"] = _light(proxy._td_value)
        return proxy

    def _run(self, inputs: dict[str, Any], kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            baked, value = self.baked_default(target)
            return value if baked else inputs.get(target, _MISSING)
        if kind == "get_attr":
            return functools.reduce(getattr, target.split("."), self.root)
        args, kwargs = _value(args), _value(kwargs)
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            return self.root.get_submodule(target)(*args, **kwargs)
        raise AssertionError(kind)

    @contextlib.contextmanager
    def trace_through_fx_wraps(self) -> Iterator[None]:
        """Libraries mark helpers with `torch.fx.wrap` to keep plain fx out of their control flow; with
        concrete values we trace through them instead, so they end up as vocabulary ops."""
        import torch.fx._symbolic_trace as symbolic_trace

        wrapped = symbolic_trace._wrapped_fns_to_patch
        kept = {key: value for key, value in wrapped.items() if key[1] == "_assert_is_none"}
        symbolic_trace._wrapped_fns_to_patch = kept if self.inputs is not None else wrapped
        try:
            yield
        finally:
            symbolic_trace._wrapped_fns_to_patch = wrapped

    @contextlib.contextmanager
    def patch_dtype_info(self) -> Iterator[None]:
        """`torch.finfo(x.dtype).min` (a mask's fill value): with a known dtype the limits are constants,
        and a guard checks at run time that the dtype is still the one converted with."""
        originals = {name: getattr(torch, name) for name in ("finfo", "iinfo")}

        def wrap(info):
            def wrapper(dtype=None):
                if isinstance(dtype, ConcreteProxy) and dtype._known:
                    dtype = dtype._specialize(dtype._td_value, "dtype", f"the dtype {dtype.node.name}")
                return info() if dtype is None else info(dtype)

            return wrapper

        try:
            for name, info in originals.items():
                setattr(torch, name, wrap(info))
            yield
        finally:
            for name, info in originals.items():
                setattr(torch, name, info)

    @contextlib.contextmanager
    def patch_size_taking(self) -> Iterator[None]:
        """Make `torch.zeros(B, C)` and `buffer[:, :n]` with a traced `B` / `n` graph nodes instead of a
        TypeError or a constant."""
        functions, method_names = _size_taking()
        originals = {(namespace, name): getattr(namespace, name) for namespace, name in functions}

        def wrap(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                if has_proxy((args, kwargs)):
                    return self.create_proxy("call_function", fn, args, kwargs)
                return fn(*args, **kwargs)

            return wrapper

        def wrap_method(name, fn):
            @functools.wraps(fn)
            def wrapper(tensor, *args, **kwargs):
                if has_proxy((args, kwargs)):
                    return self.create_proxy("call_method", name, (tensor, *args), kwargs)
                return fn(tensor, *args, **kwargs)

            return wrapper

        def getitem(tensor, index):  # `self.pos[:, :n]` on a buffer with a traced `n`
            if has_proxy(index):
                return self.create_proxy("call_function", operator.getitem, (tensor, index), {})
            return original_getitem(tensor, index)

        original_getitem = torch.Tensor.__getitem__
        methods = {name: getattr(torch.Tensor, name) for name in method_names}
        try:
            for (namespace, name), fn in originals.items():
                setattr(namespace, name, wrap(fn))
            for name, fn in methods.items():
                setattr(torch.Tensor, name, wrap_method(name, fn))
            torch.Tensor.__getitem__ = functools.wraps(original_getitem)(getitem)  # type: ignore[method-assign]
            yield
        finally:
            for (namespace, name), fn in originals.items():
                setattr(namespace, name, fn)
            for name, fn in methods.items():
                setattr(torch.Tensor, name, fn)
            torch.Tensor.__getitem__ = original_getitem  # type: ignore[method-assign]
