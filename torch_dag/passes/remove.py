"""Removal and simplification: identity-like vertices, dead vertices, duplicate constants."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch.nn.modules.dropout import _DropoutNd

from ..core.dag import DagModule, Vertex
from ..core.editor import Editor, first_input
from ..core.errors import DagError
from ..core.ops import Constant
from ..core.template import Ref
from ..core.traits import Trait, has_trait
from .pattern import DROPOUTS


def _is_identity(vertex: Vertex, editor: Editor, inference: bool) -> bool:
    """Vertices that return their input unchanged (values, shape and dtype) for every input."""
    op = vertex.op
    if has_trait(op, Trait.IDENTITY):
        return True
    if op in DROPOUTS:  # dropout modules only: a functional dropout's `training` argument decides
        return inference or cast(_DropoutNd, vertex.module).p == 0
    if op == "flatten":
        return vertex.args[1] == vertex.args[2]
    if op == "reshape":
        return _reshape_is_identity(vertex, editor)
    return False


def _is_size_of(editor: Editor, ref: object, x: Ref, dim: int | None) -> bool:
    """Whether `ref` reads `size(x)` (dim None) or `size(x)[dim]` / `size(x, dim)`."""
    if not isinstance(ref, Ref) or ref.name not in editor.vertices:
        return False
    producer = editor[ref.name]
    if producer.op == "size":
        return producer.args[0] == x and (producer.args[1:2] or (None,))[0] == dim
    if producer.op == "getitem" and dim is not None and producer.args[1] == dim:
        return _is_size_of(editor, producer.args[0], x, None)
    return False


def _reshape_is_identity(vertex: Vertex, editor: Editor) -> bool:
    """`x.reshape(x.shape)`, or a target whose every entry is x's own size there, its recorded
    static size (never for dim 0, the batch) or a single -1."""
    x, shape = vertex.args[:2]
    if not isinstance(x, Ref):
        return False
    if isinstance(shape, Ref):
        return _is_size_of(editor, shape, x, None)
    recorded = editor[x.name].meta.get("shape") if x.name in editor.vertices else None
    if not isinstance(shape, (list, tuple)) or recorded is None or len(shape) != len(recorded):
        return False
    wildcards = 0
    for i, entry in enumerate(shape):
        if entry == -1:
            wildcards += 1
        elif not (
            _is_size_of(editor, entry, x, i) or (i > 0 and type(entry) is int and entry == recorded[i])
        ):
            return False
    return wildcards <= 1


def remove_identities(dag: DagModule, *, inference: bool = True) -> DagModule:
    """Drop vertices that return their input: Identity, contiguous/clone, flatten over one dimension,
    reshapes to the input's own shape, and (with `inference=True`, the default) dropout, which is the
    identity in eval mode."""
    editor = Editor(dag)
    for vertex in editor:
        if _is_identity(vertex, editor, inference):
            source = first_input(vertex)
            if source is not None:
                editor.remove(vertex.name, replacement=source)
    editor.remove_dead()
    return editor.build()


def remove_dead(dag: DagModule) -> DagModule:
    """Drop vertices whose output nothing reads (guards and asserts stay)."""
    editor = Editor(dag)
    editor.remove_dead()
    return editor.build()


def dedupe_constants(dag: DagModule) -> DagModule:
    """Merge Constant vertices holding equal tensors (same dtype, shape and values) into one."""
    editor = Editor(dag)
    kept: list[tuple[torch.Tensor, str]] = []
    for vertex in editor:
        if not isinstance(vertex.module, Constant):
            continue
        value = vertex.module.value
        same = next(
            (
                name
                for other, name in kept
                if other.dtype == value.dtype
                and other.shape == value.shape
                and other.device == value.device
                and torch.equal(other, value)
            ),
            None,
        )
        if same is None:
            kept.append((value, vertex.name))
        else:
            editor.remove(vertex.name, replacement=same)
    return editor.build()


def remove_vertices(dag: DagModule, names: Iterable[str]) -> DagModule:
    """Drop the named single-input vertices, wiring their readers to their input (the caller vouches
    that each is shape-preserving where it matters; `verify` still runs)."""
    editor = Editor(dag)
    for name in names:
        if name not in editor.vertices:
            raise DagError(f"no vertex named {name!r}")
        source = first_input(editor[name])
        if source is None:
            raise DagError(f"vertex {name!r} ({editor[name].op}) has no tensor input to pass through")
        editor.remove(name, replacement=source)
    return editor.build()
