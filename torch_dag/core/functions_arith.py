"""Function ops for Python's operators and arithmetic: `+ - * / // % ** @`, comparisons, bitwise ops,
indexing. Canonical callables accept Python numbers as well as tensors, so shape arithmetic
(`x.shape[0] * 2`) runs through the same ops."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch

from .function_registry import (
    CONTRACTION,
    ELEMENTWISE,
    VIEW,
    Spellings,
    function_op,
    register_function,
)

# --- arithmetic: operator-based so that Python numbers (shape arithmetic) work too ----------------


@function_op(
    "add",
    torch=["add"],
    operator=["add", "iadd"],
    methods=["add", "add_", "__add__", "__radd__"],
    traits=[ELEMENTWISE],
)
def add(input, other, *, alpha=1):
    return input + other if alpha == 1 else torch.add(input, other, alpha=alpha)


@function_op(
    "sub",
    torch=["sub", "subtract"],
    operator=["sub", "isub"],
    methods=["sub", "sub_", "subtract", "subtract_", "__sub__"],
    traits=[ELEMENTWISE],
)
def sub(input, other, *, alpha=1):
    return input - other if alpha == 1 else torch.sub(input, other, alpha=alpha)


@function_op("rsub", torch=["rsub"], methods=["__rsub__"], traits=[ELEMENTWISE])
def rsub(input, other, *, alpha=1):
    return other - input if alpha == 1 else torch.rsub(input, other, alpha=alpha)


@function_op(
    "mul",
    torch=["mul", "multiply"],
    operator=["mul", "imul"],
    methods=["mul", "mul_", "multiply", "multiply_", "__mul__", "__rmul__"],
    traits=[ELEMENTWISE],
)
def mul(input, other):
    return input * other


@function_op(
    "div",
    torch=["div", "divide", "true_divide"],
    operator=["truediv", "itruediv"],
    methods=["div", "div_", "divide", "divide_", "true_divide", "true_divide_", "__truediv__"],
    traits=[ELEMENTWISE],
)
def div(input, other, *, rounding_mode=None):
    if rounding_mode is None:
        return input / other
    if isinstance(input, torch.Tensor) or isinstance(other, torch.Tensor):
        return torch.div(input, other, rounding_mode=rounding_mode)
    return input // other if rounding_mode == "floor" else int(input / other)


@function_op(
    "floor_divide",
    torch=["floor_divide"],
    operator=["floordiv", "ifloordiv"],
    methods=["floor_divide", "floor_divide_", "__floordiv__"],
    traits=[ELEMENTWISE],
)
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


@function_op(
    "remainder",
    torch=["remainder"],
    operator=["mod", "imod"],
    methods=["remainder", "remainder_", "__mod__"],
    traits=[ELEMENTWISE],
)
def remainder(input, other):
    return input % other


@function_op(
    "pow",
    torch=["pow"],
    operator=["pow", "ipow"],
    methods=["pow", "pow_", "__pow__", "__rpow__"],
    traits=[ELEMENTWISE],
)
def pow(input, exponent):
    return input**exponent


@function_op(
    "matmul",
    torch=["matmul", "mm", "bmm"],
    operator=["matmul", "imatmul"],
    methods=["matmul", "mm", "bmm", "__matmul__"],
    traits=[CONTRACTION],
)
def matmul(input, other):
    return input @ other


@function_op(
    "neg",
    torch=["neg", "negative"],
    operator=["neg"],
    methods=["neg", "neg_", "negative", "__neg__"],
    traits=[ELEMENTWISE],
)
def neg(input):
    return -input


@function_op(
    "abs",
    torch=["abs", "absolute"],
    operator=["abs"],
    methods=["abs", "abs_", "absolute", "__abs__"],
    traits=[ELEMENTWISE],
)
def abs(input):
    return input.abs() if isinstance(input, torch.Tensor) else operator.abs(input)


def _comparison(name: str, op: Callable) -> None:
    register_function(
        name,
        lambda input, other: op(input, other),
        Spellings((name,), (), (name,), (name, f"{name}_", f"__{name}__")),
        [ELEMENTWISE],
    )


for _name, _op in [
    ("eq", operator.eq),
    ("ne", operator.ne),
    ("lt", operator.lt),
    ("le", operator.le),
    ("gt", operator.gt),
    ("ge", operator.ge),
]:
    _comparison(_name, _op)


@function_op(
    "bitwise_and",
    torch=["bitwise_and"],
    operator=["and_", "iand"],
    methods=["bitwise_and", "bitwise_and_", "__and__"],
    traits=[ELEMENTWISE],
)
def bitwise_and(input, other):
    return input & other


@function_op(
    "bitwise_or",
    torch=["bitwise_or"],
    operator=["or_", "ior"],
    methods=["bitwise_or", "bitwise_or_", "__or__"],
    traits=[ELEMENTWISE],
)
def bitwise_or(input, other):
    return input | other


@function_op(
    "bitwise_xor",
    torch=["bitwise_xor"],
    operator=["xor", "ixor"],
    methods=["bitwise_xor", "bitwise_xor_", "__xor__"],
    traits=[ELEMENTWISE],
)
def bitwise_xor(input, other):
    return input ^ other


@function_op(
    "bitwise_not",
    torch=["bitwise_not"],
    operator=["invert", "inv"],
    methods=["bitwise_not", "bitwise_not_", "__invert__"],
    traits=[ELEMENTWISE],
)
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
