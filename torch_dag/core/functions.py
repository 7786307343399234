"""The function ops of the vocabulary: what models write as functions, methods or operators.

Each entry is one canonical op: a name, the Python callable that runs it, the spellings that mean it
(`torch.add`, `x.add(...)`, `x + y`, `x += y`, ...) and its traits (`function_registry.py`). Importing
this module registers them all: operators and arithmetic (`functions_arith.py`), shapes, views and
tensor creation (`functions_shape.py`), math, reductions and functional layers (`functions_math.py`).
"""

from __future__ import annotations

from . import functions_arith, functions_math, functions_shape
from .function_registry import FUNCTIONS, FunctionSpec, Spellings, function_op
from .functions_arith import size_ceil, size_floor

__all__ = [
    "FUNCTIONS",
    "FunctionSpec",
    "Spellings",
    "function_op",
    "functions_arith",
    "functions_math",
    "functions_shape",
    "size_ceil",
    "size_floor",
]
