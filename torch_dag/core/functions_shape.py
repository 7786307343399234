"""Function ops for shapes, metadata, views, layout, joining and splitting, and tensor creation."""

from __future__ import annotations

import torch

from .function_registry import (
    ALIASES,
    FACTORY,
    IDENTITY,
    METADATA,
    VIEW,
    Spellings,
    function_op,
    register_function,
)

# --- shapes and metadata --------------------------------------------------------------------------


@function_op("size", methods=["size"], traits=[METADATA])
def size(input, dim=None):
    return input.size() if dim is None else input.size(dim)


@function_op("dim", methods=["dim", "ndimension"], traits=[METADATA])
def dim(input):
    return input.dim()


@function_op("numel", torch=["numel"], methods=["numel", "nelement"], traits=[METADATA])
def numel(input):
    return input.numel()


@function_op("dtype_of", traits=[METADATA])
def dtype_of(input):
    return input.dtype


@function_op("device_of", methods=["get_device"], traits=[METADATA])
def device_of(input):
    return input.device


# --- views and layout -----------------------------------------------------------------------------


@function_op("reshape", torch=["reshape"], methods=["reshape", "view"], traits=[VIEW])
def reshape(input, shape):
    return input.reshape(shape)


@function_op("view_as", methods=["view_as", "reshape_as"], traits=[VIEW])
def view_as(input, other):
    return input.reshape(other.shape)


@function_op("flatten", torch=["flatten"], methods=["flatten"], traits=[VIEW])
def flatten(input, start_dim=0, end_dim=-1):
    return torch.flatten(input, start_dim, end_dim)


@function_op("unflatten", torch=["unflatten"], methods=["unflatten"], traits=[VIEW])
def unflatten(input, dim, sizes):
    return torch.unflatten(input, dim, sizes)


@function_op("permute", torch=["permute"], methods=["permute"], traits=[VIEW])
def permute(input, dims):
    return input.permute(dims)


@function_op(
    "transpose",
    torch=["transpose", "swapaxes", "swapdims"],
    methods=["transpose", "transpose_", "swapaxes", "swapdims"],
    traits=[VIEW],
)
def transpose(input, dim0, dim1):
    return input.transpose(dim0, dim1)


@function_op("t", torch=["t"], methods=["t", "t_"], traits=[VIEW])
def t(input):
    return input.t()


@function_op("movedim", torch=["movedim", "moveaxis"], methods=["movedim", "moveaxis"], traits=[VIEW])
def movedim(input, source, destination):
    return torch.movedim(input, source, destination)


@function_op("squeeze", torch=["squeeze"], methods=["squeeze", "squeeze_"], traits=[VIEW])
def squeeze(input, dim=None):
    return input.squeeze() if dim is None else input.squeeze(dim)


@function_op("unsqueeze", torch=["unsqueeze"], methods=["unsqueeze", "unsqueeze_"], traits=[VIEW])
def unsqueeze(input, dim):
    return input.unsqueeze(dim)


@function_op("expand", torch=["broadcast_to"], methods=["expand", "broadcast_to"], traits=[VIEW])
def expand(input, size):
    return input.expand(size)


@function_op("expand_as", methods=["expand_as"], traits=[VIEW])
def expand_as(input, other):
    return input.expand_as(other)


@function_op("repeat", methods=["repeat"])
def repeat(input, repeats):
    return input.repeat(repeats)


@function_op("tile", torch=["tile"], methods=["tile"])
def tile(input, dims):
    return torch.tile(input, dims)


@function_op("contiguous", methods=["contiguous"], traits=[ALIASES, IDENTITY])
def contiguous(input, memory_format=torch.contiguous_format):
    return input.contiguous(memory_format=memory_format)


@function_op("clone", torch=["clone"], methods=["clone"], traits=[IDENTITY])
def clone(input, *, memory_format=torch.preserve_format):
    return input.clone(memory_format=memory_format)


@function_op("detach", torch=["detach"], methods=["detach", "detach_"], traits=[VIEW])
def detach(input):
    return input.detach()


@function_op(
    "to",
    methods=["to", "type", "float", "double", "half", "bfloat16", "int", "long", "bool", "cuda", "cpu"],
    traits=[ALIASES],
)
def to(input, *args, **kwargs):
    return input.to(*args, **kwargs)


@function_op("type_as", methods=["type_as"], traits=[ALIASES])
def type_as(input, other):
    return input.type_as(other)


@function_op("cat", torch=["cat", "concat", "concatenate"])
def cat(tensors, dim=0):
    return torch.cat(tensors, dim)


@function_op("stack", torch=["stack"])
def stack(tensors, dim=0):
    return torch.stack(tensors, dim)


@function_op("split", torch=["split"], methods=["split"], traits=[VIEW])
def split(input, split_size_or_sections, dim=0):
    return torch.split(input, split_size_or_sections, dim)


@function_op("chunk", torch=["chunk"], methods=["chunk"], traits=[VIEW])
def chunk(input, chunks, dim=0):
    return torch.chunk(input, chunks, dim)


@function_op("tensor_split", torch=["tensor_split"], methods=["tensor_split"], traits=[VIEW])
def tensor_split(input, indices_or_sections=None, dim=0, *, indices=None, sections=None):
    """`torch.tensor_split` under any of its spellings (`indices=`, `sections=` by keyword)."""
    given = [v for v in (indices_or_sections, indices, sections) if v is not None]
    if len(given) != 1:
        raise TypeError("tensor_split takes one of indices_or_sections, indices or sections")
    return torch.tensor_split(input, given[0], dim)


@function_op("unbind", torch=["unbind"], methods=["unbind"], traits=[VIEW])
def unbind(input, dim=0):
    return torch.unbind(input, dim)


@function_op("unfold_dim", methods=["unfold"], traits=[VIEW])
def unfold_dim(input, dimension, size, step):
    """`Tensor.unfold`: sliding windows along one dimension (not `F.unfold`, which is im2col)."""
    return input.unfold(dimension, size, step)


@function_op("narrow", torch=["narrow"], methods=["narrow"], traits=[VIEW])
def narrow(input, dim, start, length):
    return torch.narrow(input, dim, start, length)


@function_op("select", torch=["select"], methods=["select"], traits=[VIEW])
def select(input, dim, index):
    return torch.select(input, dim, index)


@function_op("flip", torch=["flip"], methods=["flip"])
def flip(input, dims):
    return torch.flip(input, dims)


@function_op("roll", torch=["roll"], methods=["roll"])
def roll(input, shifts, dims=None):
    return torch.roll(input, shifts, dims) if dims is not None else torch.roll(input, shifts)


# --- tensor creation ------------------------------------------------------------------------------

_FACTORIES = (
    "zeros",
    "ones",
    "full",
    "empty",
    "arange",
    "linspace",
    "eye",
    "tensor",
    "as_tensor",
    "rand",
    "randn",
    "randint",
)
for _name in _FACTORIES:  # `torch.as_tensor(t)` is `t` itself
    register_function(
        _name,
        getattr(torch, _name),
        Spellings(torch=(_name,)),
        [FACTORY, ALIASES] if _name == "as_tensor" else [FACTORY],
    )
_IN_PLACE_FILLS = {"zeros_like": ("zero_",), "full_like": ("fill_",)}  # `x.zero_()`: x becomes zeros_like(x)
for _name in ("zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like"):
    register_function(
        _name,
        getattr(torch, _name),
        Spellings(torch=(_name,), methods=_IN_PLACE_FILLS.get(_name, ())),
        [FACTORY],
    )
for _name in ("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"):
    register_function(_name, getattr(torch.Tensor, _name), Spellings(methods=(_name,)), [FACTORY])


@function_op("meshgrid", torch=["meshgrid"], traits=[ALIASES])
def meshgrid(*tensors, indexing=None):
    return torch.meshgrid(*tensors, indexing=indexing)
