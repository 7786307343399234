"""The delta file (`FileDeltaManager.make_delta_file`): a flexible model's starting level and every
neighbour delta in one file, read segment by segment. Little-endian:

    b"TDDELTA1" | u64 index length | 32-byte SHA-256 of the index | index (JSON) | segments

The index (`"format": "torch_dag.deltas", "version": 2`) lists each segment (`base`: the `.dag` bytes
of the starting level's plain model; `up/L`, `down/L`: the delta that arrives at level L from L-1 or
L+1) with its offset from the end of the index, its length and the CRC-32 of each of its `chunk`-byte
pieces (4 MiB; checked in parallel). A delta segment is a safetensors blob whose metadata holds the
delta's JSON. Readers check the index hash, every offset against the file's size, and each segment's
checksums before reading anything in it, and that the index lists exactly the segments its level count
needs (so no level count or starting level exceeds what the file holds); a malformed file raises
`LoadError`; nothing is unpickled or executed. The checksums detect
corruption and truncation, not deliberate tampering (the file is not signed).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, cast, overload

from ..converters import build_from_unstructured_module
from ..core.dag import DagModule, Vertex
from ..core.errors import DagError, LoadError
from ..core.progress import show_progress
from ..core.template import Ref
from ..serde.format import dumps, graph_and_tensors, loads, split_bytes, write_atomic
from .base import Module
from .delta_level import LevelDelta, apply_deltas, check_level, level_deltas, level_path
from .model import FlexDagModule
from .modules import FlexModule

_MAGIC = b"TDDELTA1"
_VERSION = 2
_CHUNK = 1 << 22  # bytes per checksummed piece of a segment


class FileDeltaManager:
    """Moves a plain model between levels reading only the segments it needs from a delta file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = self.path.open("rb")
        try:
            self.index, self._data_start = _read_index(self._file, self.path)
            # segments are read through a private mapping: straight from the page cache, no copy
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        except BaseException:
            self._file.close()
            raise
        self.max_level = int(self.index["levels"]) - 1
        self.level: int | None = None
        self._model: DagModule | None = None
        self._graph: dict[str, Any] = {}  # the model's graph JSON, kept in step with it
        self.bytes_read = 0
        self._pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1))  # zlib releases the GIL while it sums

    @overload
    @staticmethod
    def make_delta_file(
        file: str | Path,
        flex: FlexDagModule | Module,
        starting_level: int = 0,
        *,
        progress: bool = False,
        example_inputs: Any = None,
    ) -> Path: ...

    @overload
    @staticmethod
    def make_delta_file(
        file: BinaryIO,
        flex: FlexDagModule | Module,
        starting_level: int = 0,
        *,
        progress: bool = False,
        example_inputs: Any = None,
    ) -> None: ...

    @staticmethod
    def make_delta_file(
        file: str | Path | BinaryIO,
        flex: FlexDagModule | Module,
        starting_level: int = 0,
        *,
        progress: bool = False,
        example_inputs: Any = None,
    ) -> Path | None:
        """Write the plain model of `starting_level` and every neighbour delta of `flex` to `file`: a path
        (written atomically; returned) or a binary file open for writing; `progress` shows a bar over the
        levels. A hand-written flexible model (`td.flex.Module`) is converted to a
        FlexDagModule first (on `example_inputs` where given): the file moves plain DagModules, which
        need no Python class to load."""
        if not isinstance(file, (str, os.PathLike)) and (
            not callable(getattr(file, "write", None)) or isinstance(file, io.TextIOBase)
        ):
            raise DagError(
                f"make_delta_file writes to a path or a binary file open for writing (open(name, 'wb')), "
                f"not a {type(file).__name__}"
            )
        if not isinstance(flex, FlexDagModule):
            flex = _as_flexible_dag(flex, example_inputs)
        segments = _segments_of(flex, starting_level, progress)
        entries, offset = [], 0
        for name, data in segments:
            crcs = [zlib.crc32(chunk) for chunk in split_bytes(data, _CHUNK)]
            entries.append({"name": name, "offset": offset, "length": len(data), "crc32": crcs})
            offset += len(data)
        index = json.dumps(
            {
                "format": "torch_dag.deltas",
                "version": _VERSION,
                "chunk": _CHUNK,
                "levels": flex.max_level() + 1,
                "starting_level": starting_level,
                "segments": entries,
            },
            separators=(",", ":"),
        ).encode()
        header = _MAGIC + struct.pack("<Q", len(index)) + hashlib.sha256(index).digest() + index
        if not isinstance(file, (str, os.PathLike)):
            file.write(header)
            for _, data in segments:
                file.write(data)
            return None
        path = Path(file)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, b"".join([header, *(data for _, data in segments)]))
        return path

    def move_to(self, level: int) -> DagModule:
        """The plain model at `level` (the same model object, moved in place, on every call)."""
        check_level(level, self.max_level)
        if self._model is None:
            data = self._segment("base")
            self._model = loads(data, where=f"{self.path} base")
            self._graph = graph_and_tensors(self._model)[0]
            self.level = int(self.index["starting_level"])
        at = cast(int, self.level)  # set with the model
        names = [
            f"{'up' if target > source else 'down'}/{target}" for source, target in level_path(at, level)
        ]
        if not names:
            return self._model
        deltas = [LevelDelta.from_bytes(self._segment(name), f"{self.path} {name}") for name in names]
        for (source, target), name, delta in zip(level_path(at, level), names, deltas):
            if (delta.source, delta.target) != (source, target):
                raise LoadError(
                    f"{self.path}: segment {name!r} holds the delta {delta.source} -> {delta.target}, "
                    f"expected {source} -> {target}: damaged file"
                )
        try:  # the model stays as it was if the deltas cannot be applied
            self._graph = apply_deltas(self._model, deltas, self._graph)
        except LoadError:
            raise
        except Exception as e:  # the file's deltas do not fit the file's own models
            raise LoadError(
                f"{self.path}: segments {', '.join(map(repr, names))} do not apply ({type(e).__name__}: "
                f"{str(e)[:200]})"
            ) from None
        self.level = level
        return self._model

    def _segment(self, name: str) -> memoryview:
        """The bytes of segment `name`, checked against the index's checksums."""
        entry = self.index["by_name"].get(name)
        if entry is None:
            raise LoadError(f"{self.path}: no segment {name!r} in the delta file")
        start = self._data_start + entry["offset"]
        if start + entry["length"] > len(self._map):
            raise LoadError(f"{self.path}: segment {name!r} is truncated")
        self.bytes_read += entry["length"]
        data = memoryview(self._map)[start : start + entry["length"]]
        if list(self._pool.map(zlib.crc32, split_bytes(data, _CHUNK))) != entry["crc32"]:
            raise LoadError(f"{self.path}: segment {name!r} is corrupted (checksum mismatch)")
        return data

    def close(self) -> None:
        self._model = None
        self._pool.shutdown()
        with contextlib.suppress(BufferError):  # a caller still holds a view of a segment: it keeps the map
            self._map.close()
        self._file.close()


def _segments_of(flex: FlexDagModule, starting_level: int, progress: bool) -> list[tuple[str, bytes]]:
    """The base segment (the plain model of `starting_level`) and every neighbour delta's."""
    was = flex._require_level("make_delta_file")
    check_level(starting_level, flex.max_level())
    segments: list[tuple[str, bytes]] = []
    try:
        flex.set_level_use(starting_level)
        segments.append(("base", dumps(flex.make_base_copy())))
        for level in show_progress(
            range(flex.max_level() + 1), desc="level deltas", unit="level", disable=not progress
        ):
            for (source, target), delta in sorted(level_deltas(flex, level).items()):
                segments.append((f"{'up' if target > source else 'down'}/{target}", delta.to_bytes()))
    finally:
        flex.set_level_use(was)
    return segments


def _as_flexible_dag(model: Any, example_inputs: Any) -> FlexDagModule:
    """A hand-written flexible model as a FlexDagModule at its level in use (sharing its weights)."""
    if not isinstance(model, Module):
        raise DagError(
            f"make_delta_file takes a flexible model (a FlexDagModule or a td.flex.Module), not a "
            f"{type(model).__name__}"
        )
    level = model.current_level()
    if level is None:
        raise DagError(f"make_delta_file: {type(model).__name__} is not at one level: set_level_use(i) first")
    if isinstance(model, FlexModule):  # one layer: a DAG of one vertex
        return FlexDagModule(["x"], [Vertex("layer", model, (Ref("x"),), {})], Ref("layer"))
    try:
        dag = build_from_unstructured_module(model, example_inputs)
    except Exception as error:  # the converter's own message says what failed; add what to do here
        raise DagError(
            f"make_delta_file converts a hand-written flexible model to a FlexDagModule, and "
            f"{type(model).__name__} did not convert ({type(error).__name__}: {str(error)[:300]}): pass "
            "example_inputs=(x,) with inputs of its level in use, or keep its levels in memory with "
            "InMemoryDeltaManager(model)"
        ) from error
    if not isinstance(dag, FlexDagModule):
        raise DagError(f"{type(model).__name__} converted to a DAG without flexible layers")
    return dag


def _read_index(f, path: Path) -> tuple[dict[str, Any], int]:
    size = path.stat().st_size
    head = f.read(48)
    if len(head) < 48 or head[:8] != _MAGIC:
        raise LoadError(f"{path}: not a torch_dag delta file (bad magic or truncated)")
    (length,) = struct.unpack("<Q", head[8:16])
    if length > size - 48:
        raise LoadError(f"{path}: the index is longer than the file: truncated")
    raw = f.read(length)
    if hashlib.sha256(raw).digest() != head[16:48]:
        raise LoadError(f"{path}: the index is corrupted (checksum mismatch)")
    try:
        index = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise LoadError(f"{path}: the index is not JSON ({type(e).__name__}): damaged file") from None
    if (
        not isinstance(index, dict)
        or index.get("format") != "torch_dag.deltas"
        or index.get("version") != _VERSION
    ):
        raise LoadError(
            f"{path}: not a version {_VERSION} torch_dag delta file (format "
            f"{str(index.get('format') if isinstance(index, dict) else index)[:40]!r}, version "
            f"{index.get('version') if isinstance(index, dict) else None}): make it again with this torch_dag"
        )
    if index.get("chunk") != _CHUNK:
        raise LoadError(
            f"{path}: the index gives checksum pieces of {str(index.get('chunk'))[:20]} bytes, "
            f"expected {_CHUNK}"
        )
    data_start = 48 + length
    index["by_name"] = _segments(index.get("segments"), data_start, size, path)
    _check_levels(index, path)
    return index, data_start


def _segments(segments: Any, data_start: int, size: int, path: Path) -> dict[str, dict[str, Any]]:
    """The index's segments by name, each checked to lie inside the file with one CRC-32 per piece."""
    if not isinstance(segments, list):
        raise LoadError(f"{path}: the index has no list of segments: damaged file")
    by_name: dict[str, dict[str, Any]] = {}
    for entry in segments:
        if not (
            isinstance(entry, dict)
            and type(entry.get("offset")) is int
            and type(entry.get("length")) is int
            and isinstance(entry.get("crc32"), list)
            and isinstance(entry.get("name"), str)
            and entry["offset"] >= 0
            and entry["length"] >= 0
            and data_start + entry["offset"] + entry["length"] <= size
            and len(entry["crc32"]) == -(-entry["length"] // _CHUNK)
            and all(type(c) is int for c in entry["crc32"])
        ):
            raise LoadError(
                f"{path}: segment {str(entry)[:80]} lies outside the file: truncated or corrupted"
            )
        if entry["name"] in by_name:
            raise LoadError(f"{path}: segment {entry['name'][:40]!r} is listed twice: damaged file")
        by_name[entry["name"]] = entry
    return by_name


def _check_levels(index: dict[str, Any], path: Path) -> None:
    """Levels 0..levels-1 with the starting level among them, and every segment a move between
    neighbours needs listed (so a level count can never exceed what the file holds)."""
    levels, start = index.get("levels"), index.get("starting_level")
    if type(levels) is not int or type(start) is not int:
        raise LoadError(f"{path}: the index does not say its levels")
    names = set(index["by_name"])
    if not 1 <= levels <= len(names) or not 0 <= start < levels:
        raise LoadError(
            f"{path}: the index gives {str(levels)[:20]} levels starting at {str(start)[:20]}, but the file "
            f"holds {len(names)} segments: damaged file"
        )
    needed = {"base"} | {f"up/{level}" for level in range(1, levels)}
    needed |= {f"down/{level}" for level in range(levels - 1)}
    if names != needed:
        raise LoadError(
            f"{path}: the index lists segments {sorted(names - needed)[:4]} it should not and lacks "
            f"{sorted(needed - names)[:4]}: damaged file"
        )


@contextlib.contextmanager
def file_delta_manager(path: str | Path) -> Iterator[FileDeltaManager]:
    """`with file_delta_manager(path) as m: plain = m.move_to(level)`; the file is closed at the end."""
    manager = FileDeltaManager(path)
    try:
        yield manager
    finally:
        manager.close()
