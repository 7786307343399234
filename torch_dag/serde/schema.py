"""The constants of the `.dag` format (see format.py for its layout) and the check every reader uses."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from ..core.dag import DagModule
from ..core.errors import LoadError

SCHEMA_VERSION = 2  # 2: the graph JSON is signed (DIGEST); 1 (still read): only the weights are
READABLE_VERSIONS = (1, 2)

# DagModule subclasses with extra graph data (flexible DAGs): graph key -> (class, its JSON, a builder
# from that JSON and the inputs, vertices, output and input meta)
EXTENSION_DAGS: dict[str, tuple[type, Callable[[Any], Any], Callable[..., DagModule]]] = {}
FORMAT = "torch_dag"  # the safetensors metadata key of the graph, and the graph's "format"
MAX_HEADER = 100 * 1024 * 1024
DIGEST = "torch_dag.sha256"  # the safetensors metadata key of the SHA-256 of the graph JSON's UTF-8


def graph_digest(graph_json: str) -> str:
    """The digest `save` writes beside the graph JSON (covering it, and through the weights' checksum it
    holds, every tensor's name, dtype, shape and bytes)."""
    return "sha256:" + hashlib.sha256(graph_json.encode("utf-8", "surrogatepass")).hexdigest()


def expect(condition: bool, message: str) -> None:
    """Raise `LoadError(message)` unless `condition`: how every check of a file's contents fails."""
    if not condition:
        raise LoadError(message)
