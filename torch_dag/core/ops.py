"""The closed op vocabulary: every vertex's module is one of these.

Two kinds of op share one registry, keyed by op name:
- module ops: standard `torch.nn` layers (`Conv2d`, `BatchNorm2d`, `ReLU`, ...) and torch_dag's tensor
  holders (`Parameter`, `Constant`). Their config is the constructor arguments, read back from the
  module; `build(config)` makes a fresh one (on the meta device, weights come from the state dict).
- function ops: `FunctionOp(name)`, a parameter-free module around a canonical callable from
  `functions.py` (`add`, `cat`, `reshape`, ...). Their arguments live in the vertex's call template.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, runtime_checkable

import torch
from torch import nn

from .errors import UnknownOpError
from .functions import FUNCTIONS, FunctionSpec
from .lowrank import LowRankConv2d, LowRankLinear
from .template import is_constant
from .traits import Trait, declare_traits
from .wsconv import WSConv2d

if TYPE_CHECKING:
    from .dag import DagModule

# --- torch_dag's own module ops -------------------------------------------------------------------


class Parameter(nn.Module):
    """A free parameter used directly in forward (a class token, a layer-scale gamma, ...)."""

    def __init__(
        self, shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float32, requires_grad: bool = True
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=requires_grad)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def requires_grad(self) -> bool:
        return self.weight.requires_grad

    def forward(self) -> torch.Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}"


class Constant(nn.Module):
    """A tensor the model reads but does not train (a buffer, a mask, a traced constant)."""

    value: torch.Tensor  # a registered buffer

    def __init__(self, shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float32):
        super().__init__()
        self.register_buffer("value", torch.empty(shape, dtype=dtype))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.value.dtype

    def forward(self) -> torch.Tensor:
        return self.value

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}"


class FunctionOp(nn.Module):
    """A parameter-free op from the function vocabulary; its arguments live in the vertex template."""

    def __init__(self, op: str):
        super().__init__()
        self.spec: FunctionSpec = function_spec(op)
        self.fn = self.spec.fn

    @property
    def op(self) -> str:
        return self.spec.name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def extra_repr(self) -> str:
        return self.op


# --- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleOpSpec:
    """How a module class is stored: its constructor arguments, read back as attributes."""

    name: str
    cls: type[nn.Module]
    params: tuple[inspect.Parameter, ...]

    @functools.cached_property
    def param_names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.params)

    def config(self, module: nn.Module) -> dict[str, Any]:
        config = {}
        derived = _DERIVED_CONFIG.get(self.cls, {})
        for param in self.params:
            if param.name in derived:
                config[param.name] = derived[param.name](module)
                continue
            if not hasattr(module, param.name):
                continue  # not kept by the module (e.g. PReLU's init): its state lives in the weights
            value = getattr(module, param.name)
            if isinstance(value, torch.Tensor) or (value is None and isinstance(param.default, bool)):
                value = value is not None  # `bias=True` is kept as the bias tensor itself
            if isinstance(value, torch.Size):
                value = tuple(value)
            if not is_constant(value):
                raise TypeError(f"{self.name}.{param.name} = {value!r} is not a storable constant")
            config[param.name] = value
        return config

    def build(self, config: dict[str, Any]) -> nn.Module:
        """A module of this op for `config` with its tensors on the meta device, for the caller to give
        real ones. The constructor (and its weight init, slow even on meta) runs once per config: later
        builds copy that first module (`clone_module`)."""
        try:
            key = (self.cls, _frozen(config))
        except TypeError:  # an unhashable value: build afresh
            key = None
        prototype = _PROTOTYPES.get(key) if key is not None else None
        if prototype is None:
            with torch.device("meta"):
                prototype = self.cls(**config)
            if key is not None:
                _PROTOTYPES[key] = prototype
                while len(_PROTOTYPES) > _MAX_PROTOTYPES:
                    _PROTOTYPES.pop(next(iter(_PROTOTYPES)))
        return clone_module(prototype)


_PROTOTYPES: dict[tuple, nn.Module] = {}  # (class, frozen config) -> the first module built for it
_MAX_PROTOTYPES = 1024


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a config value that tells 1, 1.0 and True apart."""
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return "dict", tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    hash(value)
    return type(value).__name__, value


def clone_module(module: nn.Module) -> nn.Module:
    """A copy of `module` sharing its tensors but not its containers (parameters, buffers, hooks and
    any other dict, list or set attribute), children cloned likewise."""
    clone = object.__new__(type(module))  # what copy.copy does, without its generic (slow) protocol
    clone.__dict__.update(
        {
            key: value.copy() if isinstance(value, (dict, list, set)) else value
            for key, value in module.__dict__.items()
        }
    )
    clone._modules = {k: None if m is None else clone_module(m) for k, m in module._modules.items()}
    return clone


MODULE_OPS: dict[type[nn.Module], ModuleOpSpec] = {}
_MODULE_OPS_BY_NAME: dict[str, ModuleOpSpec] = {}
CUSTOM_OPS: dict[str, CustomOpSpec] = {}
_CUSTOM_OPS_BY_CLASS: dict[type, CustomOpSpec] = {}
_SKIPPED_INIT_PARAMS = {"self", "device", "dtype", "_weight", "_freeze"}


# classes whose __init__ takes *args/**kwargs: the arguments they really take
_RNN_PARAMS = (
    "input_size",
    "hidden_size",
    "num_layers",
    "bias",
    "batch_first",
    "dropout",
    "bidirectional",
    "proj_size",
)
_INIT_PARAMS_OVERRIDE = {
    nn.LSTM: _RNN_PARAMS,
    nn.GRU: _RNN_PARAMS[:-1],
    nn.RNN: ("input_size", "hidden_size", "num_layers", "nonlinearity", *_RNN_PARAMS[3:-1]),
}


# constructor arguments a class does not keep as attributes of the same name
_DERIVED_CONFIG: dict[type[nn.Module], dict[str, Callable[[nn.Module], Any]]] = {
    nn.MultiheadAttention: {
        "bias": lambda m: m.in_proj_bias is not None,
        "add_bias_kv": lambda m: m.bias_k is not None,
    },
}


def _init_params(cls: type[nn.Module]) -> tuple[inspect.Parameter, ...]:
    """Constructor parameters stored in a config (device/dtype factory arguments of torch.nn excluded)."""
    if cls in _INIT_PARAMS_OVERRIDE:
        base = inspect.signature(nn.RNNBase.__init__).parameters
        return tuple(
            base.get(n) or inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default="tanh")
            for n in _INIT_PARAMS_OVERRIDE[cls]
        )
    skipped = _SKIPPED_INIT_PARAMS if cls.__module__.startswith("torch.nn") else {"self"}
    return tuple(
        p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name not in skipped and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


def register_module_op(
    cls: type[nn.Module], name: str | None = None, traits: Iterable[Trait] = ()
) -> type[nn.Module]:
    """Add a module class to the vocabulary with its traits (a duplicate name or class raises).

    Its config is its constructor arguments, read back from attributes of the same name."""
    name = name or cls.__name__
    if name in _MODULE_OPS_BY_NAME or name in FUNCTIONS or cls in MODULE_OPS or name in CUSTOM_OPS:
        raise ValueError(f"op {name!r} ({cls.__qualname__}) is already registered")
    spec = ModuleOpSpec(name, cls, _init_params(cls))
    declare_traits(name, traits)
    MODULE_OPS[cls] = spec
    _MODULE_OPS_BY_NAME[name] = spec
    return cls


# torch.nn layers in the vocabulary, by what they are
_A = (Trait.ACTIVATION, Trait.ELEMENTWISE)
_TORCH_NN_OPS: dict[tuple[Trait, ...], tuple[str, ...]] = {
    (Trait.CONV,): ("Conv1d", "Conv2d", "Conv3d"),
    (Trait.LINEAR,): ("Linear",),
    (Trait.BATCH_NORM,): ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"),
    (Trait.NORM,): (
        "LayerNorm",
        "GroupNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "LocalResponseNorm",
        "RMSNorm",
    ),
    _A: (
        "ReLU",
        "ReLU6",
        "LeakyReLU",
        "ELU",
        "CELU",
        "SELU",
        "GELU",
        "SiLU",
        "Mish",
        "Sigmoid",
        "Tanh",
        "Hardswish",
        "Hardsigmoid",
        "Hardtanh",
        "Softplus",
        "Softsign",
        "Tanhshrink",
        "Hardshrink",
        "Softshrink",
        "Threshold",
        "LogSigmoid",
    ),
    (Trait.ACTIVATION,): ("PReLU", "GLU"),
    (Trait.IDENTITY, Trait.ALIASES_INPUT): ("Identity",),
    (Trait.DROPOUT, Trait.ALIASES_INPUT): ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"),
    (Trait.POOL,): (
        "MaxPool1d",
        "MaxPool2d",
        "MaxPool3d",
        "AvgPool1d",
        "AvgPool2d",
        "AvgPool3d",
        "AdaptiveAvgPool1d",
        "AdaptiveAvgPool2d",
        "AdaptiveAvgPool3d",
        "AdaptiveMaxPool1d",
        "AdaptiveMaxPool2d",
        "AdaptiveMaxPool3d",
        "LPPool1d",
        "LPPool2d",
    ),
    (Trait.CONTRACTION,): ("MultiheadAttention",),
    (): (
        "ConvTranspose1d",
        "ConvTranspose2d",
        "ConvTranspose3d",
        "Bilinear",
        "Embedding",
        "Softmax",
        "LogSoftmax",
        "Softmax2d",
        "PixelShuffle",
        "PixelUnshuffle",
        "ChannelShuffle",
        "Fold",
        "Unfold",
        "LSTM",
        "GRU",
        "RNN",
    ),
}
for _traits, _names in _TORCH_NN_OPS.items():
    for _name in _names:
        register_module_op(getattr(nn, _name), traits=_traits)
register_module_op(Parameter, traits=[Trait.FACTORY])
register_module_op(Constant, traits=[Trait.FACTORY])
register_module_op(LowRankLinear)
register_module_op(LowRankConv2d)
register_module_op(WSConv2d)


# --- custom ops: module classes that store their own config -----------------------------------------


@dataclass(frozen=True)
class CustomOpSpec:
    """An op whose module class is not rebuilt from its constructor arguments (a layer above the core,
    such as a flexible layer): it says how to write its config and how to rebuild from one.

    `from_config(config, where)` must validate the (untrusted) config and raise `LoadError` naming `where`.
    `dag_class`, when set, is the `DagModule` subclass a DAG with vertices of this op is made into (its
    `from_dag(dag)` classmethod is called by the converter)."""

    name: str
    cls: type[nn.Module]
    to_config: Callable[[Any], dict[str, Any]]
    from_config: Callable[[Any, str], nn.Module]
    dag_class: type[DagModule] | None = None


def register_custom_op(spec: CustomOpSpec, traits: Iterable[Trait] = ()) -> CustomOpSpec:
    """Add an op whose modules are `spec.cls` (or subclasses) and store their own config."""
    if spec.name in CUSTOM_OPS or spec.name in FUNCTIONS or spec.name in _MODULE_OPS_BY_NAME:
        raise ValueError(f"op {spec.name!r} ({spec.cls.__qualname__}) is already registered")
    declare_traits(spec.name, traits)
    CUSTOM_OPS[spec.name] = spec
    _CUSTOM_OPS_BY_CLASS[spec.cls] = spec
    return spec


def custom_op_spec(module: nn.Module) -> CustomOpSpec | None:
    """The custom op `module` is an instance of (subclasses included), or None."""
    for klass in type(module).__mro__:
        spec = _CUSTOM_OPS_BY_CLASS.get(klass)
        if spec is not None:
            return spec
    return None


@runtime_checkable
class LayerProxy(Protocol):
    """A module that computes what one plain vocabulary layer computes, which layer being chosen at run
    time (a flexible layer at its current width). Analyses (FLOPs, parameters, aliasing) read that layer."""

    def current_layer(self) -> nn.Module: ...


def function_spec(name: str) -> FunctionSpec:
    if name not in FUNCTIONS:
        raise UnknownOpError(f"unknown function op {name!r}; known: {', '.join(sorted(FUNCTIONS))}")
    return FUNCTIONS[name]


def module_op_spec(name: str) -> ModuleOpSpec:
    if name not in _MODULE_OPS_BY_NAME:
        raise UnknownOpError(f"unknown module op {name!r}; known: {', '.join(sorted(_MODULE_OPS_BY_NAME))}")
    return _MODULE_OPS_BY_NAME[name]


def op_name(module: nn.Module) -> str:
    """The vocabulary name of a vertex's module; raises `UnknownOpError` for anything outside it."""
    if isinstance(module, FunctionOp):
        return module.op
    spec = MODULE_OPS.get(type(module))
    if spec is not None:
        return spec.name
    if is_dag_module(module):
        return "DagModule"
    custom = custom_op_spec(module)
    if custom is not None:
        return custom.name
    raise UnknownOpError(
        f"module class {type(module).__qualname__} is not in the op vocabulary; "
        f"register it with torch_dag.register_module_op or let the converter trace through it"
    )


def is_dag_module(module: nn.Module) -> TypeGuard[DagModule]:
    """Whether `module` is a `DagModule` (without importing it: the DAG module imports this one)."""
    return getattr(module, "_is_torch_dag_module", False)


declare_traits("DagModule", ())  # a nested DAG: an op of the vocabulary with no traits of its own


def known_ops() -> list[str]:
    return sorted([*FUNCTIONS, *_MODULE_OPS_BY_NAME, *CUSTOM_OPS, "DagModule"])


def callable_of(module: nn.Module) -> Callable[..., Any]:
    """What generated code calls for a vertex: the bare function for function ops (no hook overhead)."""
    return module.fn if isinstance(module, FunctionOp) else module
