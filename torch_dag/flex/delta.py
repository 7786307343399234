"""Level deltas and delta managers: move a plain model between levels without the flexible model.

A `LevelDelta` (`delta_level.py`) turns a plain DagModule of one level into the plain model of a
neighbouring level, in place (or, for a hand-written `td.flex.Module`, its plain copy: `delta_tree.py`);
`InMemoryDeltaManager` holds every delta of a flexible model and
`FileDeltaManager` reads them from a delta file (`delta_file.py`, which describes the format), each
moving one plain model between levels.
"""

from __future__ import annotations

from typing import cast

from torch import nn

from ..core.dag import DagModule
from ..core.errors import DagError
from ..serde.format import graph_and_tensors
from .base import Module
from .delta_file import FileDeltaManager, file_delta_manager
from .delta_level import LevelDelta, apply_deltas, check_level, level_deltas, level_path
from .delta_tree import apply_to_tree, module_deltas
from .model import FlexDagModule


class InMemoryDeltaManager:
    """Holds a plain model and every neighbour delta of a flexible model (a FlexDagModule or a
    hand-written `td.flex.Module`); `move_to(level)` moves the plain model there (in place) through the
    levels between."""

    def __init__(self, flex: FlexDagModule | Module):
        self.deltas: dict[tuple[int, int], LevelDelta] = {}
        self._tree = not isinstance(flex, FlexDagModule)
        if isinstance(flex, FlexDagModule):
            start = flex._require_level("a delta manager")
            for level in range(flex.max_level() + 1):
                self.deltas.update(level_deltas(flex, level))
            flex.set_level_use(start)
        elif isinstance(flex, Module):
            self.deltas = module_deltas(flex)
            start = cast(int, flex.current_level())  # module_deltas checked it
        else:
            raise DagError(
                f"a delta manager takes a flexible model (a FlexDagModule or a td.flex.Module), not a "
                f"{type(flex).__name__}: derive a hand-written model from td.flex.Module"
            )
        self.level, self.max_level = start, flex.max_level()
        self._model: nn.Module = flex.make_base_copy()

    def managed_model(self) -> nn.Module:
        """The plain model it moves (the same object at every level)."""
        return self._model

    def move_to(self, level: int) -> nn.Module:
        check_level(level, self.max_level)
        if level != self.level:
            steps = [self.deltas[step] for step in level_path(self.level, level)]
            if self._tree:
                apply_to_tree(self._model, steps)
            else:
                model = cast(DagModule, self._model)
                apply_deltas(model, steps, graph_and_tensors(model)[0])
        self.level = level
        return self._model


__all__ = ["FileDeltaManager", "InMemoryDeltaManager", "LevelDelta", "apply_deltas", "file_delta_manager"]
