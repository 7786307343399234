"""Level deltas and delta managers: move a plain model between levels without the flexible model.

A `LevelDelta` turns a plain DagModule of one level into the plain model of a neighbouring level, in
place. Levels are nested, so going up only adds entries: each parameter keeps the old tensor at the
positions where the old level's channels sit and takes the new values everywhere else; going down
only selects (no values at all). Buffers that differ (batchnorm statistics per level) are stored
whole, tensors that do not change are kept as they are.

Delta file (`FileDeltaManager.make_delta_file`), little-endian:

    b"TDDELTA1" | u64 index length | 32-byte SHA-256 of the index | index (JSON) | segments

The index (`"format": "torch_dag.deltas", "version": 2`) lists each segment (`base`: the `.dag` bytes
of the starting level's plain model; `up/L`, `down/L`: the delta that arrives at level L from L-1 or
L+1) with its offset from the end of the index, its length and the CRC-32 of each of its `chunk`-byte
pieces (4 MiB; checked in parallel). A delta segment is a safetensors blob whose metadata holds the
delta's JSON. Readers check the index hash, every offset against the file's size, and each segment's
checksums before reading anything in it; nothing is unpickled or executed. The checksums detect
corruption and truncation, not deliberate tampering (the file is not signed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from tqdm import tqdm

from ..core.dag import DagModule
from ..core.errors import DagError, LoadError
from ..serde.format import (
    dumps,
    graph_and_tensors,
    loads,
    split_bytes,
    tensor_views,
    update_in_place,
    write_atomic,
)
from .model import FlexDagModule, is_flex
from .serde import index_runs

_MAGIC = b"TDDELTA1"
_META = "torch_dag.delta"
_VERSION = 2
_CHUNK = 1 << 22  # bytes per checksummed piece of a segment

# Positions along an axis: (start, length) runs when there are few (copied run by run, contiguously),
# else an index tensor (gathered / scattered).
Where = list[tuple[int, int]] | torch.Tensor
_FEW_RUNS = 8


@dataclass
class LevelDelta:
    """What turns a plain model of level `source` into the plain model of level `target` (neighbours).

    The target has tensors of the same names as the source. A name in `steps` is made from the source's
    tensor: `expand` puts it at the given positions of a tensor of `shape` and fills the rest from
    `values`; `shrink` selects positions. A name only in `values` is stored whole; any other name keeps
    the source's tensor. Positions are runs `[start, stop)` per axis, numbered in the shared `runs`.
    """

    source: int
    target: int
    graph: dict[str, Any]  # the target's graph JSON where it differs: changed vertex entries, ties
    source_shapes: dict[str, list[int]]  # the source's tensors, to refuse a model of another level
    steps: dict[str, dict[str, Any]]
    runs: list[list[list[int]]]
    values: dict[str, torch.Tensor]
    _where: dict[int, Where] = field(default_factory=dict, init=False, repr=False, compare=False)
    _off: dict[tuple[int, int], Where] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def between(cls, flex: FlexDagModule, source: int, target: int) -> LevelDelta:
        if abs(source - target) != 1 or not (0 <= source <= flex.max_level() and 0 <= target <= flex.max_level()):
            raise DagError(f"a delta joins neighbouring levels of 0..{flex.max_level()}, not {source} -> {target}")
        was = flex.current_level()
        try:
            flex.set_level_use(source)
            old_graph, old_tensors = graph_and_tensors(flex.make_base_copy())
            before = {k: list(t.shape) for k, t in old_tensors.items()}
            del old_tensors
            flex.set_level_use(target)
            graph, tensors = graph_and_tensors(flex.make_base_copy())
        finally:
            if was is not None:
                flex.set_level_use(was)
        if set(tensors) != set(before):
            raise DagError("levels of a flexible model must have tensors of the same names")
        delta = cls(source, target, _graph_change(old_graph, graph), before, {}, [], {})
        interned: dict[str, int] = {}
        flex_layers = {v.name: v.module for v in flex if is_flex(v.module)}
        for key, tensor in tensors.items():
            vertex, attr = _split_key(key)
            module = flex_layers.get(vertex)
            if module is not None and module._parameters.get(attr) is not None:
                step, value = _param_step(tensor, module.cuts[source].get(attr, []), module.cuts[target].get(attr, []),
                                          up=target > source)
                if step is not None:
                    for item in step.get("expand", step.get("shrink", [])):
                        item[1] = interned.setdefault(json.dumps(item[1]), len(interned))
                    delta.steps[key] = step
            else:
                value = _other_value(key, tensor, flex, source, before)
            if value is not None:
                delta.values[key] = value
        delta.runs = [json.loads(r) for r in interned]
        return delta

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the delta holds."""
        return sum(t.numel() * t.element_size() for t in self.values.values())

    def apply(self, plain: DagModule) -> None:
        """Turn `plain` (a plain model of level `source`) into the plain model of level `target`, in place."""
        apply_deltas(plain, [self], graph_and_tensors(plain)[0])

    def _target_tensors(self, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The target's tensors, made from the source level's (checked to be that level's by their shapes)."""
        shapes = {k: list(source[k].shape) for k in self.source_shapes if k in source}
        if shapes != self.source_shapes:
            wrong = next((k for k in self.source_shapes if shapes.get(k) != self.source_shapes[k]), None)
            raise DagError(f"this delta moves level {self.source} -> {self.target}, but the model is not at level "
                           f"{self.source}: {wrong} has shape {shapes.get(wrong)}, expected {self.source_shapes[wrong]}")
        with torch.no_grad():
            return {key: self._make(key, source[key]) for key in self.source_shapes}

    def _target_graph(self, graph: dict[str, Any]) -> dict[str, Any]:
        """The target's graph JSON, from the source's (as `graph_and_tensors` gives it)."""
        changed = self.graph["vertices"]
        return {**graph, **{k: v for k, v in self.graph.items() if k != "vertices"},
                "vertices": [changed.get(entry["name"], entry) for entry in graph["vertices"]]}

    def _make(self, key: str, old: torch.Tensor) -> torch.Tensor:
        step = self.steps.get(key)
        if step is None:
            return self.values[key].clone() if key in self.values else old
        if "shrink" in step:
            return _shrink(old, [(axis, self._index(runs)) for axis, runs in step["shrink"]])
        shape = list(step["shape"])
        axes = [(axis, self._index(runs), self._outside_of(runs, shape[axis])) for axis, runs in step["expand"]]
        pieces, region = [], list(shape)  # the pieces' shapes (see `_outside`), outermost first
        for axis, on, _ in axes:
            pieces.append([*region[:axis], shape[axis] - _count(on), *region[axis + 1:]])
            region[axis] = _count(on)
        sizes = [math.prod(p) for p in pieces]
        value = self.values[key]
        if value.numel() != sum(sizes) or list(old.shape) != region:
            raise DagError(f"{key}: the delta's values do not fit a {shape} tensor around a {list(old.shape)} one")
        parts = [part.reshape(piece) for part, piece in zip(value.split(sizes), pieces)]
        if all(isinstance(on, list) for _, on, _ in axes):  # few runs: copy everything once, into place
            new = torch.empty(shape, dtype=old.dtype)
            _fill(new, axes, old, parts)
            return new
        for (axis, on, off), part in reversed(list(zip(axes, parts))):  # scattered: grow axis by axis
            outer = list(old.shape)
            outer[axis] = shape[axis]
            new = torch.empty(outer, dtype=old.dtype)
            _put(new, axis, on, old)
            _put(new, axis, off, part)
            old = new
        return old

    def _index(self, runs: int) -> Where:
        """The positions of run list `runs` (cached)."""
        if runs not in self._where:
            self._where[runs] = _where(_indices(self.runs[runs]))
        return self._where[runs]

    def _outside_of(self, runs: int, size: int) -> Where:
        """The positions of range(size) not in run list `runs` (cached)."""
        if (runs, size) not in self._off:
            self._off[runs, size] = _complement(self._index(runs), size)
        return self._off[runs, size]

    # --- bytes --------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        meta = {"source": self.source, "target": self.target, "graph": self.graph,
                "source_shapes": self.source_shapes, "steps": self.steps, "runs": self.runs}
        return safetensors.torch.save({k: v.contiguous() for k, v in self.values.items()},
                                      metadata={_META: json.dumps(meta, separators=(",", ":"))})

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, where: str = "<delta>") -> LevelDelta:
        """The delta in `data` (`to_bytes`); its tensors are views into a writable buffer given here."""
        data = bytearray(data) if isinstance(data, bytes) else data
        try:
            header, values = tensor_views(data, where)
            meta = json.loads(header["__metadata__"][_META])
        except LoadError:
            raise
        except Exception as e:
            raise LoadError(f"{where}: not a readable level delta ({type(e).__name__}: {e})") from None
        _check_meta(meta, values, where)
        return cls(meta["source"], meta["target"], meta["graph"], meta["source_shapes"], meta["steps"], meta["runs"],
                   values)


def apply_deltas(plain: DagModule, deltas: list[LevelDelta], graph: dict[str, Any]) -> dict[str, Any]:
    """Move `plain` in place through `deltas` (each from the level the previous one reached), given its
    graph JSON (`graph_and_tensors`); returns the graph JSON of the level reached. The tensors go level
    by level, the model is rebuilt once: only the vertices some delta changes get new modules. Everything
    is made and checked first: on an error `plain` stays as it was."""
    if type(plain) is not DagModule:
        raise DagError(f"a level delta applies to a plain DagModule (make_base_copy()), not {type(plain).__name__}")
    tensors = {k: t.detach() for k, t in plain.state_dict(keep_vars=True).items()}
    changed: set[str] = set()
    for delta in deltas:
        tensors = delta._target_tensors(tensors)
        graph = delta._target_graph(graph)
        changed.update(delta.graph["vertices"])
    training = plain.training
    path = " -> ".join(str(level) for level in [deltas[0].source, *(d.target for d in deltas)])
    update_in_place(plain, graph, changed, tensors, f"level deltas {path}")
    if plain.training != training:
        plain.train(training)
    return graph


def _check_meta(meta: Any, values: dict[str, torch.Tensor], where: str) -> None:
    """Refuse a delta whose JSON does not have the shape `to_bytes` writes (a hostile or broken file)."""

    def expect(ok: bool, what: str) -> None:
        if not ok:
            raise LoadError(f"{where}: malformed level delta: {what}")

    def ints(value: Any, length: int | None = None) -> bool:
        return (isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)
                and (length is None or len(value) == length))

    expect(isinstance(meta, dict) and all(k in meta for k in ("source", "target", "graph", "source_shapes",
                                                                 "steps", "runs")), "missing fields")
    expect(type(meta["source"]) is int and type(meta["target"]) is int and abs(meta["source"] - meta["target"]) == 1,
           "source and target must be neighbouring levels")
    graph = meta["graph"]
    expect(isinstance(graph, dict) and isinstance(graph.get("vertices"), dict)
           and all(isinstance(v, dict) and v.get("name") == k for k, v in graph["vertices"].items())
           and isinstance(graph.get("tied", {}), dict) and isinstance(graph.get("frozen", []), list),
           "the graph changes must map vertex names to vertex entries")
    shapes = meta["source_shapes"]
    expect(isinstance(shapes, dict) and all(ints(v) for v in shapes.values()), "source_shapes must map names to shapes")
    runs = meta["runs"]
    expect(isinstance(runs, list) and all(isinstance(r, list) and all(ints(span, 2) and span[0] <= span[1]
                                                                      for span in r) for r in runs),
           "runs must be lists of [start, stop) spans")
    expect(isinstance(meta["steps"], dict), "steps must be an object")
    for key, step in meta["steps"].items():
        ndim = len(shapes.get(key, []))
        kind = "shrink" if isinstance(step, dict) and "shrink" in step else "expand"
        cuts = step.get(kind) if isinstance(step, dict) else None
        expect(key in shapes and isinstance(cuts, list) and all(ints(c, 2) and c[0] < ndim and c[1] < len(runs)
                                                                 for c in cuts), f"bad step for {key!r}")
        if kind == "expand":
            expect(ints(step.get("shape"), ndim) and key in values, f"bad expansion of {key!r}")
            for axis, index in cuts:
                spans = runs[index]
                expect(not spans or spans[-1][1] <= step["shape"][axis], f"{key!r}: positions outside the tensor")
        else:
            for axis, index in cuts:
                spans = runs[index]
                expect(not spans or spans[-1][1] <= shapes[key][axis], f"{key!r}: positions outside the tensor")
    expect(set(values) <= set(shapes), "the delta names tensors its models do not have")


def _graph_change(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The part of the target's graph JSON that differs from the source's (same vertices, same order)."""
    if [e["name"] for e in old["vertices"]] != [e["name"] for e in new["vertices"]]:
        raise DagError("levels of a flexible model must have the same vertices")
    changed = {n["name"]: n for o, n in zip(old["vertices"], new["vertices"]) if o != n}
    return {"vertices": changed, "tied": new["tied"], "frozen": new["frozen"]}


def _split_key(key: str) -> tuple[str, str]:
    """`vertex_modules.<vertex>.<attr>` -> (vertex, attr)."""
    _, vertex, attr = key.split(".", 2)
    return vertex, attr


def _param_step(tensor: torch.Tensor, source_cuts: list, target_cuts: list, up: bool
                ) -> tuple[dict[str, Any] | None, torch.Tensor | None]:
    """A parameter of a flexible layer (`tensor` at the target level). Going up, the target's indices
    contain the source's: record where the source's sit and store the rest; going down, record which
    of the source's the target keeps. An axis without a cut is the full range."""
    source, target = dict(source_cuts), dict(target_cuts)
    positions = []
    if up:
        for axis, s_index in sorted(source.items()):
            t_index = target.get(axis, np.arange(tensor.shape[axis]))
            positions.append([axis, index_runs(np.searchsorted(t_index, s_index))])
    else:
        for axis, t_index in sorted(target.items()):
            s_index = source.get(axis)
            positions.append([axis, index_runs(t_index if s_index is None else np.searchsorted(s_index, t_index))])
    if not positions:
        return None, None
    if not up:
        return {"shrink": positions}, None
    return {"expand": positions, "shape": list(tensor.shape)}, _outside(tensor, positions)


def _outside(tensor: torch.Tensor, positions: list) -> torch.Tensor:
    """The entries of `tensor` outside the outer product of the per-axis `positions`, flat, in pieces: for
    each axis in turn, the entries off its positions among those on the earlier axes' positions."""
    pieces = []
    for axis, runs in positions:
        on = _where(_indices(runs))
        pieces.append(_take(tensor, axis, _complement(on, tensor.shape[axis])).reshape(-1))
        tensor = _take(tensor, axis, on)
    return torch.cat(pieces)


def _other_value(key: str, tensor: torch.Tensor, flex: FlexDagModule, source: int, before: dict[str, list[int]]
                 ) -> torch.Tensor | None:
    """A buffer of a flexible layer (statistics per level: stored when they differ) or a tensor of a
    plain vertex (the same at every level)."""
    vertex, attr = _split_key(key)
    module = flex[vertex].module
    if not is_flex(module):
        return None
    old = module.levels[source]._buffers.get(attr)
    if old is not None and old.shape == tensor.shape and torch.equal(old, tensor):
        return None
    return tensor


def _indices(runs: list[list[int]]) -> np.ndarray:
    """The integers of runs [start, stop), in order."""
    spans = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    lengths = spans[:, 1] - spans[:, 0]
    if (lengths < 0).any():
        raise DagError(f"runs must have start <= stop, got {runs[:4]}")
    offsets = np.repeat(spans[:, 0] - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) + offsets



def _where(positions: np.ndarray) -> Where:
    runs = index_runs(positions)
    return [(a, b - a) for a, b in runs] if len(runs) <= _FEW_RUNS else torch.from_numpy(positions)


def _count(where: Where) -> int:
    return sum(length for _, length in where) if isinstance(where, list) else len(where)


def _complement(where: Where, size: int) -> Where:
    """The positions of range(size) not in `where`."""
    mask = np.ones(size, dtype=bool)
    if isinstance(where, list):
        for start, length in where:
            mask[start:start + length] = False
    else:
        mask[where.numpy()] = False
    return _where(np.flatnonzero(mask))


def _take(tensor: torch.Tensor, axis: int, where: Where) -> torch.Tensor:
    if not isinstance(where, list):
        return tensor.index_select(axis, where)
    if len(where) == 1:
        return tensor.narrow(axis, *where[0]).contiguous()
    return torch.cat([tensor.narrow(axis, start, length) for start, length in where] or [tensor.narrow(axis, 0, 0)],
                     axis)


def _shrink(tensor: torch.Tensor, cuts: list[tuple[int, Where]]) -> torch.Tensor:
    """`tensor` at the given positions along each axis, in memory of its own (a view would keep the
    larger level's whole tensor alive), copied once where it can be: the axes cut to one run are
    narrowed first (views), then the others gathered."""
    single = [(axis, where[0]) for axis, where in cuts if isinstance(where, list) and len(where) == 1]
    several = [(axis, where) for axis, where in cuts if not (isinstance(where, list) and len(where) == 1)]
    for axis, (start, length) in single:
        tensor = tensor.narrow(axis, start, length)
    for axis, where in several:  # each gather makes a new tensor
        tensor = _take(tensor, axis, where)
    return tensor if several else tensor.clone(memory_format=torch.contiguous_format)


def _put(tensor: torch.Tensor, axis: int, where: Where, value: torch.Tensor) -> None:
    """`tensor` at `where` along `axis` = `value`."""
    if not isinstance(where, list):
        if len(where):
            tensor.index_copy_(axis, where, value)
        return
    offset = 0
    for start, length in where:
        tensor.narrow(axis, start, length).copy_(value.narrow(axis, offset, length))
        offset += length


def _fill(new: torch.Tensor, axes: list[tuple[int, list, Where]], old: torch.Tensor, parts: list[torch.Tensor]
          ) -> None:
    """Write an expansion into `new`: for the first axis, its part off the kept positions, then each run
    of kept positions recursively (the next axes), down to the old tensor."""
    if not axes:
        new.copy_(old)
        return
    (axis, on, off), rest = axes[0], axes[1:]
    _put(new, axis, off, parts[0])
    offset = 0
    for start, length in on:
        _fill(new.narrow(axis, start, length), rest, old.narrow(axis, offset, length),
              [part.narrow(axis, offset, length) for part in parts[1:]])
        offset += length


# --- managers -------------------------------------------------------------------------------------


class InMemoryDeltaManager:
    """Holds a plain model and every neighbour delta of a flexible model; `move_to(level)` moves the
    plain model there (in place) through the levels between."""

    def __init__(self, flex: FlexDagModule):
        start = flex._require_level("a delta manager")
        self.deltas: dict[tuple[int, int], LevelDelta] = {}
        for level in range(flex.max_level() + 1):
            self.deltas.update(_level_deltas(flex, level))
        flex.set_level_use(start)
        self.level, self.max_level = start, flex.max_level()
        self._model = flex.make_base_copy()

    def managed_model(self) -> DagModule:
        return self._model

    def move_to(self, level: int) -> DagModule:
        _check_level(level, self.max_level)
        if level != self.level:
            apply_deltas(self._model, [self.deltas[step] for step in _path(self.level, level)],
                         graph_and_tensors(self._model)[0])
        self.level = level
        return self._model


def _level_deltas(flex: FlexDagModule, level: int) -> dict[tuple[int, int], LevelDelta]:
    flex.set_level_use(level)
    down, up = flex.export_level_delta()
    return {(d.source, d.target): d for d in (down, up) if d is not None}


def _path(source: int, target: int) -> list[tuple[int, int]]:
    step = 1 if target > source else -1
    return [(level, level + step) for level in range(source, target, step)]


def _check_level(level: int, max_level: int) -> None:
    if not isinstance(level, (int, np.integer)) or not 0 <= level <= max_level:
        raise DagError(f"level {level!r} does not exist: levels are 0..{max_level}")


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

    @staticmethod
    def make_delta_file(file: str | Path, flex: FlexDagModule, starting_level: int = 0, *,
                        progress: bool = False) -> Path:
        """Write the plain model of `starting_level` and every neighbour delta of `flex` to `file`
        (with a progress bar over the levels when `progress`)."""
        was = flex._require_level("make_delta_file")
        _check_level(starting_level, flex.max_level())
        segments: list[tuple[str, bytes]] = []
        try:
            flex.set_level_use(starting_level)
            segments.append(("base", dumps(flex.make_base_copy())))
            for level in tqdm(range(flex.max_level() + 1), desc="level deltas", unit="level", disable=not progress):
                for (source, target), delta in sorted(_level_deltas(flex, level).items()):
                    name = f"{'up' if target > source else 'down'}/{target}"
                    segments.append((name, delta.to_bytes()))
        finally:
            flex.set_level_use(was)
        entries, offset = [], 0
        for name, data in segments:
            crcs = [zlib.crc32(chunk) for chunk in split_bytes(data, _CHUNK)]
            entries.append({"name": name, "offset": offset, "length": len(data), "crc32": crcs})
            offset += len(data)
        index = json.dumps({"format": "torch_dag.deltas", "version": _VERSION, "chunk": _CHUNK,
                            "levels": flex.max_level() + 1, "starting_level": starting_level, "segments": entries},
                           separators=(",", ":")).encode()
        path = Path(file)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = _MAGIC + struct.pack("<Q", len(index)) + hashlib.sha256(index).digest() + index
        write_atomic(path, b"".join([header, *(data for _, data in segments)]))
        return path

    def move_to(self, level: int) -> DagModule:
        """The plain model at `level` (the same model object, moved in place, on every call)."""
        _check_level(level, self.max_level)
        if self._model is None:
            data = self._segment("base")
            self._model = loads(data, where=f"{self.path} base")
            self._graph = graph_and_tensors(self._model)[0]
            self.level = int(self.index["starting_level"])
        names = [f"{'up' if target > source else 'down'}/{target}" for source, target in _path(self.level, level)]
        if not names:
            return self._model
        deltas = [LevelDelta.from_bytes(self._segment(name), f"{self.path} {name}") for name in names]
        try:  # the model stays as it was if the deltas cannot be applied
            self._graph = apply_deltas(self._model, deltas, self._graph)
        except LoadError:
            raise
        except Exception as e:  # the file's deltas do not fit the file's own models
            raise LoadError(f"{self.path}: segments {', '.join(map(repr, names))} do not apply ({type(e).__name__}: "
                            f"{str(e)[:200]})") from None
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
        data = memoryview(self._map)[start:start + entry["length"]]
        if list(self._pool.map(zlib.crc32, split_bytes(data, _CHUNK))) != entry["crc32"]:
            raise LoadError(f"{self.path}: segment {name!r} is corrupted (checksum mismatch)")
        return data

    def close(self) -> None:
        self._model = None
        self._pool.shutdown()
        with contextlib.suppress(BufferError):  # a caller still holds a view of a segment: it keeps the map
            self._map.close()
        self._file.close()


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
    index = json.loads(raw)
    if not isinstance(index, dict) or index.get("format") != "torch_dag.deltas" or index.get("version") != _VERSION:
        raise LoadError(f"{path}: not a version {_VERSION} torch_dag delta file (format "
                        f"{str(index.get('format') if isinstance(index, dict) else index)[:40]!r}, version "
                        f"{index.get('version') if isinstance(index, dict) else None}): make it again with this torch_dag")
    if index.get("chunk") != _CHUNK:
        raise LoadError(f"{path}: the index gives checksum pieces of {str(index.get('chunk'))[:20]} bytes, "
                        f"expected {_CHUNK}")
    data_start = 48 + length
    index["by_name"] = {}
    for entry in index.get("segments", []):
        if not (isinstance(entry, dict) and type(entry.get("offset")) is int and type(entry.get("length")) is int
                and isinstance(entry.get("crc32"), list) and isinstance(entry.get("name"), str)
                and entry["offset"] >= 0 and data_start + entry["offset"] + entry["length"] <= size):
            raise LoadError(f"{path}: segment {str(entry)[:80]} lies outside the file: truncated or corrupted")
        index["by_name"][entry["name"]] = entry
    if type(index.get("levels")) is not int or type(index.get("starting_level")) is not int:
        raise LoadError(f"{path}: the index does not say its levels")
    return index, data_start


@contextlib.contextmanager
def file_delta_manager(path: str | Path) -> Iterator[FileDeltaManager]:
    """`with file_delta_manager(path) as m: plain = m.move_to(level)`; the file is closed at the end."""
    manager = FileDeltaManager(path)
    try:
        yield manager
    finally:
        manager.close()
