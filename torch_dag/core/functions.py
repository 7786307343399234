"""The function ops of the vocabulary: what models write as functions, methods or operators.

Each entry is one canonical op: a name, the Python callable that runs it, and the spellings that
mean it (`torch.add`, `x.add(...)`, `x + y`, `x += y`, ...). Spellings are data, read by the
converter; the op knows nothing of where it came from. Canonical callables accept Python numbers
as well as tensors, so shape arithmetic (`x.shape[0] * 2`) runs through the same ops.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .traits import Trait, declare_traits

ELEMENTWISE, ACTIVATION, DROPOUT, NORM = Trait.ELEMENTWISE, Trait.ACTIVATION, Trait.DROPOUT, Trait.NORM
VIEW, ALIASES, IDENTITY, METADATA = Trait.VIEW, Trait.ALIASES_INPUT, Trait.IDENTITY, Trait.METADATA
REDUCTION, CONTRACTION, POOL, FACTORY = Trait.REDUCTION, Trait.CONTRACTION, Trait.POOL, Trait.FACTORY


@dataclass(frozen=True)
class Spellings:
    """Where an op is found in source code: `torch.X`, `F.X`, `operator.X`, `tensor.X(...)`."""

    torch: tuple[str, ...] = ()
    functional: tuple[str, ...] = ()
    operator: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    fn: Callable[..., Any]
    spellings: Spellings
    traits: frozenset[Trait] = frozenset()
    signature: inspect.Signature | None = field(default=None, compare=False)

    @property
    def side_effect(self) -> bool:
        """Kept even when its output is unused (asserts, guards)."""
        return Trait.SIDE_EFFECT in self.traits


FUNCTIONS: dict[str, FunctionSpec] = {}


def _register(name: str, fn: Callable[..., Any], spellings: Spellings, traits: Iterable[Trait] = ()) -> None:
    if name in FUNCTIONS:
        raise ValueError(f"function op {name!r} registered twice")
    declare_traits(name, traits)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # C builtins without a Python signature: args stay as written
        signature = None
    FUNCTIONS[name] = FunctionSpec(name, fn, spellings, frozenset(traits), signature)


def function_op(name: str, *, torch=(), functional=(), operator=(), methods=(), traits: Iterable[Trait] = ()):
    """Decorator registering a canonical callable under `name` with its spellings and traits."""

    def deco(fn):
        _register(name, fn, Spellings(tuple(torch), tuple(functional), tuple(operator), tuple(methods)),
                  traits)
        return fn

    return deco


def _same_everywhere(name: str, traits: Iterable[Trait] = (), *, extra_methods=(), extra_torch=(),
                     functional=(), in_place: bool = True) -> None:
    """Register `torch.<name>` as an op spelled `torch.<name>` and `x.<name>(...)` (and `x.<name>_`)."""
    methods = (name, f"{name}_") if in_place else (name,)
    _register(name, getattr(torch, name),
              Spellings((name, *extra_torch), tuple(functional), (), (*methods, *extra_methods)), traits)


# --- arithmetic: operator-based so that Python numbers (shape arithmetic) work too ----------------

@function_op("add", torch=["add"], operator=["add", "iadd"], methods=["add", "add_", "__add__", "__radd__"], traits=[ELEMENTWISE])
def add(input, other, *, alpha=1):
    return input + other if alpha == 1 else torch.add(input, other, alpha=alpha)


@function_op("sub", torch=["sub", "subtract"], operator=["sub", "isub"],
             methods=["sub", "sub_", "subtract", "subtract_", "__sub__"], traits=[ELEMENTWISE])
def sub(input, other, *, alpha=1):
    return input - other if alpha == 1 else torch.sub(input, other, alpha=alpha)


@function_op("rsub", torch=["rsub"], methods=["__rsub__"], traits=[ELEMENTWISE])
def rsub(input, other, *, alpha=1):
    return other - input if alpha == 1 else torch.rsub(input, other, alpha=alpha)


@function_op("mul", torch=["mul", "multiply"], operator=["mul", "imul"],
             methods=["mul", "mul_", "multiply", "multiply_", "__mul__", "__rmul__"], traits=[ELEMENTWISE])
def mul(input, other):
    return input * other


@function_op("div", torch=["div", "divide", "true_divide"], operator=["truediv", "itruediv"],
             methods=["div", "div_", "divide", "divide_", "true_divide", "true_divide_", "__truediv__"], traits=[ELEMENTWISE])
def div(input, other, *, rounding_mode=None):
    if rounding_mode is None:
        return input / other
    if isinstance(input, torch.Tensor) or isinstance(other, torch.Tensor):
        return torch.div(input, other, rounding_mode=rounding_mode)
    return input // other if rounding_mode == "floor" else int(input / other)


@function_op("floor_divide", torch=["floor_divide"], operator=["floordiv", "ifloordiv"],
             methods=["floor_divide", "floor_divide_", "__floordiv__"], traits=[ELEMENTWISE])
def floor_divide(input, other):
    return input // other


@function_op("size_min", torch=["sym_min"])

def size_min(a, b):
    """The smaller of two sizes (torch.export's `sym_min`, e.g. a window clamped to the feature map)."""
    return min(a, b)


@function_op("size_max", torch=["sym_max"])

def size_max(a, b):
    return max(a, b)


@function_op("size_ceil")

def size_ceil(a):
    """`math.ceil` of a size expression (torch.export keeps it where a model computes "same" padding)."""
    return math.ceil(a)


@function_op("size_floor")

def size_floor(a):
    return math.floor(a)


@function_op("remainder", torch=["remainder"], operator=["mod", "imod"],
             methods=["remainder", "remainder_", "__mod__"], traits=[ELEMENTWISE])
def remainder(input, other):
    return input % other


@function_op("pow", torch=["pow"], operator=["pow", "ipow"], methods=["pow", "pow_", "__pow__", "__rpow__"], traits=[ELEMENTWISE])
def pow(input, exponent):
    return input**exponent


@function_op("matmul", torch=["matmul", "mm", "bmm"], operator=["matmul", "imatmul"],
             methods=["matmul", "mm", "bmm", "__matmul__"], traits=[CONTRACTION])
def matmul(input, other):
    return input @ other


@function_op("neg", torch=["neg", "negative"], operator=["neg"], methods=["neg", "neg_", "negative", "__neg__"], traits=[ELEMENTWISE])
def neg(input):
    return -input


@function_op("abs", torch=["abs", "absolute"], operator=["abs"], methods=["abs", "abs_", "absolute", "__abs__"], traits=[ELEMENTWISE])
def abs(input):
    return input.abs() if isinstance(input, torch.Tensor) else operator.abs(input)


def _comparison(name: str, op: Callable) -> None:
    _register(name, lambda input, other: op(input, other),
              Spellings((name,), (), (name,), (name, f"{name}_", f"__{name}__")), [ELEMENTWISE])


for _name, _op in [("eq", operator.eq), ("ne", operator.ne), ("lt", operator.lt), ("le", operator.le),
                   ("gt", operator.gt), ("ge", operator.ge)]:
    _comparison(_name, _op)


@function_op("bitwise_and", torch=["bitwise_and"], operator=["and_", "iand"],
             methods=["bitwise_and", "bitwise_and_", "__and__"], traits=[ELEMENTWISE])
def bitwise_and(input, other):
    return input & other


@function_op("bitwise_or", torch=["bitwise_or"], operator=["or_", "ior"],
             methods=["bitwise_or", "bitwise_or_", "__or__"], traits=[ELEMENTWISE])
def bitwise_or(input, other):
    return input | other


@function_op("bitwise_xor", torch=["bitwise_xor"], operator=["xor", "ixor"],
             methods=["bitwise_xor", "bitwise_xor_", "__xor__"], traits=[ELEMENTWISE])
def bitwise_xor(input, other):
    return input ^ other


@function_op("bitwise_not", torch=["bitwise_not"], operator=["invert", "inv"],
             methods=["bitwise_not", "bitwise_not_", "__invert__"], traits=[ELEMENTWISE])
def bitwise_not(input):
    return ~input


@function_op("getitem", operator=["getitem"], methods=["__getitem__"], traits=[VIEW])
def getitem(input, index):
    return input[index]


@function_op("index_put", operator=["setitem"], methods=["__setitem__"])

def index_put(input, index, value):
    """`x[index] = value` without mutating `x` (the converter rewires later readers of `x`)."""
    out = input.clone()
    out[index] = value
    return out


# --- shapes and metadata --------------------------------------------------------------------------

@function_op("size", methods=["size"], traits=[METADATA])
def size(input, dim=None):
    return input.size() if dim is None else input.size(dim)


@function_op("dim", methods=["dim", "ndimension"], traits=[METADATA])
def dim(input):
    return input.dim()


@function_op("numel", torch=["numel"], methods=["numel", "nelement"], traits=[METADATA])
def numel(input):
    return input.numel()


@function_op("dtype_of", traits=[METADATA])
def dtype_of(input):
    return input.dtype


@function_op("device_of", methods=["get_device"], traits=[METADATA])
def device_of(input):
    return input.device


# --- views and layout -----------------------------------------------------------------------------

@function_op("reshape", torch=["reshape"], methods=["reshape", "view"], traits=[VIEW])
def reshape(input, shape):
    return input.reshape(shape)


@function_op("view_as", methods=["view_as", "reshape_as"], traits=[VIEW])
def view_as(input, other):
    return input.reshape(other.shape)


@function_op("flatten", torch=["flatten"], methods=["flatten"], traits=[VIEW])
def flatten(input, start_dim=0, end_dim=-1):
    return torch.flatten(input, start_dim, end_dim)


@function_op("unflatten", torch=["unflatten"], methods=["unflatten"], traits=[VIEW])
def unflatten(input, dim, sizes):
    return torch.unflatten(input, dim, sizes)


@function_op("permute", torch=["permute"], methods=["permute"], traits=[VIEW])
def permute(input, dims):
    return input.permute(dims)


@function_op("transpose", torch=["transpose", "swapaxes", "swapdims"],
             methods=["transpose", "transpose_", "swapaxes", "swapdims"], traits=[VIEW])
def transpose(input, dim0, dim1):
    return input.transpose(dim0, dim1)


@function_op("t", torch=["t"], methods=["t", "t_"], traits=[VIEW])
def t(input):
    return input.t()


@function_op("movedim", torch=["movedim", "moveaxis"], methods=["movedim", "moveaxis"], traits=[VIEW])
def movedim(input, source, destination):
    return torch.movedim(input, source, destination)


@function_op("squeeze", torch=["squeeze"], methods=["squeeze", "squeeze_"], traits=[VIEW])
def squeeze(input, dim=None):
    return input.squeeze() if dim is None else input.squeeze(dim)


@function_op("unsqueeze", torch=["unsqueeze"], methods=["unsqueeze", "unsqueeze_"], traits=[VIEW])
def unsqueeze(input, dim):
    return input.unsqueeze(dim)


@function_op("expand", methods=["expand"], traits=[VIEW])
def expand(input, size):
    return input.expand(size)


@function_op("expand_as", methods=["expand_as"], traits=[VIEW])
def expand_as(input, other):
    return input.expand_as(other)


@function_op("repeat", methods=["repeat"])

def repeat(input, repeats):
    return input.repeat(repeats)


@function_op("tile", torch=["tile"], methods=["tile"])

def tile(input, dims):
    return torch.tile(input, dims)


@function_op("contiguous", methods=["contiguous"], traits=[ALIASES, IDENTITY])
def contiguous(input, memory_format=torch.contiguous_format):
    return input.contiguous(memory_format=memory_format)


@function_op("clone", torch=["clone"], methods=["clone"], traits=[IDENTITY])
def clone(input, *, memory_format=torch.preserve_format):
    return input.clone(memory_format=memory_format)


@function_op("detach", torch=["detach"], methods=["detach", "detach_"], traits=[VIEW])
def detach(input):
    return input.detach()


@function_op("to", methods=["to", "type", "float", "double", "half", "bfloat16", "int", "long", "bool",
                            "cuda", "cpu"], traits=[ALIASES])
def to(input, *args, **kwargs):
    return input.to(*args, **kwargs)


@function_op("type_as", methods=["type_as"], traits=[ALIASES])
def type_as(input, other):
    return input.type_as(other)


@function_op("cat", torch=["cat", "concat", "concatenate"])

def cat(tensors, dim=0):
    return torch.cat(tensors, dim)


@function_op("stack", torch=["stack"])

def stack(tensors, dim=0):
    return torch.stack(tensors, dim)


@function_op("split", torch=["split"], methods=["split"], traits=[VIEW])
def split(input, split_size_or_sections, dim=0):
    return torch.split(input, split_size_or_sections, dim)


@function_op("chunk", torch=["chunk"], methods=["chunk"], traits=[VIEW])
def chunk(input, chunks, dim=0):
    return torch.chunk(input, chunks, dim)


@function_op("unbind", torch=["unbind"], methods=["unbind"], traits=[VIEW])
def unbind(input, dim=0):
    return torch.unbind(input, dim)


@function_op("unfold_dim", methods=["unfold"], traits=[VIEW])
def unfold_dim(input, dimension, size, step):
    """`Tensor.unfold`: sliding windows along one dimension (not `F.unfold`, which is im2col)."""
    return input.unfold(dimension, size, step)


@function_op("narrow", torch=["narrow"], methods=["narrow"], traits=[VIEW])
def narrow(input, dim, start, length):
    return torch.narrow(input, dim, start, length)


@function_op("select", torch=["select"], methods=["select"], traits=[VIEW])
def select(input, dim, index):
    return torch.select(input, dim, index)


@function_op("flip", torch=["flip"], methods=["flip"])

def flip(input, dims):
    return torch.flip(input, dims)


@function_op("roll", torch=["roll"], methods=["roll"])

def roll(input, shifts, dims=None):
    return torch.roll(input, shifts, dims) if dims is not None else torch.roll(input, shifts)


# --- tensor creation ------------------------------------------------------------------------------

_FACTORIES = ("zeros", "ones", "full", "empty", "arange", "linspace", "eye", "tensor", "as_tensor",
              "rand", "randn", "randint")
for _name in _FACTORIES:  # `torch.as_tensor(t)` is `t` itself
    _register(_name, getattr(torch, _name), Spellings(torch=(_name,)),
              [FACTORY, ALIASES] if _name == "as_tensor" else [FACTORY])
for _name in ("zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like"):
    _register(_name, getattr(torch, _name), Spellings(torch=(_name,)), [FACTORY])
for _name in ("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"):
    _register(_name, getattr(torch.Tensor, _name), Spellings(methods=(_name,)), [FACTORY])


@function_op("meshgrid", torch=["meshgrid"], traits=[ALIASES])
def meshgrid(*tensors, indexing=None):
    return torch.meshgrid(*tensors, indexing=indexing)


# --- element-wise math and reductions: torch.X and x.X(...) mean the same -------------------------

for _name in ("exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "sin", "cos",
              "tan", "asin", "acos", "atan", "sinh", "cosh", "erf", "erfc", "erfinv", "floor", "ceil",
              "round", "trunc", "frac", "sign", "reciprocal", "square", "logical_not", "isnan", "isinf",
              "isfinite", "nan_to_num", "logit", "atan2", "maximum", "minimum", "fmod", "lerp",
              "logical_and", "logical_or", "logical_xor", "masked_fill", "addcmul", "addcdiv",
              "clamp_min", "clamp_max", "bernoulli"):
    _same_everywhere(_name, [ELEMENTWISE])
_same_everywhere("clamp", [ELEMENTWISE], extra_torch=("clip",), extra_methods=("clip", "clip_"))  # clip is clamp
for _name in ("tril", "triu", "cumsum", "cumprod", "gather", "scatter", "index_select", "masked_select"):
    _same_everywhere(_name)
_REDUCTIONS = ("mean", "sum", "prod", "amax", "amin", "max", "min", "std", "var", "all", "any", "argmax",
               "argmin", "norm", "logsumexp", "count_nonzero", "std_mean", "var_mean", "median")
for _name in _REDUCTIONS:
    _same_everywhere(_name, [REDUCTION], in_place=False)
_same_everywhere("where", [ELEMENTWISE], in_place=False)
_same_everywhere("diagonal", [VIEW], in_place=False)
_same_everywhere("einsum", [CONTRACTION, ALIASES], in_place=False)  # `einsum("ij->ji", x)` is a view
for _name in ("outer", "kron", "addbmm"):
    _same_everywhere(_name, [CONTRACTION], in_place=False)
for _name in ("baddbmm", "addmm"):
    _same_everywhere(_name, [CONTRACTION])
for _name in ("topk", "sort", "argsort", "diff", "diag", "trace", "cross", "repeat_interleave", "bucketize",
              "searchsorted", "take_along_dim", "dist", "cdist", "nonzero", "unique"):
    _same_everywhere(_name, in_place=False)
for _name in ("relu", "sigmoid", "tanh"):  # F.<name> means the same as torch.<name> here
    _same_everywhere(_name, [ACTIVATION, ELEMENTWISE], functional=(_name,))


@function_op("softmax", torch=["softmax"], functional=["softmax"], methods=["softmax"])
def softmax(input, dim=None, dtype=None):
    return torch.softmax(input, dim, dtype=dtype)


@function_op("log_softmax", torch=["log_softmax"], functional=["log_softmax"], methods=["log_softmax"])
def log_softmax(input, dim=None, dtype=None):
    return torch.log_softmax(input, dim, dtype=dtype)


@function_op("dropout", torch=["dropout"], functional=["dropout"], traits=[DROPOUT, ALIASES])
def dropout(input, p=0.5, training=True):
    return F.dropout(input, p, training)

@function_op("linear", torch=["linear"], functional=["linear"], traits=[Trait.LINEAR])
def linear(input, weight, bias=None):
    return F.linear(input, weight, bias)


def _conv(name: str, fn: Callable) -> None:
    def conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        return fn(input, weight, bias, stride, padding, dilation, groups)

    conv.__name__ = name
    _register(name, conv, Spellings(torch=(name,), functional=(name,)), [Trait.CONV])


for _name in ("conv1d", "conv2d", "conv3d"):
    _conv(_name, getattr(F, _name))


# `torch.nn.functional.<name>`, spelled only that way, by what it is
_FUNCTIONAL: dict[tuple[Trait, ...], tuple[str, ...]] = {
    (NORM,): ("batch_norm", "layer_norm", "group_norm", "instance_norm", "rms_norm", "normalize",
              "local_response_norm"),
    (ACTIVATION, ELEMENTWISE): ("gelu", "silu", "mish", "hardswish", "hardsigmoid", "leaky_relu", "elu", "relu6",
                                "softplus", "hardtanh", "logsigmoid", "softsign", "tanhshrink", "selu", "celu",
                                "threshold", "hardshrink", "softshrink"),
    (ACTIVATION,): ("glu", "prelu"),
    (DROPOUT, ALIASES): ("dropout1d", "dropout2d", "dropout3d", "alpha_dropout"),
    (POOL,): ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
              "adaptive_max_pool2d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d",
              "max_pool3d", "lp_pool2d", "interpolate"),
    (CONTRACTION,): ("scaled_dot_product_attention",),
    (): ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "bilinear", "pad", "embedding", "one_hot", "grid_sample", "unfold", "fold", "cosine_similarity",
         "pairwise_distance", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "affine_grid"),
}
for _traits, _names in _FUNCTIONAL.items():
    for _name in _names:
        _register(_name, getattr(F, _name), Spellings(functional=(_name,)), _traits)


@function_op("assert", torch=["_assert"], traits=[Trait.SIDE_EFFECT])
def assert_(condition, message):
    torch._assert(condition, message)


_GUARD_CONVERSIONS = {"bool": bool, "int": int, "float": float, "index": operator.index, "ceil": math.ceil,
                      "floor": math.floor, "round": round, "trunc": math.trunc}


@function_op("assert_async", torch=["_assert_async"], traits=[Trait.SIDE_EFFECT])
def assert_async(*args):
    torch._assert_async(*args)


@function_op("guard", traits=[Trait.SIDE_EFFECT])
def guard(value, how, expected, what):
    """Check that a decision the converter specialised on (Python control flow on a traced value:
    `if`, `int()`, `math.ceil()`, ...) comes out the same at run time; `how` names the conversion."""
    actual = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    if not isinstance(actual, torch.Tensor):
        actual = _GUARD_CONVERSIONS[how](actual)
    if isinstance(actual, torch.Tensor) or actual != expected:
        raise RuntimeError(
            f"torch_dag guard failed: {what} was {expected!r} when the model was converted and is "
            f"{actual!r} now; the source model branches on it, so convert with example inputs of this shape"
        )
