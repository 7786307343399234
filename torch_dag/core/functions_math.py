"""Function ops for element-wise math, reductions, contractions and `torch.nn.functional` layers, and
the side-effecting checks (asserts, guards) the converter inserts."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .function_registry import (
    ACTIVATION,
    ALIASES,
    CONTRACTION,
    DROPOUT,
    ELEMENTWISE,
    NORM,
    POOL,
    REDUCTION,
    VIEW,
    Spellings,
    function_op,
    register_function,
    register_torch_op,
)
from .traits import Trait

# --- element-wise math and reductions: torch.X and x.X(...) mean the same -------------------------

for _name in (
    "exp",
    "exp2",
    "expm1",
    "log",
    "log2",
    "log10",
    "log1p",
    "sqrt",
    "rsqrt",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "sinh",
    "cosh",
    "erf",
    "erfc",
    "erfinv",
    "floor",
    "ceil",
    "round",
    "trunc",
    "frac",
    "sign",
    "reciprocal",
    "square",
    "logical_not",
    "isnan",
    "isinf",
    "isfinite",
    "nan_to_num",
    "logit",
    "atan2",
    "maximum",
    "minimum",
    "fmod",
    "lerp",
    "logical_and",
    "logical_or",
    "logical_xor",
    "masked_fill",
    "addcmul",
    "addcdiv",
    "clamp_min",
    "clamp_max",
    "bernoulli",
):
    register_torch_op(_name, [ELEMENTWISE])
register_torch_op(
    "clamp", [ELEMENTWISE], extra_torch=("clip",), extra_methods=("clip", "clip_")
)  # clip is clamp
for _name in ("tril", "triu", "cumsum", "cumprod", "gather", "scatter", "index_select", "masked_select"):
    register_torch_op(_name)
_REDUCTIONS = (
    "mean",
    "sum",
    "prod",
    "amax",
    "amin",
    "max",
    "min",
    "std",
    "var",
    "all",
    "any",
    "argmax",
    "argmin",
    "norm",
    "logsumexp",
    "count_nonzero",
    "std_mean",
    "var_mean",
    "median",
)
for _name in _REDUCTIONS:
    register_torch_op(_name, [REDUCTION], in_place=False)
register_function("vector_norm", torch.linalg.vector_norm, Spellings(), [REDUCTION])  # ConvNeXt V2's GRN
register_function("weight_norm", torch._weight_norm, Spellings(torch=("_weight_norm",)))  # v * g / |v|
register_torch_op("where", [ELEMENTWISE], in_place=False)
register_torch_op("diagonal", [VIEW], in_place=False)
register_torch_op("einsum", [CONTRACTION, ALIASES], in_place=False)  # `einsum("ij->ji", x)` is a view
for _name in ("outer", "kron", "addbmm"):
    register_torch_op(_name, [CONTRACTION], in_place=False)
for _name in ("baddbmm", "addmm"):
    register_torch_op(_name, [CONTRACTION])
for _name in (
    "topk",
    "sort",
    "argsort",
    "diff",
    "diag",
    "trace",
    "cross",
    "repeat_interleave",
    "bucketize",
    "searchsorted",
    "take_along_dim",
    "dist",
    "cdist",
    "nonzero",
    "unique",
):
    register_torch_op(_name, in_place=False)
for _name in ("relu", "sigmoid", "tanh"):  # F.<name> means the same as torch.<name> here
    register_torch_op(_name, [ACTIVATION, ELEMENTWISE], functional=(_name,))


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
    register_function(name, conv, Spellings(torch=(name,), functional=(name,)), [Trait.CONV])


for _name in ("conv1d", "conv2d", "conv3d"):
    _conv(_name, getattr(F, _name))


# `torch.nn.functional.<name>`, spelled only that way, by what it is
_FUNCTIONAL: dict[tuple[Trait, ...], tuple[str, ...]] = {
    (NORM,): (
        "batch_norm",
        "layer_norm",
        "group_norm",
        "instance_norm",
        "rms_norm",
        "normalize",
        "local_response_norm",
    ),
    (ACTIVATION, ELEMENTWISE): (
        "gelu",
        "silu",
        "mish",
        "hardswish",
        "hardsigmoid",
        "leaky_relu",
        "elu",
        "relu6",
        "softplus",
        "hardtanh",
        "logsigmoid",
        "softsign",
        "tanhshrink",
        "selu",
        "celu",
        "threshold",
        "hardshrink",
        "softshrink",
    ),
    (ACTIVATION,): ("glu", "prelu"),
    (DROPOUT, ALIASES): ("dropout1d", "dropout2d", "dropout3d", "alpha_dropout"),
    (POOL,): (
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "adaptive_avg_pool3d",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "lp_pool2d",
        "interpolate",
    ),
    (CONTRACTION,): ("scaled_dot_product_attention", "multi_head_attention_forward"),
    (): (
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "bilinear",
        "pad",
        "embedding",
        "one_hot",
        "grid_sample",
        "unfold",
        "fold",
        "cosine_similarity",
        "pairwise_distance",
        "pixel_shuffle",
        "pixel_unshuffle",
        "channel_shuffle",
        "affine_grid",
    ),
}
for _traits, _names in _FUNCTIONAL.items():
    for _name in _names:
        register_function(_name, getattr(F, _name), Spellings(functional=(_name,)), _traits)


@function_op("assert", torch=["_assert"], traits=[Trait.SIDE_EFFECT])
def assert_(condition, message):
    torch._assert(condition, message)


_GUARD_CONVERSIONS = {
    "bool": bool,
    "int": int,
    "float": float,
    "index": operator.index,
    "ceil": math.ceil,
    "floor": math.floor,
    "round": round,
    "trunc": math.trunc,
    "dtype": lambda dtype: dtype,  # torch.finfo(x.dtype): the dtype stays what it was
}


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
            f"{actual!r} now; the source model branches on it, so convert with example inputs like these (shape and dtype)"
        )
