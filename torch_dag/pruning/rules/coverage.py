"""Which ops are deliberately without a channel rule, and why; and the checks that keep the pruning
tables honest (every key a known op, every registered op with a rule or a reason), run by the tests."""

from __future__ import annotations

from collections.abc import Iterable

from ...core.ops import known_ops
from ...core.traits import Trait, traits_of
from .table import rule_for

# ops with these traits need no channel rule: they make tensors from numbers (a channel count reaching
# them is blocked as it should be), read metadata (answered before any rule) or only check things
NEEDS_NO_RULE = frozenset({Trait.FACTORY, Trait.METADATA, Trait.SIDE_EFFECT})

# why -> the ops without a channel rule for that reason; channels reaching them are blocked (kept whole)
_WITHOUT_RULE: dict[str, tuple[str, ...]] = {
    "weights laid out unlike a plain conv / linear (transposed, low-rank, bilinear, embedding, per-channel "
    "PReLU slope, recurrent, attention with in_proj): no slicing row yet": (
        "ConvTranspose1d",
        "ConvTranspose2d",
        "ConvTranspose3d",
        "LowRankConv2d",
        "LowRankLinear",
        "Bilinear",
        "Embedding",
        "PReLU",
        "LSTM",
        "GRU",
        "RNN",
        "MultiheadAttention",
    ),
    "a functional layer takes its weights as tensor operands: no rule slices them yet": (
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "linear",
        "bilinear",
        "embedding",
        "prelu",
        "batch_norm",
        "layer_norm",
        "group_norm",
        "instance_norm",
        "rms_norm",
    ),
    "normalizes per channel with an affine or running statistics that no rule slices yet": (
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "RMSNorm",
    ),
    "mixes the values of neighbouring or all channels (softmax or a norm over the channel axis)": (
        "LocalResponseNorm",
        "local_response_norm",
        "normalize",
        "Softmax2d",
    ),
    "a reduction with a tuple result (values and indices, statistics pairs) or an index, count or truth "
    "value result: no rule yet (mean, sum, prod, amax, amin, var, std, logsumexp, norm have one)": (
        "all",
        "any",
        "argmax",
        "argmin",
        "count_nonzero",
        "max",
        "median",
        "min",
        "std_mean",
        "var_mean",
    ),
    "contracts or compares whole rows or axes: which channels meet depends on the axes, no rule yet": (
        "addbmm",
        "addmm",
        "baddbmm",
        "kron",
        "outer",
        "cdist",
        "dist",
        "cosine_similarity",
        "pairwise_distance",
        "cross",
        "trace",
    ),
    "picks, orders or counts elements by their values or by index tensors: no rule yet": (
        "gather",
        "scatter",
        "index_put",
        "index_select",
        "masked_select",
        "nonzero",
        "unique",
        "topk",
        "sort",
        "argsort",
        "bucketize",
        "searchsorted",
        "take_along_dim",
        "one_hot",
    ),
    "accumulates or compares neighbours along an axis: fine off the channel axis, no rule yet": (
        "cumsum",
        "cumprod",
        "diff",
        "flip",
    ),
    "a view, copy or patch extraction that moves axes no rule tracks yet": (
        "diagonal",
        "diag",
        "movedim",
        "narrow",
        "select",
        "t",
        "unflatten",
        "unfold_dim",
        "tril",
        "triu",
        "repeat",
        "repeat_interleave",
        "tile",
        "meshgrid",
        "fold",
        "unfold",
        "Fold",
        "Unfold",
        "grid_sample",
        "affine_grid",
    ),
    "rounds or compares sizes: a channel count through it is no count a reshape may use": (
        "size_ceil",
        "size_floor",
        "size_max",
        "size_min",
    ),
    "a nested DAG: `prune` flattens nested DAGs before the analysis": ("DagModule",),
    "computes a layer's weight from stored tensors (a weight-norm parametrization); the layer that "
    "reads it is a function vertex, not a prunable layer": ("weight_norm",),
    "attention on tensors that are not the model's own parameters (on its own parameters the converter "
    "makes it a MultiheadAttention vertex, whose heads prune)": ("multi_head_attention_forward",),
    "a flexible layer (flex, above pruning): its widths are chosen at run time, not pruned": ("Flex",),
    "a mutable vertex (nas, above pruning) of candidates other than element-wise ops: its channels stay "
    "fixed (export_subnet gives the plain sub-network to prune)": ("Mutable",),
}
NO_CHANNEL_RULE: dict[str, str] = {op: why for why, ops in _WITHOUT_RULE.items() for op in ops}

WHERE = "torch_dag/pruning/rules/"


def unknown_ops(names: Iterable[str]) -> list[str]:
    """The names in a table keyed by op that are not ops of the vocabulary (a typo, a removed op)."""
    known = set(known_ops())
    return sorted(name for name in names if name not in known)


def ops_missing_a_rule(ops: Iterable[str]) -> list[str]:
    """The ops among `ops` that get no channel rule, need none by their traits and are not listed in
    NO_CHANNEL_RULE: each must get a rule or a reason."""
    return sorted(
        op
        for op in ops
        if rule_for(op) is None and not (traits_of(op) & NEEDS_NO_RULE) and op not in NO_CHANNEL_RULE
    )


def ops_with_rule_and_reason(ops: Iterable[str]) -> list[str]:
    """Ops listed in NO_CHANNEL_RULE that do get a rule (from RULES or their traits): one must go."""
    return sorted(op for op in ops if op in NO_CHANNEL_RULE and rule_for(op) is not None)


def missing_rule_message(ops: list[str]) -> str:
    return (
        f"ops without a channel rule: {', '.join(ops)}. Add a rule to RULES in {WHERE}table.py (or give the "
        f"op the traits that derive one, see DERIVED there), or list the op in NO_CHANNEL_RULE in "
        f"{WHERE}coverage.py with a one-line reason"
    )
