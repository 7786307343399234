"""Flexible models: one set of weights that runs at several nested widths (levels).

    flex = td.make_flexible(dag, levels=[0.25, 0.5, 1.0])
    flex.set_level_use(0); y = flex(x)
    plain = flex.make_base_copy()

Flexible atomic modules (`Conv2d`, `Linear`, `BatchNorm2d`, `LayerNorm`, `MultiheadAttention`) are
also public building blocks for hand-written flexible models; each, and any model deriving from
`td.flex.Module` that holds them, has the level API on its own (`set_level_use`, `current_level`,
`max_level`, `make_base_copy`, `load_from_base`, `copy_to_base`, `export_level_delta`). Level deltas and
delta managers move plain models between levels without the flexible model.
"""

from . import serde as serde  # registers the Flex op and the flexible DAG's file form
from .base import Module, flexible_model_copy
from .delta import FileDeltaManager, InMemoryDeltaManager, LevelDelta, file_delta_manager
from .make import compensate_levels, make_flexible
from .model import FlexDagModule, is_flex
from .modules import (
    BatchNorm2d,
    Conv2d,
    FlexModule,
    LayerNorm,
    Linear,
    MultiheadAttention,
    SelfAttention,
    flex_layers,
)
from .train import sandwich_step
from .widths import FlexConfig

__all__ = [
    "BatchNorm2d",
    "Conv2d",
    "FileDeltaManager",
    "FlexConfig",
    "FlexDagModule",
    "FlexModule",
    "InMemoryDeltaManager",
    "LayerNorm",
    "LevelDelta",
    "Linear",
    "Module",
    "MultiheadAttention",
    "SelfAttention",
    "compensate_levels",
    "file_delta_manager",
    "flex_layers",
    "flexible_model_copy",
    "is_flex",
    "make_flexible",
    "sandwich_step",
]
