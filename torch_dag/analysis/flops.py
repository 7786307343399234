"""FLOPs, parameters and kmapp of a DagModule, per vertex and in total.

FLOPs follow fvcore's convention (one multiply-add is one FLOP; element-wise ops are free) so
that totals agree with `fvcore.nn.FlopCountAnalysis`; one rule per op, in a table keyed by op
name. fvcore does not count `scaled_dot_product_attention`; we do (its two matmuls), and say so.
Every op of the vocabulary has a rule or a reason to cost nothing (`no_flops_reason`, tested).
kmapp is FLOPs per input pixel / 1000, per sample.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..core.dag import DagModule, Vertex
from ..core.functions import FUNCTIONS
from ..core.lowrank import LowRankConv2d, LowRankLinear
from ..core.ops import CUSTOM_OPS, LayerProxy, is_dag_module, op_name
from ..core.template import map_refs
from ..core.traits import Trait, ops_with, traits_of

FlopRule = Callable[[Vertex, tuple, dict, Any], int]


def _numel(shape: Any) -> int:
    return math.prod(shape)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape)


def _conv(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    module = vertex.module
    weight_shape = _shape(module.weight) if isinstance(module, nn.Module) else _shape(args[1])
    x = args[0]
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    batch = x.shape[0] if x.dim() == len(weight_shape) else 1
    spatial = _shape(x)[-(len(weight_shape) - 2) :] if transposed else _shape(out)[-(len(weight_shape) - 2) :]
    return batch * _numel(weight_shape) * _numel(spatial)


def _conv_function(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    x, weight = args[0], args[1]
    batch = x.shape[0] if x.dim() == weight.dim() else 1
    return batch * _numel(weight.shape) * _numel(out.shape[2:] if x.dim() == weight.dim() else out.shape[1:])


def _linear(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    out_features = vertex.module.out_features if isinstance(vertex.module, nn.Linear) else args[1].shape[0]
    return _numel(args[0].shape) * out_features


def _matmul(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    a, b = args[0], args[1]
    if a.dim() == 1 or b.dim() == 1:
        return _numel(a.shape) * (b.shape[-1] if b.dim() > 1 else 1)
    return _numel(a.shape) * b.shape[-1]


def _addmm(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    return _numel(args[1].shape) * args[2].shape[-1]


def _einsum(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    equation, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    equation = equation.replace(" ", "")
    letters = dict.fromkeys(c for c in equation if c.isalpha())
    equation = equation.translate({ord(c): 97 + i for i, c in enumerate(letters)})
    shapes = [_shape(t) for t in operands]
    if equation == "abc,abd->acd":
        return shapes[0][0] * shapes[0][1] * shapes[0][2] * shapes[-1][-1]
    if equation == "abc,adc->adb":
        return shapes[0][0] * shapes[0][1] * shapes[0][2] * shapes[-1][1]
    path = np.einsum_path(equation, *[np.zeros(s) for s in shapes], optimize="optimal")[1]
    for line in path.split("\n"):
        if "optimized flop" in line.lower():
            return round(float(line.split(":")[-1]) / 2)  # fvcore counts a multiply-add once
    raise AssertionError("numpy einsum_path gave no flop count")


def _batch_norm(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    module = vertex.module
    training = module.training or not module.track_running_stats
    if training:
        return _numel(args[0].shape) * (5 if module.affine else 4)
    return _numel(args[0].shape) * (2 if module.affine else 1)


def _norm(affine_attr: str) -> FlopRule:
    def rule(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
        affine = bool(getattr(vertex.module, affine_attr, False))
        return _numel(args[0].shape) * (5 if affine else 4)

    return rule


def _input_numel(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    return _numel(args[0].shape)


def _interpolate(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    """fvcore counts 2-d nearest (1 per output) and bilinear (4 per output) upsampling only."""
    mode = args[3] if len(args) > 3 else kwargs.get("mode", "nearest")
    if out.dim() != 4:
        return 0
    return _numel(out.shape) * {"nearest": 1, "bilinear": 4}.get(mode, 0)


def _batch_norm_function(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    training = args[5] if len(args) > 5 else kwargs.get("training", False)
    affine = len(args) > 3 and args[3] is not None
    if training:
        return _numel(args[0].shape) * (5 if affine else 4)
    return _numel(args[0].shape) * (2 if affine else 1)


def _norm_function(affine_index: int) -> FlopRule:
    def rule(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
        affine = len(args) > affine_index and args[affine_index] is not None
        return _numel(args[0].shape) * (5 if affine else 4)

    return rule


def _output_numel(scale: int) -> FlopRule:
    return lambda vertex, args, kwargs, out: _numel(out.shape) * scale


def _conv_transpose_function(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    x, weight = args[0], args[1]
    return x.shape[0] * _numel(weight.shape) * _numel(x.shape[2:])


def _sdpa(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    query, key, value = args[:3]
    *batch, length, head_dim = _shape(query)
    source = key.shape[-2]
    return _numel(batch) * length * source * (head_dim + value.shape[-1])


def _multihead_attention(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    module = cast(nn.MultiheadAttention, vertex.module)
    query, key = args[0], args[1]
    batch_first = module.batch_first and query.dim() == 3
    length = query.shape[1] if batch_first else query.shape[0]
    source = key.shape[1] if batch_first else key.shape[0]
    batch = query.shape[0 if batch_first else 1] if query.dim() == 3 else 1
    embed = module.embed_dim
    projections = batch * (length * embed * embed + source * (module.kdim + module.vdim) * embed)
    return projections + batch * length * embed * embed + 2 * batch * length * source * embed


def _multi_head_attention_forward(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    """`F.multi_head_attention_forward` (sequence first): as `_multihead_attention`, widths from its weights."""
    query, key = args[0], args[1]
    embed = query.shape[-1]
    batch = query.shape[1] if query.dim() == 3 else 1
    length, source = query.shape[0], key.shape[0]
    projections = batch * (2 * length * embed * embed + source * (key.shape[-1] + args[2].shape[-1]) * embed)
    return projections + 2 * batch * length * source * embed


def _ws_conv2d(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    """The conv, and the batch_norm that standardizes its weight (as counted where written functionally)."""
    weight = vertex.module.weight
    return _conv(vertex, args, kwargs, out) + _numel(weight.shape) * (
        5 if vertex.module.gain is not None else 4
    )


def _low_rank_linear(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    module = cast(LowRankLinear, vertex.module)
    rows = _numel(args[0].shape) // module.in_features
    return rows * module.rank * (module.in_features + module.out_features)


def _low_rank_conv2d(vertex: Vertex, args: tuple, kwargs: dict, out: Any) -> int:
    module = cast(LowRankConv2d, vertex.module)
    batch = args[0].shape[0] if args[0].dim() == 4 else 1
    per_position = module.rank * (_numel(module.down.shape[1:]) + module.out_channels)
    return batch * _numel(out.shape[-2:]) * per_position


def _module_ops(trait: Trait) -> list[str]:
    """The module ops (not function ops) registered with `trait` so far."""
    return sorted(op for op in ops_with(trait) if op not in FUNCTIONS)


def _function_ops(trait: Trait) -> list[str]:
    return sorted(op for op in ops_with(trait) if op in FUNCTIONS)


# op -> its rule; an op registered later adds its own entry (or a reason in WITHOUT_FLOP_RULE)
FLOP_RULES: dict[str, FlopRule] = {
    **dict.fromkeys(_module_ops(Trait.CONV), _conv),
    "ConvTranspose1d": _conv,
    "ConvTranspose2d": _conv,
    "ConvTranspose3d": _conv,
    **dict.fromkeys(_function_ops(Trait.CONV), _conv_function),
    # not CONV ops: a transposed convolution's weight reads (in, out / groups, *kernel)
    "conv_transpose1d": _conv_transpose_function,
    "conv_transpose2d": _conv_transpose_function,
    "conv_transpose3d": _conv_transpose_function,
    **dict.fromkeys(_module_ops(Trait.LINEAR) + _function_ops(Trait.LINEAR), _linear),
    "matmul": _matmul,
    "addmm": _addmm,
    "einsum": _einsum,
    **dict.fromkeys(_module_ops(Trait.BATCH_NORM), _batch_norm),
    "LayerNorm": _norm("elementwise_affine"),
    "GroupNorm": _norm("affine"),
    "InstanceNorm1d": _norm("affine"),
    "InstanceNorm2d": _norm("affine"),
    "InstanceNorm3d": _norm("affine"),
    "batch_norm": _batch_norm_function,
    "layer_norm": _norm_function(2),
    "group_norm": _norm_function(2),
    "instance_norm": _norm_function(3),
    "AdaptiveAvgPool2d": _input_numel,
    "adaptive_avg_pool2d": _input_numel,
    "interpolate": _interpolate,
    "grid_sample": _output_numel(4),
    "scaled_dot_product_attention": _sdpa,
    "multi_head_attention_forward": _multi_head_attention_forward,
    "MultiheadAttention": _multihead_attention,
    "LowRankLinear": _low_rank_linear,
    "LowRankConv2d": _low_rank_conv2d,
    "WSConv2d": _ws_conv2d,
}

# traits whose ops cost no FLOPs: they compute nothing, or only element-wise work (free for fvcore)
FREE_TRAITS: dict[Trait, str] = {
    Trait.VIEW: "a view computes nothing",
    Trait.METADATA: "reads only shapes and dtypes",
    Trait.FACTORY: "makes a tensor without arithmetic on its inputs",
    Trait.SIDE_EFFECT: "a check, not arithmetic",
    Trait.IDENTITY: "returns its input",
    Trait.DROPOUT: "the identity in inference",
    Trait.ELEMENTWISE: "element-wise ops are free (fvcore's convention)",
    Trait.ACTIVATION: "activations are element-wise, free (fvcore's convention)",
}

# reason -> the other ops deliberately without a rule (they count 0 FLOPs, as in fvcore)
_UNCOUNTED = {
    "fvcore counts no pooling but adaptive_avg_pool2d and 2-d upsampling": (
        "MaxPool1d MaxPool2d MaxPool3d AvgPool1d AvgPool2d AvgPool3d AdaptiveAvgPool1d AdaptiveAvgPool3d "
        "AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d LPPool1d LPPool2d max_pool1d max_pool2d "
        "max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool3d "
        "adaptive_max_pool1d adaptive_max_pool2d lp_pool2d"
    ),
    "fvcore counts no reductions, scans or softmax": (
        "all any amax amin argmax argmin count_nonzero logsumexp max min mean median norm vector_norm prod std std_mean "
        "sum var var_mean cumsum cumprod trace Softmax LogSoftmax Softmax2d softmax log_softmax"
    ),
    "fvcore counts only batch, group, layer and instance norms": (
        "LocalResponseNorm RMSNorm local_response_norm normalize rms_norm weight_norm"
    ),
    "fvcore counts only matmul, mm, bmm, addmm, einsum, linear and convolutions": (
        "addbmm baddbmm kron outer Bilinear bilinear cdist dist pairwise_distance cosine_similarity cross "
        "LSTM GRU RNN affine_grid"
    ),
    "moves, selects, sorts or converts values without arithmetic": (
        "cat stack repeat repeat_interleave tile flip roll pad gather scatter index_select index_put "
        "masked_select take_along_dim tril triu diag diff one_hot meshgrid to type_as sort argsort topk "
        "unique nonzero searchsorted bucketize Embedding embedding Fold Unfold fold unfold PixelShuffle "
        "PixelUnshuffle ChannelShuffle pixel_shuffle pixel_unshuffle channel_shuffle"
    ),
    "arithmetic on Python sizes, not tensors": "size_ceil size_floor size_max size_min",
    "a nested DAG: its own vertices are counted": "DagModule",
}
WITHOUT_FLOP_RULE: dict[str, str] = {op: why for why, ops in _UNCOUNTED.items() for op in ops.split()}


def no_flops_reason(op: str) -> str | None:
    """Why op `op` deliberately has no FLOP rule (so counts 0), or None when it has or needs one."""
    if op in FLOP_RULES:
        return None
    traits = traits_of(op)
    free = next((why for trait, why in FREE_TRAITS.items() if trait in traits), None)
    if free is not None:
        return free
    if op in CUSTOM_OPS and issubclass(CUSTOM_OPS[op].cls, LayerProxy):
        return "a layer proxy: counted as the layer it computes"
    return WITHOUT_FLOP_RULE.get(op)


@dataclass
class FlopReport:
    """Per-vertex and total FLOPs and parameters of one DagModule on given inputs."""

    flops: dict[str, int]
    params: dict[str, int]
    ops: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    pixels: int | None  # input pixels per sample (H*W of the first image input)
    batch: int
    nested: dict[str, FlopReport] = field(default_factory=dict)

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def kmapp(self) -> float | None:
        if not self.pixels:
            return None
        return self.total_flops / self.batch / self.pixels / 1000

    def op_histogram(self) -> collections.Counter[str]:
        return collections.Counter(self.ops.values())

    def table(self, top: int = 15) -> str:
        """A readable summary: totals, the op histogram and the heaviest vertices."""
        kmapp = f"{self.kmapp:.2f}" if self.kmapp is not None else "n/a (no image input)"
        lines = [
            f"vertices: {len(self.ops)}   params: {self.total_params / 1e6:.3f} M   "
            f"FLOPs: {self.total_flops / 1e9:.3f} G (batch {self.batch})   kmapp: {kmapp}",
            "ops: " + ", ".join(f"{op} x{n}" for op, n in self.op_histogram().most_common()),
            f"top {top} vertices by FLOPs:",
            f"  {'vertex':40s} {'op':22s} {'output shape':22s} {'GFLOPs':>9s} {'share':>6s}",
        ]
        total = max(1, self.total_flops)
        for name, flops in sorted(self.flops.items(), key=lambda kv: -kv[1])[:top]:
            shape = "x".join(map(str, self.shapes.get(name, ()))) or "-"
            lines.append(
                f"  {name[:40]:40s} {self.ops[name][:22]:22s} {shape[:22]:22s} "
                f"{flops / 1e9:9.4f} {100 * flops / total:5.1f}%"
            )
        return "\n".join(lines)


def count_flops(dag: DagModule, *inputs: Any, **kwargs: Any) -> FlopReport:
    """Run `dag` on `inputs` once (no grad) and count FLOPs and parameters per vertex."""
    with torch.no_grad():
        values = dag.run_collecting(*inputs, **kwargs)
    return flops_from_values(dag, values, inputs)


def flops_from_values(dag: DagModule, values: dict[str, Any], inputs: tuple) -> FlopReport:
    """`count_flops` from the values of a run already made (`dag.run_collecting(*inputs)`)."""
    report = FlopReport({}, {}, {}, {}, _pixels(inputs), _batch(inputs))
    seen_params: set[int] = set()
    for vertex in dag:
        args = map_refs(vertex.args, lambda r: values[r.name])
        kw = map_refs(vertex.kwargs, lambda r: values[r.name])
        out = values[vertex.name]
        report.ops[vertex.name] = vertex.op
        if isinstance(out, torch.Tensor):
            report.shapes[vertex.name] = tuple(out.shape)
        # a layer proxy is counted as the layer it is at the width (or choice) in use
        layer = vertex.module.current_layer() if isinstance(vertex.module, LayerProxy) else vertex.module
        if is_dag_module(layer):
            nested = count_flops(layer, *args, **kw)
            report.nested[vertex.name] = nested
            report.flops[vertex.name] = nested.total_flops
            if layer is not vertex.module:
                report.ops[vertex.name] = f"{vertex.op}(DagModule)"
            if not any(id(p) in seen_params for p in vertex.module.parameters()):
                # the nested report counts what runs (a layer proxy inside: the layer in use)
                report.params[vertex.name] = nested.total_params
                seen_params.update(id(p) for p in vertex.module.parameters())
                seen_params.add(id(vertex.module))
                continue
        elif layer is not vertex.module:
            report.ops[vertex.name] = f"{vertex.op}({op_name(layer)})"
            rule = FLOP_RULES.get(op_name(layer))
            report.flops[vertex.name] = int(rule(replace(vertex, module=layer), args, kw, out)) if rule else 0
        else:
            rule = FLOP_RULES.get(vertex.op)
            report.flops[vertex.name] = int(rule(vertex, args, kw, out)) if rule else 0
        report.params[vertex.name] = _new_params(vertex.module, seen_params)
    return report


def _new_params(module: nn.Module, seen: set[int]) -> int:
    """Parameters of `module` not counted yet (a layer proxy: those the layer in use reads)."""
    if id(module) in seen:
        return 0
    if isinstance(module, LayerProxy):
        seen.add(id(module))
        layer = module.current_layer()
        if not module._parameters:  # a proxy that holds whole layers (a mutable): the one in use's
            return _new_params(layer, seen)
        return sum(getattr(layer, n).numel() for n, p in module._parameters.items() if p is not None)
    fresh = [p for p in module.parameters() if id(p) not in seen]
    seen.update(id(p) for p in fresh)
    return sum(p.numel() for p in fresh)


def _first_tensor(inputs: tuple) -> torch.Tensor | None:
    return next((x for x in inputs if isinstance(x, torch.Tensor)), None)


def _pixels(inputs: tuple) -> int | None:
    x = _first_tensor(inputs)
    if x is None or x.dim() < 3 or not x.is_floating_point():
        return None
    return _numel(x.shape[2:])


def _batch(inputs: tuple) -> int:
    x = _first_tensor(inputs)
    return x.shape[0] if x is not None and x.dim() > 0 else 1
