"""What a module op's config may hold in a file: serde's rule table keyed by parameter and op, checked
before anything is built. Types come from the constructor's defaults (a `bool` default takes a bool, an
`int` default an int or a tuple of ints, a `float` default a number that is not NaN, a `str` default a
string);
ranges come from the small tables below (channels and kernel sizes positive, `p` in [0, 1], `eps` > 0).
A user's own module op gets the types its defaults imply and the ranges of the parameter names it shares
with torch's layers."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from ..core.ops import ModuleOpSpec
from .schema import expect

STORABLE_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
)


def _ints(value: Any, low: int, none_ok: bool = False) -> bool:
    """An int >= low, or a tuple / list of them (None too, or inside, when `none_ok`)."""
    items = value if isinstance(value, (tuple, list)) else [value]
    return all((none_ok and v is None) or (type(v) is int and v >= low) for v in items)


def _number(value: Any) -> bool:
    """A finite int or float (for parameters with a range)."""
    return type(value) in (int, float) and math.isfinite(value)


def _float(value: Any) -> bool:
    """An int or float that is not NaN: infinities are meaningful bounds (`Hardtanh(-inf, 6)`)."""
    return type(value) in (int, float) and not math.isnan(value)


def _positive_ints(value: Any) -> bool:
    return _ints(value, 1)


def _natural_ints(value: Any) -> bool:
    return _ints(value, 0)


def _optional_positive_ints(value: Any) -> bool:
    return value is None or _ints(value, 1)


def _unit_interval(value: Any) -> bool:
    return _number(value) and 0 <= value <= 1


def _optional_unit_interval(value: Any) -> bool:
    return value is None or _unit_interval(value)


def _positive_number(value: Any) -> bool:
    return _number(value) and value > 0


def _optional_positive_number(value: Any) -> bool:
    return value is None or _positive_number(value)


def _padding(value: Any) -> bool:
    return value in ("same", "valid") or _natural_ints(value)


def _shape(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and _natural_ints(list(value)) and len(value) <= 16


def _storable_dtype(value: Any) -> bool:
    return isinstance(value, torch.dtype) and value in STORABLE_DTYPES


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

# parameter name -> (what it must be, in words; its check). Applies to every module op with a parameter
# of that name, unless `_BY_OP` says otherwise for that op.
_BY_NAME: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "in_features": ("a positive int", _positive_ints),
    "out_features": ("a positive int", _positive_ints),
    "in1_features": ("a positive int", _positive_ints),
    "in2_features": ("a positive int", _positive_ints),
    "in_channels": ("a positive int", _positive_ints),
    "out_channels": ("a positive int", _positive_ints),
    "num_features": ("a positive int", _positive_ints),
    "num_channels": ("a positive int", _positive_ints),
    "num_groups": ("a positive int", _positive_ints),
    "num_embeddings": ("a positive int", _positive_ints),
    "embedding_dim": ("a positive int", _positive_ints),
    "input_size": ("a positive int", _positive_ints),
    "hidden_size": ("a positive int", _positive_ints),
    "num_layers": ("a positive int", _positive_ints),
    "embed_dim": ("a positive int", _positive_ints),
    "num_heads": ("a positive int", _positive_ints),
    "num_parameters": ("a positive int", _positive_ints),
    "upscale_factor": ("a positive int", _positive_ints),
    "downscale_factor": ("a positive int", _positive_ints),
    "rank": ("a positive int", _positive_ints),
    "size": ("a positive int", _positive_ints),
    "groups": ("a positive int", _positive_ints),
    "kernel_size": ("positive ints", _positive_ints),
    "stride": ("positive ints (or None for a pool)", _optional_positive_ints),
    "dilation": ("positive ints", _positive_ints),
    "padding": ("ints >= 0 (or 'same' / 'valid')", _padding),
    "output_padding": ("ints >= 0", _natural_ints),
    "output_size": ("ints >= 1 or None", lambda v: _ints(v, 1, none_ok=True)),
    "normalized_shape": ("positive ints", _positive_ints),
    "proj_size": ("an int >= 0", _natural_ints),
    "kdim": ("None or a positive int", _optional_positive_ints),
    "vdim": ("None or a positive int", _optional_positive_ints),
    "divisor_override": ("None or a positive int", _optional_positive_ints),
    "padding_idx": ("None or an int", lambda v: v is None or type(v) is int),
    "dim": ("None or an int", lambda v: v is None or type(v) is int),
    "p": ("a number in [0, 1]", _unit_interval),
    "dropout": ("a number in [0, 1]", _unit_interval),
    "momentum": ("None or a number in [0, 1]", _optional_unit_interval),
    "eps": ("a number > 0", _optional_positive_number),
    "norm_type": ("a number > 0", _positive_number),
    "max_norm": ("None or a number > 0", _optional_positive_number),
    "beta": ("a number > 0", _positive_number),
    "lambd": ("a number >= 0", lambda v: _number(v) and v >= 0),
    "shape": ("a list of at most 16 ints >= 0", _shape),
    "dtype": (
        "a dtype torch_dag stores (float64/32/16, bfloat16, int64/32/16/8, uint8, bool)",
        _storable_dtype,
    ),
    "padding_mode": ("one of zeros, reflect, replicate, circular", lambda v: v in _PADDING_MODES),
    "nonlinearity": ("tanh or relu", lambda v: v in ("tanh", "relu")),
    "approximate": ("none or tanh", lambda v: v in ("none", "tanh")),
}

# (op, parameter) -> (what it must be; its check), where the op's meaning differs from the name's
_BY_OP: dict[tuple[str, str], tuple[str, Callable[[Any], bool]]] = {
    ("CELU", "alpha"): ("a nonzero number", lambda v: _number(v) and v != 0),
    ("RMSNorm", "eps"): ("None or a number > 0", _optional_positive_number),
}

# ops whose constructor makes tensors in proportion to a config value (not to the tensors' sizes):
# op -> config -> how many tensors the module will hold, checked against the file before building
TENSOR_COUNT: dict[str, Callable[[dict[str, Any]], int]] = {
    op: lambda c: _layers(c) * (2 if c.get("bidirectional") else 1) * 2 for op in ("LSTM", "GRU", "RNN")
}


def _layers(config: dict[str, Any]) -> int:
    layers = config.get("num_layers", 1)
    return layers if type(layers) is int else 1


def check_config(spec: ModuleOpSpec, config: dict[str, Any], where: str) -> None:
    """Refuse a config (as `from_json` reads it) whose values the op's schema does not allow: the type
    its constructor's default implies, the range the tables give, required parameters present."""
    for param in spec.params:
        if param.name not in config:
            expect(
                param.default is not inspect.Parameter.empty,
                f"{where}: config lacks {param.name!r}, which {spec.name} requires",
            )
            continue
        value = config[param.name]
        rule = _BY_OP.get((spec.name, param.name)) or _BY_NAME.get(param.name)
        if rule is not None:
            what, ok = rule
        else:
            what, ok = _by_default(param.default)
        expect(ok(value), f"{where}: config {param.name!r} must be {what}, got {str(value)[:60]}")
    if spec.name == "Hardtanh":
        low, high = config.get("min_val", -1.0), config.get("max_val", 1.0)
        expect(
            not (_number(low) and _number(high)) or low < high,
            f"{where}: config min_val must be below max_val, got {low} and {high}",
        )


def _by_default(default: Any) -> tuple[str, Callable[[Any], bool]]:
    """The type a parameter's default implies (anything storable when it has none, or None)."""
    if isinstance(default, bool):
        return "a bool", lambda v: type(v) is bool
    if isinstance(default, int):
        return "an int or ints", lambda v: _ints(v, -(2**62)) and not isinstance(v, bool)
    if isinstance(default, float):
        return "a number (not NaN)", _float
    if isinstance(default, str):
        return "a string", lambda v: isinstance(v, str)
    if isinstance(default, torch.dtype):
        return "a dtype torch_dag stores", _storable_dtype
    return "a stored constant", lambda v: True
