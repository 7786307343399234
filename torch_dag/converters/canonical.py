"""From the spelling a model used to the canonical op of the vocabulary.

`x + y`, `torch.add(x, y)`, `x.add(y)` and `x += y` are all `add`; `F.relu(x)`, `x.relu()` and
`nn.ReLU()` are all the `ReLU` module op. Tables here are data: spelling -> op name, op name ->
argument normalizer, op name -> module constructor. Nothing outside the converter reads them.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.functions import FUNCTIONS
from ..core.template import iter_refs
from ..core.traits import Trait, has_trait

# --- spelling -> canonical function op ------------------------------------------------------------


def _build_spelling_tables() -> tuple[dict[Any, str], dict[str, str]]:
    by_target: dict[Any, str] = {}
    by_method: dict[str, str] = {}

    def claim(table: dict, key: Any, op: str, where: str) -> None:
        if key in table and table[key] != op:
            raise ValueError(f"{where} is claimed by both {table[key]!r} and {op!r}")
        table[key] = op

    for op, spec in FUNCTIONS.items():
        for namespace, names in (
            (torch, spec.spellings.torch),
            (F, spec.spellings.functional),
            (operator, spec.spellings.operator),
        ):
            for name in names:
                for spelling in (name, f"{name}_") if namespace is not operator else (name,):
                    target = getattr(namespace, spelling, None)  # torch.relu_ is relu, in place
                    if target is not None:
                        claim(by_target, target, op, f"{namespace.__name__}.{spelling}")
        for name in spec.spellings.torch:  # the C function a Python wrapper dispatches to (torch.meshgrid)
            target = getattr(torch._C._VariableFunctions, name, None)
            if target is not None and target not in by_target:
                by_target[target] = op
        for name in spec.spellings.methods:
            claim(by_method, name, op, f"Tensor.{name}")
        if spec.fn not in by_target:  # our canonical callables (e.g. from a converted DagModule)
            by_target[spec.fn] = op
    return by_target, by_method


OP_BY_TARGET, OP_BY_METHOD = _build_spelling_tables()

IN_PLACE_OPERATORS = {
    getattr(operator, n)
    for n in (
        "iadd",
        "isub",
        "imul",
        "itruediv",
        "ifloordiv",
        "imod",
        "ipow",
        "iand",
        "ior",
        "ixor",
        "imatmul",
    )
}


def is_in_place(kind: str, target: Any, kwargs: dict[str, Any]) -> bool:
    """Whether the call mutates its first argument (functionalized by the converter)."""
    if kwargs.get("inplace") is True:
        return True
    if kind == "call_method":
        return (target.endswith("_") and not target.endswith("__")) or target == "__setitem__"
    if target in IN_PLACE_OPERATORS or target is operator.setitem:
        return True
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


# --- argument normalization -----------------------------------------------------------------------

_DTYPE_METHODS = {
    "float": torch.float32,
    "double": torch.float64,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "int": torch.int32,
    "long": torch.int64,
    "bool": torch.bool,
}
_VARARG_SIZE_OPS = {"reshape", "permute", "expand", "repeat", "flip", "tile"}


def _pack_sizes(args: tuple, values: tuple) -> tuple:
    """`x.view(2, -1)` -> `reshape(x, (2, -1))`; `x.view((2, -1))` and `x.view(y.shape)` stay."""
    if len(args) == 2:
        value = values[1]
        if isinstance(value, (list, tuple)) or (
            value is not None and not isinstance(value, int) and not isinstance(value, torch.SymInt)
        ):
            return args
    return (args[0], tuple(args[1:]))


def normalize_method(method: str, op: str, args: tuple, kwargs: dict, values: tuple) -> tuple[tuple, dict]:
    """Method-call spellings whose arguments differ from the canonical op's."""
    if method in _DTYPE_METHODS:
        return (args[0], _DTYPE_METHODS[method]), {k: v for k, v in kwargs.items() if k != "memory_format"}
    if method in ("cuda", "cpu"):
        return (args[0], "cpu" if method == "cpu" else "cuda"), {}
    if method == "type" and len(args) == 2:
        return (args[0], args[1]), kwargs
    if op in _VARARG_SIZE_OPS and "shape" not in kwargs and "dims" not in kwargs and "size" not in kwargs:
        return _pack_sizes(args, values), kwargs
    return args, kwargs


_DROPPED_KWARGS = {"inplace", "_stacklevel"}


def bind_canonical(op: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Bind to the canonical signature so that every spelling gives the same template.

    Positional-or-keyword parameters become positional, keyword-only ones keywords; defaults are
    filled in. Ops without a Python signature keep their arguments as written.
    """
    kwargs = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
    signature = FUNCTIONS[op].signature
    if signature is None:
        return args, kwargs
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return args, kwargs  # let verify() report it with the vertex name
    bound.apply_defaults()
    new_args: list[Any] = []
    new_kwargs: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            new_args.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            new_kwargs.update(value)
        elif kind is inspect.Parameter.KEYWORD_ONLY:
            new_kwargs[name] = value
        else:
            new_args.append(value)
    return tuple(new_args), new_kwargs


# --- function ops that are module ops when their arguments are constants ---------------------------

# op name -> (module class, constructor parameter names in the function's positional order after input)
FUNCTION_TO_MODULE: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "relu": (nn.ReLU, ()),
    "relu6": (nn.ReLU6, ()),
    "gelu": (nn.GELU, ("approximate",)),
    "silu": (nn.SiLU, ()),
    "mish": (nn.Mish, ()),
    "hardswish": (nn.Hardswish, ()),
    "hardsigmoid": (nn.Hardsigmoid, ()),
    "sigmoid": (nn.Sigmoid, ()),
    "tanh": (nn.Tanh, ()),
    "elu": (nn.ELU, ("alpha",)),
    "celu": (nn.CELU, ("alpha",)),
    "selu": (nn.SELU, ()),
    "leaky_relu": (nn.LeakyReLU, ("negative_slope",)),
    "softplus": (nn.Softplus, ("beta", "threshold")),
    "hardtanh": (nn.Hardtanh, ("min_val", "max_val")),
    "logsigmoid": (nn.LogSigmoid, ()),
    "softsign": (nn.Softsign, ()),
    "tanhshrink": (nn.Tanhshrink, ()),
    "hardshrink": (nn.Hardshrink, ("lambd",)),
    "softshrink": (nn.Softshrink, ("lambd",)),
    "glu": (nn.GLU, ("dim",)),
    "softmax": (nn.Softmax, ("dim",)),
    "log_softmax": (nn.LogSoftmax, ("dim",)),
    "dropout": (nn.Dropout, ("p",)),
    "dropout1d": (nn.Dropout1d, ("p",)),
    "dropout2d": (nn.Dropout2d, ("p",)),
    "dropout3d": (nn.Dropout3d, ("p",)),
    "alpha_dropout": (nn.AlphaDropout, ("p",)),
    "adaptive_avg_pool1d": (nn.AdaptiveAvgPool1d, ("output_size",)),
    "adaptive_avg_pool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "adaptive_avg_pool3d": (nn.AdaptiveAvgPool3d, ("output_size",)),
    "adaptive_max_pool1d": (nn.AdaptiveMaxPool1d, ("output_size", "return_indices")),
    "adaptive_max_pool2d": (nn.AdaptiveMaxPool2d, ("output_size", "return_indices")),
    "avg_pool1d": (nn.AvgPool1d, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")),
    "avg_pool2d": (
        nn.AvgPool2d,
        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    ),
    "avg_pool3d": (
        nn.AvgPool3d,
        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    ),
    "max_pool1d": (
        nn.MaxPool1d,
        ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    ),
    "max_pool2d": (
        nn.MaxPool2d,
        ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    ),
    "max_pool3d": (
        nn.MaxPool3d,
        ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    ),
    "pixel_shuffle": (nn.PixelShuffle, ("upscale_factor",)),
    "pixel_unshuffle": (nn.PixelUnshuffle, ("downscale_factor",)),
    "channel_shuffle": (nn.ChannelShuffle, ("groups",)),
}
# keyword arguments of the function spelling that the module form does not take
_IGNORED_FOR_MODULE = {"inplace", "training", "_stacklevel", "train"}


def as_module_op(
    op: str, args: tuple, kwargs: dict, is_constant: Callable[[Any], bool]
) -> tuple[nn.Module, tuple] | None:
    """`F.gelu(x, approximate='tanh')` -> `(nn.GELU(approximate='tanh'), (x,))`, when it can be."""
    entry = FUNCTION_TO_MODULE.get(op)
    if entry is None or not args:
        return None
    cls, names = entry
    if op in ("softmax", "log_softmax"):
        if kwargs.get("dtype") is not None or (len(args) > 2 and args[2] is not None):
            return None
        args = args[:2]
    if has_trait(op, Trait.DROPOUT):
        args = args[:2]
    if len(args) - 1 > len(names):
        return None
    config = dict(zip(names, args[1:]))
    for key, value in kwargs.items():
        if key in _IGNORED_FOR_MODULE:
            continue
        if key not in names:
            return None
        config[key] = value
    if not all(is_constant(v) for v in config.values()) or any(True for _ in iter_refs(config)):
        return None  # a traced value (`kernel_size=(h // 16, w // 16)`) keeps the function op
    try:
        return cls(**config), (args[0],)
    except (TypeError, ValueError):
        return None
