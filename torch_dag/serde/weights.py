"""Giving a built DAG its stored tensors: ties and frozen parameters restored, shapes and dtypes checked."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.dag import DagModule
from .schema import expect


def load_weights(dag: DagModule, tensors: dict[str, torch.Tensor], graph: dict[str, Any], path: str) -> None:
    for key, tensor in stored_weights(dag.state_dict(keep_vars=True), tensors, graph, path).items():
        assign(dag, key, tensor)


def stored_weights(
    expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], graph: dict[str, Any], path: str
) -> dict[str, torch.Tensor]:
    """The tensor (a Parameter where `expected` has one) for each state key of a model whose state is
    shaped like `expected`, from the stored `tensors` and the graph's ties and frozen keys, all checked."""
    tied, frozen = graph.get("tied", {}), graph.get("frozen", [])
    expect(
        isinstance(tied, dict) and all(isinstance(v, str) and v in tensors for v in tied.values()),
        f"{path}: 'tied' must map names to stored tensors",
    )
    expect(isinstance(frozen, list) and all(isinstance(k, str) for k in frozen), f"{path}: bad 'frozen'")
    stored = set(tensors) | set(tied)
    missing, unexpected = sorted(set(expected) - stored), sorted(stored - set(expected))
    expect(not missing, f"{path}: weights missing for {missing[:5]}")
    expect(not unexpected, f"{path}: unexpected weights {unexpected[:5]}")
    for key, like in expected.items():
        source = tied.get(key, key)
        tensor = tensors[source]
        expect(
            tensor.shape == like.shape and tensor.dtype == like.dtype,
            f"{path}: {key} is stored as {tuple(tensor.shape)} {tensor.dtype}, "
            f"the graph needs {tuple(like.shape)} {like.dtype}",
        )
        expect(
            isinstance(like, nn.Parameter) == isinstance(expected.get(source), nn.Parameter),
            f"{path}: {key} is tied to {source!r}, but one is a parameter and the other a buffer",
        )
    objects: dict[str, torch.Tensor] = {}
    for key, like in expected.items():
        source = tied.get(key, key)
        if source not in objects:
            tensor = tensors[source]
            if isinstance(like, nn.Parameter):
                tensor = nn.Parameter(tensor, requires_grad=key not in frozen and like.requires_grad)
            objects[source] = tensor
        objects[key] = objects[source]
    return {key: objects[key] for key in expected}


def assign(dag: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_path, _, attr = key.rpartition(".")
    module = dag.get_submodule(module_path)
    if isinstance(tensor, nn.Parameter):
        module._parameters[attr] = tensor
    else:
        module._buffers[attr] = tensor
