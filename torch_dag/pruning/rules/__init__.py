"""Channel rules, one per op: how the channel ids of a vertex's inputs reach its output, which ids it
ties, what it must slice or rewrite. `rule_for(op)` gives an op's rule (explicit in `RULES`, else derived
from its traits); an op without one blocks the channels that reach it."""

from .counts import ARITHMETIC, NOT_A_QUERY, SHAPE_QUERIES, SIZED_BY_COUNTS, is_shape_query, shape_query
from .coverage import NO_CHANNEL_RULE
from .table import DERIVED, KEYWORD_OPERANDS, RULES, is_harmless, rule_for

__all__ = [
    "ARITHMETIC",
    "DERIVED",
    "KEYWORD_OPERANDS",
    "NOT_A_QUERY",
    "NO_CHANNEL_RULE",
    "RULES",
    "SHAPE_QUERIES",
    "SIZED_BY_COUNTS",
    "is_harmless",
    "is_shape_query",
    "rule_for",
    "shape_query",
]
