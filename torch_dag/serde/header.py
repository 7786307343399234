"""Reading a safetensors header ourselves and checking it before anything trusts it: tensor entries that
lie inside the file without overlapping, and the graph JSON in its metadata at a supported version."""

from __future__ import annotations

import itertools
import json
import struct
from typing import Any

import torch

from ..core.errors import LoadError
from .schema import DIGEST, FORMAT, MAX_HEADER, READABLE_VERSIONS, expect, graph_digest

_ITEM_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def tensor_views(data: bytearray | memoryview, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked header of safetensors bytes and its tensors as views into `data` (no copy: the caller
    keeps `data` alive and clones what it keeps)."""
    header = read_header(data, len(data), where)
    start = 8 + struct.unpack("<Q", data[:8])[0]
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise LoadError(f"{where}: tensor {key!r} has a dtype torch_dag does not read ({info['dtype']})")
        begin, end = info["data_offsets"]
        flat = (
            torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=start + begin)
            if end > begin
            else torch.empty(0, dtype=torch.uint8)
        )
        tensors[key] = (
            flat.view(dtype).reshape(info["shape"])
            if flat.numel()
            else torch.empty(info["shape"], dtype=dtype)
        )
    return header, tensors


def read_header(start: bytes | bytearray | memoryview, size: int, where: str) -> dict[str, Any]:
    """Read and check the safetensors header ourselves (from the file's first bytes, `start`, and its
    `size`), so no malformed file reaches the parser."""
    if len(start) < 8:
        raise LoadError(f"{where}: file is truncated ({size} bytes)")
    (header_len,) = struct.unpack("<Q", start[:8])
    if header_len > min(MAX_HEADER, size - 8):
        raise LoadError(f"{where}: header length {header_len} exceeds the file; truncated or not a DAG")
    raw = bytes(start[8 : 8 + header_len])
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise LoadError(f"{where}: header is not valid JSON ({type(e).__name__})") from None
    expect(isinstance(header, dict), f"{where}: header must be a JSON object")
    data_size = size - 8 - header_len
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        ok = (
            isinstance(info, dict)
            and info.get("dtype") in _ITEM_SIZES
            and isinstance(info.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(type(o) is int for o in info["data_offsets"])
        )
        expect(ok, f"{where}: malformed entry for tensor {str(key)[:60]!r} in the header")
        begin, end = info["data_offsets"]
        numel = span = 1
        for d in info["shape"]:
            numel *= d
            span *= max(d, 1)
        expect(
            len(info["shape"]) <= 16 and span < 2**62,
            f"{where}: tensor {str(key)[:60]!r} has an impossible shape {str(info['shape'])[:60]}",
        )
        expect(
            0 <= begin <= end <= data_size and end - begin == numel * _ITEM_SIZES[info["dtype"]],
            f"{where}: tensor {key!r} lies outside the file or has the wrong size; the file is truncated",
        )
        spans.append((begin, end))
    spans.sort()
    expect(all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), f"{where}: tensors overlap in the file")
    return header


def read_graph(where: str, header: dict[str, Any]) -> dict[str, Any]:
    """The graph JSON of a checked header, its digest compared first (files of schema version 1 have
    none: only their weights are checked)."""
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not isinstance(metadata.get(FORMAT), str):
        raise LoadError(f"{where}: not a torch_dag file (no graph in the safetensors metadata)")
    signed = DIGEST in metadata
    if signed and metadata[DIGEST] != graph_digest(metadata[FORMAT]):
        raise LoadError(f"{where}: graph checksum mismatch: the file is corrupted or was modified")
    unknown = sorted(set(metadata) - {FORMAT, DIGEST})
    expect(not unknown, f"{where}: unknown metadata {str(unknown)[:80]}: the file is damaged")
    try:
        graph = json.loads(metadata[FORMAT])
    except (ValueError, RecursionError) as e:
        raise LoadError(f"{where}: graph metadata is not valid JSON ({type(e).__name__})") from None
    if not isinstance(graph, dict) or graph.get("format") != FORMAT:
        raise LoadError(f"{where}: not a torch_dag file")
    version = graph.get("schema_version")
    if version not in READABLE_VERSIONS or type(version) is not int:
        raise LoadError(
            f"{where}: schema version {repr(version)[:20]} is not supported (this torch_dag reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade torch_dag or re-save the model"
        )
    expect(
        signed or version < 2,
        f"{where}: the graph checksum is missing (schema version {version} files carry one): damaged file",
    )
    return graph
