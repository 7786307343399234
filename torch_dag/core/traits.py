"""Op traits: what an op is, declared once where the op is registered.

Like tinygrad's `GroupOp` sets, a trait is data about an op, not code in a subsystem: every part of the
toolkit that asks "which ops are views / dropouts / activations ..." asks here (`has_trait`, `ops_with`)
instead of keeping its own list of names. Subsystems still own per-op *rule tables* (channel rules, FLOP
rules, in-place kernels) keyed by op name; the op itself knows nothing of them.

Traits are declared by `functions.function_op(..., traits=...)` and `ops.register_module_op(...,
traits=...)`; an op registered without traits simply has none (no subsystem then assumes anything of it).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class Trait(enum.Enum):
    """One property of an op. The docstring of each member is the contract subsystems rely on."""

    ELEMENTWISE = "elementwise"
    """One output value per position of its (broadcast) tensor operands: `add`, `exp`, `where`, `gelu`."""
    ACTIVATION = "activation"
    """A nonlinearity applied to each element independently of the others (`ReLU`, `F.silu`, `sigmoid`)."""
    DROPOUT = "dropout"
    """Zeroes random elements in training and is the identity in inference (`Dropout*`, `F.dropout*`)."""
    NORM = "norm"
    """Normalizes its input over some axes, with an optional per-channel affine (`LayerNorm`, `F.batch_norm`)."""
    BATCH_NORM = "batch_norm"
    """A module keeping running statistics per channel (`BatchNorm1d/2d/3d`); also a NORM."""
    CONV = "conv"
    """A plain convolution: weight (out, in / groups, *kernel), optional bias (`Conv1d/2d/3d`, `F.conv2d`);
    not transposed, standardized or factorized convolutions, whose weights read differently."""
    LINEAR = "linear"
    """A plain matrix product with a weight (out, in) over the last axis (`Linear`, `F.linear`)."""
    POOL = "pool"
    """Pools or resamples the spatial axes and keeps every channel apart (`MaxPool2d`, `interpolate`)."""
    REDUCTION = "reduction"
    """Reduces its input over the axes it is given (`mean`, `sum`, `amax`, `logsumexp`)."""
    CONTRACTION = "contraction"
    """Multiplies two activations together over an axis (`matmul`, `einsum`, attention)."""
    VIEW = "view"
    """May return a view of its first input: an in-place op on its result may mutate that input."""
    ALIASES_INPUT = "aliases_input"
    """Its output may share storage with an input (every VIEW, `Identity`, dropouts, `to`, `contiguous`)."""
    IDENTITY = "identity"
    """Returns its input's values, shape and dtype unchanged for every input (`Identity`, `clone`)."""
    METADATA = "metadata"
    """Reads only the metadata of its input (shape, rank, dtype, device), never the values."""
    FACTORY = "factory"
    """Makes a tensor from sizes or values it is given, not from an input tensor's values."""
    SIDE_EFFECT = "side_effect"
    """Kept even when nothing reads its output (asserts, guards)."""

    def __repr__(self) -> str:
        return f"Trait.{self.name}"


# op name -> its traits; filled by the two registries (functions.py, ops.py) as ops are registered
_TRAITS: dict[str, frozenset[Trait]] = {}


def declare_traits(op: str, traits: Iterable[Trait]) -> None:
    """Record the traits of a newly registered op (the registries call this; a duplicate raises)."""
    if op in _TRAITS:
        raise ValueError(f"op {op!r} is already registered")
    traits = frozenset(traits)
    unknown = [t for t in traits if not isinstance(t, Trait)]
    if unknown:
        raise TypeError(f"op {op!r}: traits must be torch_dag Trait members, got {unknown!r}")
    if Trait.BATCH_NORM in traits:
        traits |= {Trait.NORM}
    if Trait.VIEW in traits:
        traits |= {Trait.ALIASES_INPUT}
    _TRAITS[op] = traits


def traits_of(op: str) -> frozenset[Trait]:
    """The traits of op `op` (empty for an op declared without any, or one not registered)."""
    return _TRAITS.get(op, frozenset())


def has_trait(op: str, trait: Trait) -> bool:
    return trait in _TRAITS.get(op, ())


def ops_with(*traits: Trait) -> frozenset[str]:
    """The registered ops that have every one of `traits` (read at call time: registrations made later,
    by a user or an extension, are included)."""
    wanted = set(traits)
    return frozenset(op for op, have in _TRAITS.items() if wanted <= have)


def registered_ops() -> frozenset[str]:
    """Every op name with a trait entry (that is, every registered op)."""
    return frozenset(_TRAITS)
