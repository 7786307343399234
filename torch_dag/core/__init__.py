"""The IR core: vertices, DagModule, the op vocabulary, verify. Imports nothing above it."""

from .dag import DagModule, Vertex
from .errors import ConversionError, DagError, LoadError, UnknownOpError, VerifyError
from .ops import (
    Constant,
    FunctionOp,
    Parameter,
    known_ops,
    module_op_spec,
    op_name,
    register_module_op,
)
from .template import Ref
from .verify import verify

__all__ = [
    "Constant",
    "ConversionError",
    "DagError",
    "DagModule",
    "FunctionOp",
    "LoadError",
    "Parameter",
    "Ref",
    "UnknownOpError",
    "VerifyError",
    "Vertex",
    "known_ops",
    "module_op_spec",
    "op_name",
    "register_module_op",
    "verify",
]
