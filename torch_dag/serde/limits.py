"""Bounds a file's header must keep before anything is built from it, so that a load takes time in
proportion to the file's size: how many vertices, how many tensors a config makes, how large the
integers in a custom op's config are, and which names a vertex may take."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.dag import is_valid_vertex_name
from .schema import expect

MAX_VERTICES = 100_000  # vertices in a file, nested DAGs included
_SMALL = 1 << 16  # integers up to this are never too large for a file
# attributes of the module that holds the vertices' modules: a vertex of such a name would shadow one
_TAKEN = frozenset(dir(nn.ModuleDict()))


def valid_name(name: Any) -> bool:
    """A vertex or input name a file may hold: an identifier that Python keeps as written (NFKC: two
    different names never become the same variable), not a keyword, dunder or module attribute."""
    return is_valid_vertex_name(name) and unicodedata.normalize("NFKC", name) == name and name not in _TAKEN


@dataclass
class Limits:
    """What a file's tensors allow its graph to ask for."""

    tensors: int  # stored tensors and ties
    largest: int  # elements of the largest stored tensor
    vertices_left: int = MAX_VERTICES

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], graph: dict[str, Any]) -> Limits:
        tied = graph.get("tied")
        ties = len(tied) if isinstance(tied, dict) else 0
        largest = max((t.numel() for t in tensors.values()), default=0)
        return cls(len(tensors) + ties, largest)

    def take_vertices(self, count: int) -> None:
        self.vertices_left -= count
        expect(
            self.vertices_left >= 0,
            f"the graph has more than {MAX_VERTICES} vertices (nested DAGs included): refused as damaged",
        )

    def check_tensor_count(self, count: int, where: str) -> None:
        """A config that makes `count` tensors (an RNN's layers) in a file that stores fewer is refused
        before the module is built."""
        expect(
            count <= self.tensors,
            f"{where}: the config makes at least {count} tensors, but the file stores {self.tensors}",
        )

    def check_custom_config(self, config: Any, where: str) -> None:
        """Integers in a custom op's config (sizes, positions) no larger than the file's largest tensor,
        so that nothing is allocated out of proportion to the file before its weights are compared."""
        bound = max(_SMALL, self.largest)
        stack = [config]
        while stack:
            value = stack.pop()
            if isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, list):
                stack.extend(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                expect(
                    abs(value) <= bound or value != value,
                    f"{where}: config holds {value}, larger than any tensor of the file ({bound} elements)",
                )
