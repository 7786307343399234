"""The registry of function ops: what models write as functions, methods or operators.

Each entry is one canonical op: a name, the Python callable that runs it, the spellings that mean it
(`torch.add`, `x.add(...)`, `x + y`, `x += y`, ...) and its traits. Spellings are data, read by the
converter; the op knows nothing of where it came from. The ops themselves are registered by the
`functions_*` modules (`functions.py` imports them all).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .traits import Trait, declare_traits

ELEMENTWISE, ACTIVATION, DROPOUT, NORM = Trait.ELEMENTWISE, Trait.ACTIVATION, Trait.DROPOUT, Trait.NORM
VIEW, ALIASES, IDENTITY, METADATA = Trait.VIEW, Trait.ALIASES_INPUT, Trait.IDENTITY, Trait.METADATA
REDUCTION, CONTRACTION, POOL, FACTORY = Trait.REDUCTION, Trait.CONTRACTION, Trait.POOL, Trait.FACTORY


@dataclass(frozen=True)
class Spellings:
    """Where an op is found in source code: `torch.X`, `F.X`, `operator.X`, `tensor.X(...)`."""

    torch: tuple[str, ...] = ()
    functional: tuple[str, ...] = ()
    operator: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    fn: Callable[..., Any]
    spellings: Spellings
    traits: frozenset[Trait] = frozenset()
    signature: inspect.Signature | None = field(default=None, compare=False)

    @property
    def side_effect(self) -> bool:
        """Kept even when its output is unused (asserts, guards)."""
        return Trait.SIDE_EFFECT in self.traits


FUNCTIONS: dict[str, FunctionSpec] = {}


def register_function(
    name: str, fn: Callable[..., Any], spellings: Spellings, traits: Iterable[Trait] = ()
) -> None:
    """Add function op `name`: its callable, spellings and traits (a duplicate name raises)."""
    if name in FUNCTIONS:
        raise ValueError(f"function op {name!r} registered twice")
    declare_traits(name, traits)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # C builtins without a Python signature: args stay as written
        signature = None
    FUNCTIONS[name] = FunctionSpec(name, fn, spellings, frozenset(traits), signature)


def function_op(name: str, *, torch=(), functional=(), operator=(), methods=(), traits: Iterable[Trait] = ()):
    """Decorator registering a canonical callable under `name` with its spellings and traits."""

    def deco(fn):
        register_function(
            name, fn, Spellings(tuple(torch), tuple(functional), tuple(operator), tuple(methods)), traits
        )
        return fn

    return deco


def register_torch_op(
    name: str,
    traits: Iterable[Trait] = (),
    *,
    extra_methods=(),
    extra_torch=(),
    functional=(),
    in_place: bool = True,
) -> None:
    """Register `torch.<name>` as an op spelled `torch.<name>` and `x.<name>(...)` (and `x.<name>_`)."""
    methods = (name, f"{name}_") if in_place else (name,)
    register_function(
        name,
        getattr(torch, name),
        Spellings((name, *extra_torch), tuple(functional), (), (*methods, *extra_methods)),
        traits,
    )
