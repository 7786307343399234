"""Reading a `.dag` file or its bytes: header and graph checked, checksum compared, the DAG built."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import safetensors
import torch

from ..core.dag import DagModule
from ..core.errors import LoadError
from .build import build
from .checksum import PIECED, checksum, whole_checksum
from .header import read_graph, read_header, tensor_views
from .schema import MAX_HEADER


def load(path: str | os.PathLike, *, strict_checksum: bool = True) -> DagModule:
    """Rebuild a DagModule saved by `save`. Any malformed input raises `LoadError` saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: no such file")
    with path.open("rb") as f:
        start = f.read(8)
        if len(start) == 8:
            start += f.read(min(struct.unpack("<Q", start)[0], MAX_HEADER))
    header = read_header(start, path.stat().st_size, str(path))
    graph = read_graph(str(path), header)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            # clone: fresh, allocator-aligned memory, so kernels take the same paths as before saving
            tensors = {key: f.get_tensor(key).clone() for key in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors reports what it could not read with its own error type
        raise LoadError(f"{path}: weights are unreadable ({type(e).__name__}: {e})") from None
    return _checked_build(graph, tensors, str(path), strict_checksum)


def loads(
    data: bytes | bytearray | memoryview, *, where: str = "<bytes>", strict_checksum: bool = True
) -> DagModule:
    """`load` from the bytes of a `.dag` file."""
    header, views = tensor_views(bytearray(data) if isinstance(data, bytes) else data, where)
    graph = read_graph(where, header)
    return _checked_build(graph, {key: t.clone() for key, t in views.items()}, where, strict_checksum)


def _checked_build(
    graph: dict[str, Any], tensors: dict[str, torch.Tensor], where: str, strict_checksum: bool
) -> DagModule:
    expected = graph.get("checksum")
    check = checksum if not isinstance(expected, str) or expected.startswith(PIECED) else whole_checksum
    if strict_checksum and check(tensors) != expected:
        raise LoadError(f"{where}: weight checksum mismatch: the file is corrupted or was modified")
    return build(graph, tensors, where)
