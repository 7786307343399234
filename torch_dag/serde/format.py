"""Saving and loading DAGs: one `.dag` file, a safetensors file whose metadata holds the graph JSON.

Layout (documented in README.md):
- the safetensors header's `__metadata__["torch_dag"]` is the graph: schema version, inputs, vertices
  (name, op, config, args, kwargs, meta), output, tied tensors, frozen parameters and a checksum
  (checksum.py: SHA-256 over the tensors' 4 MiB pieces' SHA-256s; older files' single digest still reads);
- `__metadata__["torch_dag.sha256"]` is the SHA-256 of the graph JSON (schema version 2; version 1 files,
  without it, still load with their weights checked);
- the tensors are the DAG's state dict, each shared tensor stored once.

Loading rebuilds modules only from the registered vocabulary, validates the JSON before building,
never unpickles and never imports or runs anything named in the file. Saving writes a temporary
file beside the target and renames it into place, so a crash never leaves a half-written model.

Before building, every config is checked against its op's schema (configs.py) and the sizes a header
asks for against the file (limits.py).

This module is the format's one front: each part lives in its own file (schema, save, header, build,
configs, limits, weights, load, update, checksum) and is re-exported here.
"""

from .build import build
from .checksum import checksum as _checksum  # noqa: F401 (the names tests import)
from .checksum import split_bytes
from .checksum import whole_checksum as _whole_checksum  # noqa: F401
from .header import tensor_views
from .load import load, loads
from .save import dumps, graph_and_tensors, save, write_atomic
from .schema import EXTENSION_DAGS, SCHEMA_VERSION
from .update import rebuild, update_in_place

__all__ = [
    "EXTENSION_DAGS",
    "SCHEMA_VERSION",
    "build",
    "dumps",
    "graph_and_tensors",
    "load",
    "loads",
    "rebuild",
    "save",
    "split_bytes",
    "tensor_views",
    "update_in_place",
    "write_atomic",
]
