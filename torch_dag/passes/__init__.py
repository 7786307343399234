"""Graph passes: functions `DagModule -> DagModule` that leave their input untouched.

Writing a pass: open an `Editor` on the DAG, find vertices with a `pattern.op(...)` pattern, edit
(`set_module`, `insert`, `remove`, `rewire`) and `build()` the new, verified DAG. For example:

    def relu_to_gelu(dag):
        editor = Editor(dag)
        for match in find(dag, op("ReLU")):
            editor.set_module(match.vertex.name, nn.GELU())
        return editor.build()
"""

from ..core.editor import Editor, transform
from .decompose_attention import decompose_attention
from .factorize import FactorizationReport, LayerReport, factorize, low_rank
from .fold_batchnorm import fold_batchnorm
from .hierarchy import flatten, nest, nest_by_module
from .insert import insert_after, insert_before, not_followed_by
from .pattern import (
    ACTIVATIONS,
    BATCH_NORMS,
    CONVS,
    DROPOUTS,
    LINEARS,
    NORMS,
    GraphView,
    Match,
    OpSet,
    Pattern,
    find,
    op,
    why_not,
)
from .remove import dedupe_constants, remove_dead, remove_identities, remove_vertices
from .swap_activations import swap_activations

__all__ = [
    "ACTIVATIONS",
    "BATCH_NORMS",
    "CONVS",
    "DROPOUTS",
    "LINEARS",
    "NORMS",
    "Editor",
    "FactorizationReport",
    "GraphView",
    "LayerReport",
    "Match",
    "OpSet",
    "Pattern",
    "decompose_attention",
    "dedupe_constants",
    "factorize",
    "find",
    "flatten",
    "fold_batchnorm",
    "insert_after",
    "insert_before",
    "low_rank",
    "nest",
    "nest_by_module",
    "not_followed_by",
    "op",
    "remove_dead",
    "remove_identities",
    "remove_vertices",
    "swap_activations",
    "transform",
    "why_not",
]
