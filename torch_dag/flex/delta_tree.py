"""Level deltas of hand-written flexible models (a `td.flex.Module`: a layer, or a user's class holding
td.flex layers), made and applied with the machinery of flexible DAGs.

The flexible layers of the model are laid side by side as the vertices of a *shadow* DAG (one vertex per
layer, named from its path, all reading one input); its level deltas are the model's, since everything
outside the flexible layers is the same at every level. Applying one to a plain copy of the model lays
the plain copy's layers at the same paths out the same way, moves that DAG, and puts the layers it
rebuilt back at their paths. A vertex name is the layer's path with `_` written `_u` and `.` written
`_d` (so no two paths share a name), after `at_`.
"""

from __future__ import annotations

from typing import Any, cast

from torch import nn

from ..core.dag import DagModule, Vertex
from ..core.errors import DagError
from ..core.template import Ref
from ..serde.format import graph_and_tensors
from .base import Module, submodule
from .delta_level import LevelDelta, apply_deltas, level_deltas
from .model import FlexDagModule

_PREFIX = "at_"


def layer_vertex(path: str) -> str:
    """The shadow vertex of the layer at `path`."""
    return _PREFIX + path.replace("_", "_u").replace(".", "_d")


def layer_path(name: str) -> str:
    """The path of the layer of shadow vertex `name` (`layer_vertex` undone)."""
    if not name.startswith(_PREFIX):
        raise DagError(f"{name!r} is not a layer of a hand-written flexible model's level delta")
    out, chars, i = [], name[len(_PREFIX) :], 0
    while i < len(chars):
        if chars[i] == "_" and i + 1 < len(chars) and chars[i + 1] in "ud":
            out.append("_" if chars[i + 1] == "u" else ".")
            i += 2
        else:
            out.append(chars[i])
            i += 1
    return "".join(out)


def shadow_flex(model: Module) -> FlexDagModule:
    """The flexible layers of `model` as the vertices of a FlexDagModule (the layers themselves, shared),
    at the model's level in use."""
    level = model.current_level()
    if level is None:
        raise DagError(
            f"{type(model).__name__}: level deltas join levels, and its td.flex layers are not all at one "
            "level: set_level_use(i) first"
        )
    vertices = [Vertex(layer_vertex(path), leaf, (Ref("x"),), {}) for path, leaf in model.flex_leaves()]
    return FlexDagModule(["x"], vertices, [Ref(v.name) for v in vertices])


def module_level_delta(model: Module) -> tuple[LevelDelta | None, LevelDelta | None]:
    """`export_level_delta` of a hand-written flexible model."""
    down, up = shadow_flex(model).export_level_delta()
    for delta in (down, up):
        if delta is not None:
            delta.tree = True
    return down, up


def module_deltas(model: Module) -> dict[tuple[int, int], LevelDelta]:
    """Every neighbour delta of a hand-written flexible model (its level in use kept)."""
    shadow = shadow_flex(model)
    start = shadow.current_level()
    deltas: dict[tuple[int, int], LevelDelta] = {}
    try:
        for level in range(shadow.max_level() + 1):
            deltas.update(level_deltas(shadow, level))
    finally:
        model.set_level_use(cast(int, start))  # checked by shadow_flex
    for delta in deltas.values():
        delta.tree = True
    return deltas


def apply_to_tree(plain: nn.Module, deltas: list[LevelDelta]) -> None:
    """Move the plain copy of a hand-written flexible model in place through `deltas` (each from the
    level the previous one reached). On an error `plain` stays as it was."""
    if isinstance(plain, DagModule):
        raise DagError(
            "this delta is of a hand-written flexible model: it moves that model's plain copies "
            "(make_base_copy()), not a DagModule"
        )
    names: dict[str, None] = {}  # in order, each once
    for delta in deltas:
        names.update(dict.fromkeys(key.split(".", 2)[1] for key in delta.source_shapes))
        names.update(dict.fromkeys(delta.graph["vertices"]))
    paths = {name: layer_path(name) for name in names}
    layers = {name: submodule(plain, path, "model") for name, path in paths.items()}
    shadow = DagModule(
        ["x"], [Vertex(n, m, (Ref("x"),), {}) for n, m in layers.items()], [Ref(n) for n in layers]
    )
    try:
        apply_deltas(shadow, deltas, graph_and_tensors(shadow)[0])
    except DagError as error:
        message = str(error)
        for name, path in paths.items():
            message = message.replace(f"vertex_modules.{name}.", f"{path}." if path else "")
            message = message.replace(repr(name), repr(path))
        raise DagError(message) from None
    for name, path in paths.items():
        module = shadow[name].module
        if module is not layers[name]:
            module.train(layers[name].training)
            _put(plain, path, module)


def _put(plain: nn.Module, path: str, module: nn.Module) -> None:
    """Place `module` at `path` of `plain` (the root itself: it takes over the new module's state)."""
    if not path:
        state: dict[str, Any] = dict(module.__dict__)
        plain.__dict__.clear()
        plain.__dict__.update(state)
        return
    parent, _, name = path.rpartition(".")
    setattr(plain.get_submodule(parent) if parent else plain, name, module)
