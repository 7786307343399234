"""Functional layers on the model's own parameters -> vocabulary modules sharing them.

`F.conv2d(x, self.weight, self.bias, ...)` in a model's forward becomes a `Conv2d` vertex whose weight
and bias are the model's own tensors (so pruning and saving see a layer, not a function of two
parameters). `ABSORBERS` maps a function op to the rule that builds the module, or raises
`NotAbsorbable` when the call does not fit (then the call stays a function vertex).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.fx as fx
from torch import nn

from ..core.template import Ref, is_constant

if TYPE_CHECKING:
    from .fx_walk import Canonicalizer

_M = TypeVar("_M", bound=nn.Module)
Absorber = Callable[["Canonicalizer", tuple, fx.Node], tuple[nn.Module, tuple]]


class NotAbsorbable(Exception):
    """The call does not read the model's own tensors as a layer would: it stays a function vertex."""


def _attr(c: Canonicalizer, arg: Any, *, parameter: bool = True) -> torch.Tensor | None:
    """The model tensor an argument reads directly (None for None); anything else is not absorbable."""
    if arg is None:
        return None
    if isinstance(arg, Ref) and arg.name in c.attr_of:
        tensor = c.attr_of[arg.name][1]
        if not parameter or isinstance(tensor, nn.Parameter):
            return tensor
    raise NotAbsorbable


def _constants(*values: Any) -> None:
    if not all(is_constant(v) for v in values):
        raise NotAbsorbable


def _meta_module(cls: type[_M], **config: Any) -> _M:
    with torch.device("meta"):
        return cls(**config)


def _share(module: _M, **tensors: torch.Tensor | None) -> _M:
    """`module` (built on the meta device) with the model's own tensors, in order (None: no bias)."""
    for name, tensor in tensors.items():
        setattr(module, name, tensor)
    return module


def _absorb_linear(c: Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    x, weight, bias = args
    weight, bias = _attr(c, weight), _attr(c, bias)
    if weight is None or weight.dim() != 2:
        raise NotAbsorbable
    module = _meta_module(
        nn.Linear, in_features=weight.shape[1], out_features=weight.shape[0], bias=bias is not None
    )
    return _share(module, weight=weight, bias=bias), (x,)


def _absorb_addmm(c: Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    """`torch.addmm(bias, x, weight)` on the model's own (in, out) weight, a linear layer written as a
    matrix product (GPT-2's Conv1D) -> a `Linear` vertex. Its weight is a transposed copy, made once per
    source weight so that a weight used twice stays shared in the DAG (not with the source model)."""
    bias, x, weight = args
    bias, weight = _attr(c, bias), _attr(c, weight)
    if weight is None or weight.dim() != 2 or bias is None or tuple(bias.shape) != (weight.shape[1],):
        raise NotAbsorbable
    if id(weight) not in c.transposed:
        c.transposed[id(weight)] = nn.Parameter(weight.detach().t().contiguous(), weight.requires_grad)
    module = _meta_module(nn.Linear, in_features=weight.shape[0], out_features=weight.shape[1])
    return _share(module, weight=c.transposed[id(weight)], bias=bias), (x,)


def _transposed_weight(c: Canonicalizer, arg: Any) -> torch.Tensor:
    """The model's own 2-d parameter that `arg` reads transposed (`self.weight.T`, `.t()`,
    `.transpose(0, 1)`); anything else is not absorbable."""
    vertex = c.vertices.get(arg.name) if isinstance(arg, Ref) else None
    if vertex is None or not vertex.args:
        raise NotAbsorbable
    swaps: dict[str, list[tuple]] = {
        "t": [()],
        "permute": [((1, 0),)],
        "transpose": [(0, 1), (1, 0), (-1, -2), (-2, -1)],
    }
    if vertex.op not in swaps or tuple(vertex.args[1:]) not in swaps[vertex.op] or vertex.kwargs:
        raise NotAbsorbable
    weight = _attr(c, vertex.args[0])
    if weight is None or weight.dim() != 2:
        raise NotAbsorbable
    return weight


def _absorb_matmul(c: Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    """`x @ self.weight.T` (a Linear subclass with its own forward, Falcon's): a `Linear` vertex
    without bias sharing the weight (a bias added after it stays an `add`, sliced with the channels)."""
    x, other = args
    weight = _transposed_weight(c, other)
    module = _meta_module(nn.Linear, in_features=weight.shape[1], out_features=weight.shape[0], bias=False)
    return _share(module, weight=weight), (x,)


def _absorb_conv(cls: type[nn.Module]) -> Absorber:
    def absorb(c: Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
        x, weight, bias, stride, padding, dilation, groups = args
        weight, bias = _attr(c, weight), _attr(c, bias)
        _constants(stride, padding, dilation, groups)
        if weight is None:
            raise NotAbsorbable
        module = _meta_module(
            cls,
            in_channels=weight.shape[1] * groups,
            out_channels=weight.shape[0],
            kernel_size=tuple(weight.shape[2:]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias is not None,
        )
        return _share(module, weight=weight, bias=bias), (x,)

    return absorb


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _owner(root: nn.Module, qualname: str) -> nn.Module | None:
    """The module holding the tensor `qualname` (None when there is no such module)."""
    path = qualname.rsplit(".", 1)[0] if "." in qualname else ""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _absorb_batch_norm(c: Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    """An eval-mode `F.batch_norm` in a BatchNorm subclass's own forward, on its own tensors (timm's
    BatchNormAct2d): in training it would have used batch statistics, exactly as `nn.BatchNorm2d` does."""
    x, running_mean, running_var, weight, bias, training, _momentum, eps = args
    mean = _attr(c, running_mean, parameter=False)
    if mean is None or training is not False:
        raise NotAbsorbable
    owner_path = c.attr_of[running_mean.name][0].rpartition(".")[0]
    if owner_path != c.module_path(node):
        raise NotAbsorbable
    owner = _owner(c.root, c.attr_of[running_mean.name][0])
    if (
        not isinstance(owner, _BATCH_NORMS)
        or owner.running_mean is not mean
        or owner.running_var is not _attr(c, running_var, parameter=False)
    ):
        raise NotAbsorbable
    cls = next(k for k in _BATCH_NORMS if isinstance(owner, k))
    affine = owner.affine and _attr(c, weight) is owner.weight and _attr(c, bias) is owner.bias
    if not affine and (weight is not None or bias is not None):
        raise NotAbsorbable
    _constants(eps)
    module = _meta_module(
        cls,
        num_features=mean.shape[0],
        eps=eps,
        momentum=owner.momentum,
        affine=affine,
        track_running_stats=True,
    )
    if affine:
        _share(module, weight=owner.weight, bias=owner.bias)
    _share(
        module,
        running_mean=owner.running_mean,
        running_var=owner.running_var,
        num_batches_tracked=owner.num_batches_tracked,
    )
    return module, (x,)


def _absorb_layer_norm(c: Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    x, shape, weight, bias, eps = args
    weight, bias = _attr(c, weight), _attr(c, bias)
    _constants(shape, eps)
    module = _meta_module(
        nn.LayerNorm,
        normalized_shape=shape,
        eps=eps,
        elementwise_affine=weight is not None,
        bias=bias is not None,
    )
    if weight is None and bias is not None:
        raise NotAbsorbable
    return _share(module, weight=weight, bias=bias), (x,)


def _absorb_group_norm(c: Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    x, groups, weight, bias, eps = args
    weight, bias = _attr(c, weight), _attr(c, bias)
    _constants(groups, eps)
    if weight is None or bias is None:
        raise NotAbsorbable
    module = _meta_module(nn.GroupNorm, num_groups=groups, num_channels=weight.shape[0], eps=eps)
    return _share(module, weight=weight, bias=bias), (x,)


def _absorb_rms_norm(c: Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    x, shape, weight, eps = args
    weight = _attr(c, weight)
    _constants(shape, eps)
    module = _meta_module(nn.RMSNorm, normalized_shape=shape, eps=eps, elementwise_affine=weight is not None)
    return _share(module, weight=weight), (x,)


def _absorb_embedding(c: Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    ids, weight, *options = args
    weight = _attr(c, weight)
    padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse = (*options, None, None, 2.0, False, False)[
        :5
    ]
    if weight is None or weight.dim() != 2 or max_norm is not None:
        raise NotAbsorbable
    _constants(padding_idx, norm_type, scale_grad_by_freq, sparse)
    module = _meta_module(
        nn.Embedding,
        num_embeddings=weight.shape[0],
        embedding_dim=weight.shape[1],
        padding_idx=padding_idx,
        scale_grad_by_freq=scale_grad_by_freq,
        sparse=sparse,
    )
    return _share(module, weight=weight), (ids,)


def _absorb_multi_head_attention(c: Canonicalizer, args: tuple, node: fx.Node) -> tuple[nn.Module, tuple]:
    """`F.multi_head_attention_forward` on the model's own projection weights (packed q, k, v) ->
    a `MultiheadAttention` vertex (sequence first, as the function is) sharing them."""
    (query, key, value, embed_dim, num_heads, in_weight, in_bias, bias_k, bias_v, add_zero_attn, dropout) = (
        args[:11]
    )
    out_weight, out_bias, _training, key_padding_mask, need_weights, attn_mask, separate = args[11:18]
    *_separate_weights, static_k, static_v, average, is_causal = args[18:]
    _constants(embed_dim, num_heads, add_zero_attn, dropout, need_weights, separate, average, is_causal)
    if add_zero_attn or separate or any(a is not None for a in (bias_k, bias_v, static_k, static_v)):
        raise NotAbsorbable
    in_weight, in_bias = _attr(c, in_weight), _attr(c, in_bias)
    out_weight, out_bias = _attr(c, out_weight), _attr(c, out_bias)
    if in_weight is None or out_weight is None or (in_bias is None) != (out_bias is None):
        raise NotAbsorbable
    module = _meta_module(
        nn.MultiheadAttention,
        embed_dim=embed_dim,
        num_heads=num_heads,
        dropout=dropout,
        bias=in_bias is not None,
    )
    _share(module, in_proj_weight=in_weight, in_proj_bias=in_bias)
    _share(module.out_proj, weight=out_weight, bias=out_bias)
    return module, (query, key, value, key_padding_mask, need_weights, attn_mask, average, is_causal)


ABSORBERS: dict[str, Absorber] = {
    "embedding": _absorb_embedding,
    "linear": _absorb_linear,
    "addmm": _absorb_addmm,
    "matmul": _absorb_matmul,
    "conv1d": _absorb_conv(nn.Conv1d),
    "conv2d": _absorb_conv(nn.Conv2d),
    "conv3d": _absorb_conv(nn.Conv3d),
    "batch_norm": _absorb_batch_norm,
    "layer_norm": _absorb_layer_norm,
    "group_norm": _absorb_group_norm,
    "rms_norm": _absorb_rms_norm,
    "multi_head_attention_forward": _absorb_multi_head_attention,
}
