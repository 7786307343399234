"""The channel rule of each op: explicit entries in `RULES`, else one derived from the op's traits when
it is looked up (`rule_for`), so that an op registered later with traits gets its rule too."""

from __future__ import annotations

from ...core.traits import Trait, has_trait, traits_of
from ..channels import Rule
from . import axes, contraction, layers, parts, shapes
from .einsum import einsum
from .elementwise import elementwise, pass_through

_NORMALIZES = "normalizes over the channels"

# op -> its rule, for every op whose traits do not say enough
RULES: dict[str, Rule] = {
    "Conv1d": layers.conv,
    "Conv2d": layers.conv,
    "Conv3d": layers.conv,
    "WSConv2d": layers.conv,
    "Linear": layers.linear,
    "BatchNorm1d": layers.per_channel_module(None),
    "BatchNorm2d": layers.per_channel_module(None),
    "BatchNorm3d": layers.per_channel_module(None),
    "LayerNorm": layers.per_channel_module(1),
    "GroupNorm": layers.group_norm,
    "flatten": shapes.flatten,
    "permute": shapes.permute,
    "transpose": shapes.permute,
    "reshape": shapes.reshape,
    "view_as": shapes.reshape,
    "expand": shapes.expand,
    "expand_as": shapes.expand,
    "unsqueeze": shapes.unsqueeze,
    "squeeze": shapes.unsqueeze,
    "getitem": parts.getitem,
    "split": parts.split,
    "chunk": parts.split,
    "tensor_split": parts.split,
    "unbind": parts.split,
    "cat": parts.cat,
    "stack": parts.stack,
    "mean": axes.reduction(),
    "sum": axes.reduction(),
    "amax": axes.reduction(),
    "amin": axes.reduction(),
    "prod": axes.reduction(),
    "var": axes.reduction(),
    "std": axes.reduction(),
    "logsumexp": axes.reduction(),
    "norm": axes.reduction(dim_index=2),
    "vector_norm": axes.reduction(dim_index=2),
    "softmax": axes.across_channels(_NORMALIZES, 1, "dim"),
    "log_softmax": axes.across_channels(_NORMALIZES, 1, "dim"),
    "Softmax": axes.softmax_module,
    "LogSoftmax": axes.softmax_module,
    "roll": axes.roll,
    "pad": axes.pad,
    "glu": axes.glu,
    "GLU": axes.glu,
    "channel_shuffle": axes.channel_shuffle,
    "ChannelShuffle": axes.channel_shuffle,
    "pixel_shuffle": axes.pixel_shuffle,
    "pixel_unshuffle": axes.pixel_shuffle,
    "PixelShuffle": axes.pixel_shuffle,
    "PixelUnshuffle": axes.pixel_shuffle,
    "scaled_dot_product_attention": contraction.attention,
    "matmul": contraction.matmul,
    "einsum": einsum,
    # keep the values per channel, but their traits say only that they may alias the input
    "to": pass_through,
    "type_as": pass_through,
    "detach": pass_through,
}

# trait -> the rule it gives an op without an entry in RULES; the first trait the op has wins. An
# ELEMENTWISE op broadcasts its tensor operands (with one operand, `elementwise` passes the channels on
# as `pass_through` does); the others keep each channel apart and in place. ACTIVATION alone derives
# nothing: PReLU holds a weight per channel, GLU halves its axis.
DERIVED: tuple[tuple[Trait, Rule], ...] = (
    (Trait.ELEMENTWISE, elementwise),
    (Trait.DROPOUT, pass_through),
    (Trait.IDENTITY, pass_through),
    (Trait.POOL, pass_through),
)

# op -> keyword arguments its rule reads itself (channels in any other keyword argument are blocked)
KEYWORD_OPERANDS: dict[str, frozenset[str]] = {"scaled_dot_product_attention": frozenset({"attn_mask"})}


def rule_for(op: str) -> Rule | None:
    """The channel rule of `op`: its entry in RULES, else the rule its traits derive, else None (the
    channels that reach it are blocked)."""
    rule = RULES.get(op)
    return rule if rule is not None else derived_rule(op)


def derived_rule(op: str) -> Rule | None:
    """The rule `op`'s traits give it (DERIVED), whatever RULES says."""
    traits = traits_of(op)
    for trait, rule in DERIVED:
        if trait in traits:
            return rule
    return None


def is_harmless(op: str) -> bool:
    """Whether `op` reads only facts that pruning does not change (rank, dtype, device): a METADATA op.
    The METADATA ops that read sizes (SHAPE_QUERIES) are answered before this is asked."""
    return has_trait(op, Trait.METADATA)
