"""Channel pruning: channel groups from per-op rules, importance, a global target, generic surgery."""

from .groups import ChannelGroups, Group, channel_groups
from .prune import PruneConfig, PruneReport, channel_scores, compensate, prune

__all__ = [
    "ChannelGroups",
    "Group",
    "PruneConfig",
    "PruneReport",
    "channel_groups",
    "channel_scores",
    "compensate",
    "prune",
]
