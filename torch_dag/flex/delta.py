"""Level deltas and delta managers: move a plain model between levels without the flexible model.

A `LevelDelta` (`delta_level.py`) turns a plain DagModule of one level into the plain model of a
neighbouring level, in place; `InMemoryDeltaManager` holds every delta of a flexible model and
`FileDeltaManager` reads them from a delta file (`delta_file.py`, which describes the format), each
moving one plain model between levels.
"""

from __future__ import annotations

from ..core.dag import DagModule
from ..serde.format import graph_and_tensors
from .delta_file import FileDeltaManager, file_delta_manager
from .delta_level import LevelDelta, apply_deltas, check_level, level_deltas, level_path
from .model import FlexDagModule


class InMemoryDeltaManager:
    """Holds a plain model and every neighbour delta of a flexible model; `move_to(level)` moves the
    plain model there (in place) through the levels between."""

    def __init__(self, flex: FlexDagModule):
        start = flex._require_level("a delta manager")
        self.deltas: dict[tuple[int, int], LevelDelta] = {}
        for level in range(flex.max_level() + 1):
            self.deltas.update(level_deltas(flex, level))
        flex.set_level_use(start)
        self.level, self.max_level = start, flex.max_level()
        self._model = flex.make_base_copy()

    def managed_model(self) -> DagModule:
        """The plain model it moves (the same object at every level)."""
        return self._model

    def move_to(self, level: int) -> DagModule:
        check_level(level, self.max_level)
        if level != self.level:
            apply_deltas(
                self._model,
                [self.deltas[step] for step in level_path(self.level, level)],
                graph_and_tensors(self._model)[0],
            )
        self.level = level
        return self._model


__all__ = ["FileDeltaManager", "InMemoryDeltaManager", "LevelDelta", "apply_deltas", "file_delta_manager"]
