"""Call templates: the args/kwargs of a vertex, with `Ref`s where predecessor outputs go.

A template is a nested structure of lists, tuples, dicts and constants (numbers, strings, None,
slices, Ellipsis, dtypes, devices, memory formats). It is how a vertex says what it passes to its
module, like the args of a torch.fx node. This file also owns the JSON form of templates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import LoadError


@dataclass(frozen=True)
class Ref:
    """A reference to the output of the vertex called `name`."""

    name: str

    def __repr__(self) -> str:
        return f"%{self.name}"


def iter_refs(template: Any) -> Iterator[Ref]:
    """All `Ref`s in a template, depth first, in argument order (with repeats)."""
    if isinstance(template, Ref):
        yield template
    elif isinstance(template, (list, tuple)):
        for item in template:
            yield from iter_refs(item)
    elif isinstance(template, dict):
        for value in template.values():
            yield from iter_refs(value)
    elif isinstance(template, slice):
        yield from iter_refs((template.start, template.stop, template.step))


def map_refs(template: Any, fn: Callable[[Ref], Any]) -> Any:
    """A copy of `template` with every `Ref` replaced by `fn(ref)`."""
    if isinstance(template, Ref):
        return fn(template)
    if isinstance(template, list):
        return [map_refs(item, fn) for item in template]
    if isinstance(template, tuple):
        return tuple(map_refs(item, fn) for item in template)
    if isinstance(template, dict):
        return {key: map_refs(value, fn) for key, value in template.items()}
    if isinstance(template, slice):
        return slice(*(map_refs(v, fn) for v in (template.start, template.stop, template.step)))
    return template


def unique_refs(*templates: Any) -> list[str]:
    """Names referenced by the templates, first occurrence order, without repeats."""
    seen: dict[str, None] = {}
    for template in templates:
        for ref in iter_refs(template):
            seen.setdefault(ref.name, None)
    return list(seen)


# --- constants ------------------------------------------------------------------------------------

DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "channels_last_3d": torch.channels_last_3d,
    "preserve_format": torch.preserve_format,
}
_LAYOUTS = {"strided": torch.strided}


def is_constant(value: Any) -> bool:
    """Whether `value` is a constant a template (and so a saved DAG) can hold."""
    if value is None or value is Ellipsis or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return True
    if isinstance(value, slice):
        return all(is_constant(v) or isinstance(v, Ref) for v in (value.start, value.stop, value.step))
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, Ref) or is_constant(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) for k in value) and all(
            isinstance(v, Ref) or is_constant(v) for v in value.values()
        )
    return False


def to_json(template: Any) -> Any:
    """The JSON-able form of a template (tagged dicts for what JSON lacks)."""
    if isinstance(template, Ref):
        return {"$ref": template.name}
    if template is None or isinstance(template, (bool, int, str)):
        return template
    if isinstance(template, float):
        return template if math.isfinite(template) else {"$float": repr(template)}
    if isinstance(template, list):
        return [to_json(v) for v in template]
    if isinstance(template, tuple):  # torch.Size included
        return {"$tuple": [to_json(v) for v in template]}
    if isinstance(template, dict):
        return {"$dict": {k: to_json(v) for k, v in template.items()}}
    if isinstance(template, slice):
        return {"$slice": [to_json(template.start), to_json(template.stop), to_json(template.step)]}
    if template is Ellipsis:
        return {"$ellipsis": None}
    if isinstance(template, torch.dtype):
        return {"$dtype": str(template).removeprefix("torch.")}
    if isinstance(template, torch.device):
        return {"$device": str(template)}
    if isinstance(template, torch.memory_format):
        return {"$memory_format": str(template).removeprefix("torch.")}
    if isinstance(template, torch.layout):
        return {"$layout": str(template).removeprefix("torch.")}
    raise TypeError(f"cannot store {type(template).__name__} value {template!r} in a template")


def _lookup(table: dict[str, Any], key: Any, what: str) -> Any:
    if not isinstance(key, str) or key not in table:
        raise LoadError(f"unknown {what} {key!r}; known: {sorted(table)}")
    return table[key]


def from_json(data: Any, depth: int = 0) -> Any:
    """Inverse of `to_json`; raises `LoadError` on anything it did not write."""
    if depth > 64:
        raise LoadError("template nested more than 64 levels deep")
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [from_json(v, depth + 1) for v in data]
    if not isinstance(data, dict) or len(data) != 1:
        raise LoadError(f"malformed template value {str(data)[:80]!r}")
    ((tag, value),) = data.items()
    if tag == "$ref":
        if not isinstance(value, str):
            raise LoadError(f"$ref must name a vertex, got {value!r}")
        return Ref(value)
    if tag == "$tuple" and isinstance(value, list):
        return tuple(from_json(v, depth + 1) for v in value)
    if tag == "$dict" and isinstance(value, dict):
        return {k: from_json(v, depth + 1) for k, v in value.items()}
    if tag == "$slice" and isinstance(value, list) and len(value) == 3:
        return slice(*(from_json(v, depth + 1) for v in value))
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$float" and value in ("inf", "-inf", "nan"):
        return float(value)
    if tag == "$dtype":
        return _lookup(DTYPES, value, "dtype")
    if tag == "$memory_format":
        return _lookup(_MEMORY_FORMATS, value, "memory format")
    if tag == "$layout":
        return _lookup(_LAYOUTS, value, "layout")
    if tag == "$device" and isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError as e:
            raise LoadError(f"bad device {value!r}: {e}") from None
    raise LoadError(f"malformed template value {str(data)[:80]!r}")
