"""The constants of the `.dag` format (see format.py for its layout) and the check every reader uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.dag import DagModule
from ..core.errors import LoadError

SCHEMA_VERSION = 1

# DagModule subclasses with extra graph data (flexible DAGs): graph key -> (class, its JSON, a builder
# from that JSON and the inputs, vertices, output and input meta)
EXTENSION_DAGS: dict[str, tuple[type, Callable[[Any], Any], Callable[..., DagModule]]] = {}
FORMAT = "torch_dag"  # the safetensors metadata key of the graph, and the graph's "format"
MAX_HEADER = 100 * 1024 * 1024


def expect(condition: bool, message: str) -> None:
    """Raise `LoadError(message)` unless `condition`: how every check of a file's contents fails."""
    if not condition:
        raise LoadError(message)
