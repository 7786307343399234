"""`LevelDelta`: what turns a plain model of one level of a flexible model into the plain model of a
neighbouring level, in place. Levels are nested, so going up only adds entries: each parameter keeps the
old tensor at the positions where the old level's channels sit and takes the new values everywhere else;
going down only selects (no values at all). Buffers that differ (batchnorm statistics per level) are
stored whole, tensors that do not change are kept as they are. A delta's bytes are a safetensors blob
whose metadata holds its JSON (checked by `_check_meta` before use)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import safetensors.torch
import torch
from torch import nn

from ..core.dag import DagModule
from ..core.errors import DagError, LoadError
from ..serde.format import graph_and_tensors, tensor_views, update_in_place
from .delta_tensors import Where, complement, count, fill, indices, outside, put, shrink, where_of
from .modules import index_runs, is_flex

if TYPE_CHECKING:
    from .model import FlexDagModule

_META = "torch_dag.delta"


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
    tree: bool = False  # a delta of a hand-written flexible model: it moves that model's plain copy
    _where: dict[int, Where] = field(default_factory=dict, init=False, repr=False, compare=False)
    _off: dict[tuple[int, int], Where] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def between(cls, flex: FlexDagModule, source: int, target: int) -> LevelDelta:
        if abs(source - target) != 1 or not (
            0 <= source <= flex.max_level() and 0 <= target <= flex.max_level()
        ):
            raise DagError(
                f"a delta joins neighbouring levels of 0..{flex.max_level()}, not {source} -> {target}"
            )
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
                step, value = _param_step(
                    tensor,
                    module.cuts[source].get(attr, []),
                    module.cuts[target].get(attr, []),
                    up=target > source,
                )
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

    def apply(self, plain: nn.Module) -> None:
        """Turn `plain` (a plain model of level `source`: a DagModule, or the plain copy of a hand-written
        flexible model) into the plain model of level `target`, in place."""
        if self.tree:
            from .delta_tree import apply_to_tree

            apply_to_tree(plain, [self])
        else:
            dag = _plain_dag(plain)
            apply_deltas(dag, [self], graph_and_tensors(dag)[0])

    def _target_tensors(self, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The target's tensors, made from the source level's (checked to be that level's by their shapes)."""
        shapes = {k: list(source[k].shape) for k in self.source_shapes if k in source}
        if shapes != self.source_shapes:
            wrong = next(k for k in self.source_shapes if shapes.get(k) != self.source_shapes[k])
            raise DagError(
                f"this delta moves level {self.source} -> {self.target}, but the model is not at level "
                f"{self.source}: {wrong} has shape {shapes.get(wrong)}, expected {self.source_shapes[wrong]}"
            )
        with torch.no_grad():
            return {key: self._make(key, source[key]) for key in self.source_shapes}

    def _target_graph(self, graph: dict[str, Any]) -> dict[str, Any]:
        """The target's graph JSON, from the source's (as `graph_and_tensors` gives it)."""
        changed = self.graph["vertices"]
        return {
            **graph,
            **{k: v for k, v in self.graph.items() if k != "vertices"},
            "vertices": [changed.get(entry["name"], entry) for entry in graph["vertices"]],
        }

    def _make(self, key: str, old: torch.Tensor) -> torch.Tensor:
        step = self.steps.get(key)
        if step is None:
            return self.values[key].clone() if key in self.values else old
        if "shrink" in step:
            return shrink(old, [(axis, self._index(runs)) for axis, runs in step["shrink"]])
        shape = list(step["shape"])
        axes = [
            (axis, self._index(runs), self._outside_of(runs, shape[axis])) for axis, runs in step["expand"]
        ]
        pieces, region = [], list(shape)  # the pieces' shapes (see `outside`), outermost first
        for axis, on, _ in axes:
            pieces.append([*region[:axis], shape[axis] - count(on), *region[axis + 1 :]])
            region[axis] = count(on)
        sizes = [math.prod(p) for p in pieces]
        value = self.values[key]
        if value.numel() != sum(sizes) or list(old.shape) != region:
            raise DagError(
                f"{key}: the delta's values do not fit a {shape} tensor around a {list(old.shape)} one"
            )
        parts = [part.reshape(piece) for part, piece in zip(value.split(sizes), pieces)]
        if all(isinstance(on, list) for _, on, _ in axes):  # few runs: copy everything once, into place
            new = torch.empty(shape, dtype=old.dtype)
            fill(new, cast(list, axes), old, parts)  # every `on` is a list of runs here
            return new
        for (axis, on, off), part in reversed(list(zip(axes, parts))):  # scattered: grow axis by axis
            outer = list(old.shape)
            outer[axis] = shape[axis]
            new = torch.empty(outer, dtype=old.dtype)
            put(new, axis, on, old)
            put(new, axis, off, part)
            old = new
        return old

    def _index(self, runs: int) -> Where:
        """The positions of run list `runs` (cached)."""
        if runs not in self._where:
            self._where[runs] = where_of(indices(self.runs[runs]))
        return self._where[runs]

    def _outside_of(self, runs: int, size: int) -> Where:
        """The positions of range(size) not in run list `runs` (cached)."""
        if (runs, size) not in self._off:
            self._off[runs, size] = complement(self._index(runs), size)
        return self._off[runs, size]

    # --- bytes --------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        meta = {
            "source": self.source,
            "target": self.target,
            "graph": self.graph,
            "source_shapes": self.source_shapes,
            "steps": self.steps,
            "runs": self.runs,
            **({"tree": True} if self.tree else {}),
        }
        return safetensors.torch.save(
            {k: v.contiguous() for k, v in self.values.items()},
            metadata={_META: json.dumps(meta, separators=(",", ":"))},
        )

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
        return cls(
            meta["source"],
            meta["target"],
            meta["graph"],
            meta["source_shapes"],
            meta["steps"],
            meta["runs"],
            values,
            meta.get("tree", False),
        )


def apply_deltas(plain: DagModule, deltas: list[LevelDelta], graph: dict[str, Any]) -> dict[str, Any]:
    """Move `plain` in place through `deltas` (each from the level the previous one reached), given its
    graph JSON (`graph_and_tensors`); returns the graph JSON of the level reached. The tensors go level
    by level, the model is rebuilt once: only the vertices some delta changes get new modules. Everything
    is made and checked first: on an error `plain` stays as it was."""
    _plain_dag(plain)
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


def _plain_dag(plain: nn.Module) -> DagModule:
    if type(plain) is not DagModule:
        raise DagError(
            f"a flexible DAG's level delta applies to a plain DagModule (its make_base_copy()), not a "
            f"{type(plain).__name__}; a hand-written flexible model's own deltas move its plain copies"
        )
    return plain


class _MalformedDelta:
    """Checks of a level delta's JSON that raise `LoadError` naming the file (`where`)."""

    def __init__(self, where: str):
        self.where = where

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            raise LoadError(f"{self.where}: malformed level delta: {what}")


def _ints(value: Any, length: int | None = None) -> bool:
    """A list of non-negative ints (of `length` entries, when given)."""
    return (
        isinstance(value, list)
        and all(type(v) is int and v >= 0 for v in value)
        and (length is None or len(value) == length)
    )


def _check_meta(meta: Any, values: dict[str, torch.Tensor], where: str) -> None:
    """Refuse a delta whose JSON does not have the shape `to_bytes` writes (a hostile or broken file)."""
    expect = _MalformedDelta(where).expect
    expect(
        isinstance(meta, dict)
        and all(k in meta for k in ("source", "target", "graph", "source_shapes", "steps", "runs")),
        "missing fields",
    )
    expect(
        type(meta["source"]) is int
        and type(meta["target"]) is int
        and abs(meta["source"] - meta["target"]) == 1,
        "source and target must be neighbouring levels",
    )
    graph = meta["graph"]
    expect(
        isinstance(graph, dict)
        and isinstance(graph.get("vertices"), dict)
        and all(isinstance(v, dict) and v.get("name") == k for k, v in graph["vertices"].items())
        and isinstance(graph.get("tied", {}), dict)
        and isinstance(graph.get("frozen", []), list),
        "the graph changes must map vertex names to vertex entries",
    )
    shapes = meta["source_shapes"]
    expect(
        isinstance(shapes, dict) and all(_ints(v) for v in shapes.values()),
        "source_shapes must map names to shapes",
    )
    runs = meta["runs"]
    expect(
        isinstance(runs, list)
        and all(
            isinstance(r, list) and all(_ints(span, 2) and span[0] <= span[1] for span in r) for r in runs
        ),
        "runs must be lists of [start, stop) spans",
    )
    expect(isinstance(meta["steps"], dict), "steps must be an object")
    expect(type(meta.get("tree", False)) is bool, "tree must be true or false")
    for key, step in meta["steps"].items():
        _check_step(key, step, shapes, runs, values, expect)
    expect(set(values) <= set(shapes), "the delta names tensors its models do not have")


def _check_step(
    key: str,
    step: Any,
    shapes: dict[str, list[int]],
    runs: list[list[list[int]]],
    values: dict[str, torch.Tensor],
    expect: Callable[[bool, str], None],
) -> None:
    """One tensor's step: which runs it reads along which axes, all inside the tensor it makes."""
    ndim = len(shapes.get(key, []))
    kind = "shrink" if isinstance(step, dict) and "shrink" in step else "expand"
    cuts = step.get(kind) if isinstance(step, dict) else None
    expect(
        key in shapes
        and isinstance(cuts, list)
        and all(_ints(c, 2) and c[0] < ndim and c[1] < len(runs) for c in cuts),
        f"bad step for {key!r}",
    )
    if kind == "expand":
        expect(_ints(step.get("shape"), ndim) and key in values, f"bad expansion of {key!r}")
    bounds = step["shape"] if kind == "expand" else shapes[key]
    for axis, index in cuts or ():
        spans = runs[index]
        expect(not spans or spans[-1][1] <= bounds[axis], f"{key!r}: positions outside the tensor")


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


def _param_step(
    tensor: torch.Tensor, source_cuts: list, target_cuts: list, up: bool
) -> tuple[dict[str, Any] | None, torch.Tensor | None]:
    """A parameter of a flexible layer (`tensor` at the target level). Going up, the target's indices
    contain the source's: record where the source's sit and store the rest; going down, record which
    of the source's the target keeps. An axis without a cut is the full range."""
    source, target = dict(source_cuts), dict(target_cuts)
    positions = []
    if up:
        for axis, s_index in sorted(source.items()):
            t_index = target.get(axis, np.arange(tensor.shape[axis]))
            positions.append([axis, index_runs(np.asarray(np.searchsorted(t_index, s_index)))])
    else:
        for axis, t_index in sorted(target.items()):
            s_index = source.get(axis)
            kept = t_index if s_index is None else np.searchsorted(s_index, t_index)
            positions.append([axis, index_runs(np.asarray(kept))])
    if not positions:
        return None, None
    if not up:
        return {"shrink": positions}, None
    return {"expand": positions, "shape": list(tensor.shape)}, outside(tensor, positions)


def _other_value(
    key: str, tensor: torch.Tensor, flex: FlexDagModule, source: int, before: dict[str, list[int]]
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


def level_deltas(flex: FlexDagModule, level: int) -> dict[tuple[int, int], LevelDelta]:
    flex.set_level_use(level)
    down, up = flex.export_level_delta()
    return {(d.source, d.target): d for d in (down, up) if d is not None}


def level_path(source: int, target: int) -> list[tuple[int, int]]:
    step = 1 if target > source else -1
    return [(level, level + step) for level in range(source, target, step)]


def check_level(level: int, max_level: int) -> None:
    if not isinstance(level, (int, np.integer)) or not 0 <= level <= max_level:
        raise DagError(f"level {level!r} does not exist: levels are 0..{max_level}")
