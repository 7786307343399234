"""Channel pruning: channel groups from per-op rules, importance, a global target, generic surgery."""

from .groups import ChannelGroups, Group, channel_groups
from .prune import PruneConfig, PruneReport, channel_scores, compensate, prune
from .report import GroupRow, LayerRow, group_rows, group_table, layer_rows, layer_table

__all__ = [
    "ChannelGroups",
    "Group",
    "GroupRow",
    "LayerRow",
    "PruneConfig",
    "PruneReport",
    "channel_groups",
    "channel_scores",
    "compensate",
    "group_rows",
    "group_table",
    "layer_rows",
    "layer_table",
    "prune",
]
