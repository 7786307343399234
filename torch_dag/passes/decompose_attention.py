"""`decompose_attention`: each `nn.MultiheadAttention` vertex rewritten into the vocabulary's atomic ops
(Linear q / k / v, heads split by a reshape, scaled_dot_product_attention, heads merged, Linear out),
so that channel rules see its heads and head dims and pruning can narrow it: a narrower
MultiheadAttention cannot stay one module, its inner width being its `embed_dim`.

The atomic form is an equivalent module (`AtomicAttention`) converted with the vertex's own inputs
and inlined. It keeps batch_first either way, unbatched inputs, biases or none, separate `kdim` /
`vdim` projections, `attn_mask` (bool or float, 2-D or per head) and `key_padding_mask`, and the
attention weights (averaged over heads or not) where the DAG reads them; the weights, or a dropout
on them, take the explicit softmax path (matmul, softmax, Dropout, matmul) instead of the fused call.
`add_bias_kv` and `add_zero_attn` are refused (`strict`) or left as they are."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from ..converters import build_from_unstructured_module
from ..core.dag import DagModule, Vertex
from ..core.editor import Editor
from ..core.errors import DagError
from ..core.template import Ref
from .hierarchy import flatten

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_MASKS = ("key_padding_mask", "attn_mask")


class AtomicAttention(nn.Module):
    """nn.MultiheadAttention's computation in atomic ops, for one call (`weights`: return the attention
    weights, averaged over heads with `average`; `batched`: inputs with a batch axis)."""

    def __init__(
        self, mha: nn.MultiheadAttention, layers: nn.ModuleList, weights: bool, average: bool, batched: bool
    ):
        super().__init__()
        self.q, self.k, self.v, self.out = layers  # shared by every call of one module
        self.heads, self.head_dim = mha.num_heads, mha.embed_dim // mha.num_heads
        self.batch_first = mha.batch_first
        self.weights, self.average, self.batched = weights, average, batched
        self.dropout = nn.Dropout(mha.dropout) if mha.dropout > 0 else None
        self.train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None):
        if not self.batched:  # one sequence: a batch of one
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, length, source = query.shape[0], query.shape[1], key.shape[1]
        q = self.q(query).reshape(batch, length, self.heads, -1).transpose(1, 2)
        k = self.k(key).reshape(batch, source, self.heads, -1).transpose(1, 2)
        v = self.v(value).reshape(batch, source, self.heads, -1).transpose(1, 2)
        mask = _mask(attn_mask, key_padding_mask, q, (batch, length, source), self.batched)
        if self.weights or self.dropout is not None:
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            attention = (scores if mask is None else scores + mask).softmax(-1)
            out = (self.dropout(attention) if self.dropout is not None else attention) @ v
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out(out.transpose(1, 2).reshape(batch, length, -1))
        if not self.batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not self.weights:
            return out, None
        weights = attention.mean(1) if self.average else attention
        return out, weights if self.batched else weights.squeeze(0)


def projections(mha: nn.MultiheadAttention) -> nn.ModuleList:
    """New Linear layers q, k, v and out with `mha`'s weights (copied: the input DAG stays untouched)."""
    bias = mha.in_proj_bias
    if mha.in_proj_weight is not None:
        sources = list(mha.in_proj_weight.chunk(3))
    else:
        sources = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]
    biases = list(bias.chunk(3)) if bias is not None else [None, None, None]
    layers = [_linear(w, b) for w, b in zip(sources, biases)]
    return nn.ModuleList([*layers, _linear(mha.out_proj.weight, mha.out_proj.bias)])


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None and layer.bias is not None:
            layer.bias.copy_(bias)
    return layer


def _mask(attn_mask, key_padding_mask, like, sizes, batched):
    """One float mask added to the scores: -inf where a bool mask is True, float masks as given; a
    per-head attn_mask (batch * heads, L, S) split into (batch, heads, L, S); key_padding_mask over
    the keys of each sample."""
    batch, length, source = sizes
    mask = None
    if attn_mask is not None:
        mask = _as_float(attn_mask, like)
        if mask.dim() == 3:
            mask = mask.reshape(batch, -1, length, source)
    if key_padding_mask is not None:
        padding = _as_float(key_padding_mask, like)
        padding = padding.reshape(batch, 1, 1, source) if batched else padding.reshape(1, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask


def _as_float(mask, like):
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, -math.inf)
    return mask.to(like.dtype)


def decompose_attention(
    dag: DagModule, example_inputs: Iterable | torch.Tensor | None = None, *, strict: bool = True
) -> DagModule:
    """Every nn.MultiheadAttention vertex of `dag` rewritten into atomic vertices named
    `<vertex>_<part>` (`_q`, `_k`, `_v`, `_out` the projections; `meta["decomposed_from"]` the vertex)
    with outputs equal to its own.
    `example_inputs` (default: random inputs of the converted shapes) give each call's shapes.
    A vertex whose module has `add_bias_kv` or `add_zero_attn` raises with `strict`, else stays as it is
    (its channels then stay fixed). The input DAG is untouched; the result is flat."""
    found = [v for v in dag if isinstance(v.module, nn.MultiheadAttention)]
    if not found:
        return dag
    reasons = {v.name: why for v in found if (why := why_not_decomposed(v)) is not None}
    if reasons and strict:
        raise DagError(
            "decompose_attention: "
            + "; ".join(f"vertex {name!r} (MultiheadAttention) {why}" for name, why in reasons.items())
            + "; pass strict=False to leave such vertices as they are (their channels stay fixed)"
        )
    if example_inputs is None:
        example_inputs = dag.example_inputs()
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with torch.no_grad():
        values = dag.run_collecting(*inputs)
    editor = Editor(dag)
    users = dag.successors()
    layers: dict[int, nn.ModuleList] = {}  # one set of projections per module, however often it is called
    for vertex in found:
        if vertex.name not in reasons:
            if id(vertex.module) not in layers:
                layers[id(vertex.module)] = projections(cast(nn.MultiheadAttention, vertex.module))
            reads = _reads_weights(dag, users[vertex.name])
            _replace(editor, vertex, values, layers[id(vertex.module)], reads)
    return flatten(editor.build())


def why_not_decomposed(vertex: Vertex) -> str | None:
    """Why a MultiheadAttention vertex has no atomic form here, or None when it has one."""
    module = cast(nn.MultiheadAttention, vertex.module)
    if module.bias_k is not None or module.add_zero_attn:
        return "uses add_bias_kv or add_zero_attn, which have no atomic form here"
    call = _SIGNATURE.bind(None, *vertex.args, **vertex.kwargs).arguments
    flags = [n for n in ("need_weights", "average_attn_weights", "is_causal") if isinstance(call.get(n), Ref)]
    if flags:
        return f"takes {', '.join(flags)} from another vertex: the atomic form needs them as constants"
    return None


def _reads_weights(dag: DagModule, users: list[str]) -> bool:
    """Whether anything reads the vertex's second output (the attention weights)."""
    return any(u == "<output>" or dag[u].op != "getitem" or dag[u].args[1] != 0 for u in users)


def _replace(
    editor: Editor, vertex: Vertex, values: dict[str, Any], layers: nn.ModuleList, reads_weights: bool
) -> None:
    """Swap the vertex's module for the converted atomic form (a nested DAG that `flatten` inlines)."""
    bound = _SIGNATURE.bind(None, *vertex.args, **vertex.kwargs)
    bound.apply_defaults()
    call = dict(bound.arguments)

    def value(template: Any) -> Any:
        return values[template.name] if isinstance(template, Ref) else template

    given = {name: call[name] for name in _MASKS if call[name] is not None}
    query = value(call["query"])
    weights = bool(value(call["need_weights"])) and reads_weights
    average = bool(value(call["average_attn_weights"]))
    mha = cast(nn.MultiheadAttention, vertex.module)
    module = AtomicAttention(mha, layers, weights, average, query.dim() == 3)
    atomic = build_from_unstructured_module(
        module,
        tuple(value(call[n]) for n in ("query", "key", "value")),
        {name: value(mask) for name, mask in given.items()},
    )
    refs = {"query": call["query"], "key": call["key"], "value": call["value"], **given}
    missing = [n for n in atomic.input_names if n not in refs]
    if missing:
        raise DagError(f"vertex {vertex.name!r} (MultiheadAttention): its atomic form reads {missing}")
    path = vertex.meta.get("module_path")
    for inner in atomic:  # where each part came from: the module path, and the vertex it replaces
        inner.meta["decomposed_from"] = vertex.name
        if path is not None:
            inner.meta["module_path"] = ".".join(p for p in (path, inner.meta.get("module_path")) if p)
    editor.vertices[vertex.name] = Vertex(
        vertex.name, atomic, tuple(refs[n] for n in atomic.input_names), meta=dict(vertex.meta)
    )


__all__ = ["AtomicAttention", "decompose_attention", "why_not_decomposed"]
