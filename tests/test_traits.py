"""Op traits are the one source of truth about ops: every per-op rule table names known ops, every op has
the rules it needs (or a reason not to), traits are consistent, and the aliasing traits say what torch does.

Pruning's rule tables are checked in test_rule_tables.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import torch_dag as td
from torch_dag import viz
from torch_dag.analysis import flops
from torch_dag.converters import absorb, canonical
from torch_dag.core import traits as traits_module
from torch_dag.core.functions import FUNCTIONS
from torch_dag.core.inplace import IN_PLACE
from torch_dag.core.ops import MODULE_OPS
from torch_dag.core.traits import Trait, has_trait, ops_with, registered_ops, traits_of
from torch_dag.passes import pattern as P

factorize = importlib.import_module(
    "torch_dag.passes.factorize"
)  # the package exports a function of that name

# --- rule tables name known ops ----------------------------------------------------------------------

RULE_TABLES: dict[str, Any] = {
    "analysis/flops.py FLOP_RULES": flops.FLOP_RULES,
    "analysis/flops.py WITHOUT_FLOP_RULE": flops.WITHOUT_FLOP_RULE,
    "core/inplace.py IN_PLACE": IN_PLACE,
    "viz.py CONFIG_TEXT": viz.CONFIG_TEXT,
    "viz.py _FAMILY_OF_UNTRAITED": viz._FAMILY_OF_UNTRAITED,
    "converters/canonical.py FUNCTION_TO_MODULE": canonical.FUNCTION_TO_MODULE,
    "converters/canonical.py _VARARG_SIZE_OPS": canonical._VARARG_SIZE_OPS,
    "converters/absorb.py ABSORBERS": absorb.ABSORBERS,
    "passes/factorize.py FACTORIZABLE": factorize.FACTORIZABLE,
}


@pytest.mark.parametrize("table", sorted(RULE_TABLES))
def test_rule_table_keys_are_known_ops(table):
    unknown = sorted(set(RULE_TABLES[table]) - set(td.known_ops()))
    assert not unknown, f"{table} names ops that are not registered (a typo, or a removed op): {unknown}"


def test_function_to_module_maps_function_ops_to_module_ops_with_the_same_traits():
    for function, (cls, _) in canonical.FUNCTION_TO_MODULE.items():
        assert function in FUNCTIONS, f"FUNCTION_TO_MODULE key {function!r} is not a function op"
        assert cls in MODULE_OPS, f"FUNCTION_TO_MODULE[{function!r}] = {cls.__name__}, not a module op"
        module = MODULE_OPS[cls].name
        assert traits_of(function) == traits_of(module), (
            f"{function} and {module} are one op in two spellings but declare different traits: "
            f"{sorted(traits_of(function), key=repr)} vs {sorted(traits_of(module), key=repr)}"
        )


def test_every_registered_op_is_a_known_op_and_back():
    assert registered_ops() == set(td.known_ops())


# --- every op has a FLOP rule or a reason ------------------------------------------------------------


def test_every_op_has_a_flop_rule_or_a_reason_to_cost_nothing():
    missing = sorted(
        op for op in registered_ops() if op not in flops.FLOP_RULES and not flops.no_flops_reason(op)
    )
    assert not missing, (
        f"ops without a FLOP rule: {missing}. Add a rule to FLOP_RULES in torch_dag/analysis/flops.py, or, "
        "if fvcore counts the op as free, add it with the reason to _UNCOUNTED there (ops with a trait in "
        "FREE_TRAITS need neither)"
    )


def test_ops_listed_without_a_flop_rule_need_the_listing():
    for op, reason in flops.WITHOUT_FLOP_RULE.items():
        assert op not in flops.FLOP_RULES, f"{op} has a FLOP rule and is listed as without one ({reason})"
        free = [t for t in traits_of(op) if t in flops.FREE_TRAITS]
        assert not free, f"{op} is free by its traits {free}: drop it from _UNCOUNTED in analysis/flops.py"


# --- the pattern sets derive from the traits --------------------------------------------------------

# the literal sets passes/pattern.py kept before traits: today's ops must still be exactly these
PATTERN_SETS = {
    "CONVS": {"Conv1d", "Conv2d", "Conv3d"},
    "LINEARS": {"Linear"},
    "BATCH_NORMS": {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d"},
    "NORMS": {
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "LayerNorm",
        "GroupNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "RMSNorm",
        "LocalResponseNorm",
    },
    "ACTIVATIONS": {
        "ReLU",
        "ReLU6",
        "LeakyReLU",
        "PReLU",
        "ELU",
        "CELU",
        "SELU",
        "GELU",
        "SiLU",
        "Mish",
        "Sigmoid",
        "Tanh",
        "Hardswish",
        "Hardsigmoid",
        "Hardtanh",
        "Softplus",
        "Softsign",
        "Tanhshrink",
        "Hardshrink",
        "Softshrink",
        "Threshold",
        "LogSigmoid",
        "GLU",
    },
    "DROPOUTS": {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout"},
    "METADATA_READERS": {"size", "dim", "numel", "dtype_of", "device_of"},
}


@pytest.mark.parametrize("name", sorted(PATTERN_SETS))
def test_pattern_sets_hold_the_ops_they_held_before_traits(name):
    derived = getattr(P, name)
    assert derived == PATTERN_SETS[name]
    assert set(derived) == PATTERN_SETS[name] and len(derived) == len(PATTERN_SETS[name])
    assert all(op in derived for op in PATTERN_SETS[name])
    assert "conv2d" not in derived and None not in derived


def test_pattern_sets_see_ops_registered_later(monkeypatch):
    monkeypatch.setitem(traits_module._TRAITS, "MyConv", frozenset({Trait.CONV}))
    assert "MyConv" in P.CONVS and "MyConv" in list(P.CONVS)
    assert "MyConv" in P.CONVS | {"Linear"}
    assert P.find(td.DagModule(["x"], [], td.Ref("x")), P.op(P.CONVS)) == []


# --- trait consistency ---------------------------------------------------------------------------------

# what an op is; an op is at most one of these (ELEMENTWISE, ALIASES_INPUT, BATCH_NORM may come with them)
KINDS = {
    Trait.CONV,
    Trait.LINEAR,
    Trait.NORM,
    Trait.POOL,
    Trait.REDUCTION,
    Trait.CONTRACTION,
    Trait.ACTIVATION,
    Trait.DROPOUT,
    Trait.IDENTITY,
    Trait.METADATA,
    Trait.FACTORY,
    Trait.VIEW,
    Trait.SIDE_EFFECT,
}


@pytest.mark.parametrize(
    ("trait", "implied"),
    [
        (Trait.VIEW, Trait.ALIASES_INPUT),
        (Trait.DROPOUT, Trait.ALIASES_INPUT),
        (Trait.BATCH_NORM, Trait.NORM),
    ],
)
def test_trait_implies(trait, implied):
    lacking = sorted(op for op in ops_with(trait) if not has_trait(op, implied))
    assert not lacking, f"every {trait!r} op is also {implied!r} (see the Trait docstrings); not: {lacking}"


def test_an_op_is_of_one_kind():
    mixed = {
        op: sorted(traits_of(op) & KINDS, key=repr)
        for op in registered_ops()
        if len(traits_of(op) & KINDS) > 1
    }
    assert not mixed, f"ops declaring more than one kind of op: {mixed}"


def test_elementwise_ops_are_no_other_kind_but_activations():
    mixed = sorted(op for op in ops_with(Trait.ELEMENTWISE) if traits_of(op) & KINDS - {Trait.ACTIVATION})
    assert not mixed


def test_the_batch_norm_modules_are_the_norms_with_running_statistics():
    for op in P.NORMS:
        cls = next(c for c, spec in MODULE_OPS.items() if spec.name == op)
        running = issubclass(cls, nn.modules.batchnorm._BatchNorm)
        assert running == has_trait(op, Trait.BATCH_NORM), op


# --- the aliasing traits say what torch does -----------------------------------------------------------


def X() -> torch.Tensor:
    return torch.randn(2, 4, 6, 6)


def _ints() -> torch.Tensor:
    return torch.randint(0, 8, (2, 4))


def _long(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.long)


Call = Callable[[], tuple[tuple, dict]]


def call(*args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    return args, kwargs


# op -> sample calls: the first is the op's typical use; later ones tempt an op to return its input
# (identity-like arguments). Ops not listed run the first of GENERIC_CALLS that works.
SAMPLES: dict[str, list[Call]] = {
    "adaptive_avg_pool1d": [lambda: call(torch.randn(2, 4, 6), 3)],
    "adaptive_avg_pool2d": [lambda: call(X(), 3), lambda: call(X(), 6)],
    "adaptive_max_pool1d": [lambda: call(torch.randn(2, 4, 6), 3)],
    "addbmm": [lambda: call(torch.randn(4, 5), torch.randn(2, 4, 3), torch.randn(2, 3, 5))],
    "addcdiv": [lambda: call(X(), X(), X().abs() + 1)],
    "addcmul": [lambda: call(X(), X(), X())],
    "addmm": [lambda: call(torch.randn(4, 5), torch.randn(4, 3), torch.randn(3, 5))],
    "affine_grid": [lambda: call(torch.randn(2, 2, 3), [2, 4, 6, 6], False)],
    "alpha_dropout": [lambda: call(X(), 0.5, False)],
    "arange": [lambda: call(5)],
    "avg_pool1d": [lambda: call(torch.randn(2, 4, 6), 2)],
    "avg_pool2d": [lambda: call(X(), 2), lambda: call(X(), 1)],
    "baddbmm": [lambda: call(torch.randn(2, 4, 5), torch.randn(2, 4, 3), torch.randn(2, 3, 5))],
    "batch_norm": [lambda: call(X(), torch.zeros(4), torch.ones(4))],
    "bilinear": [lambda: call(torch.randn(2, 3), torch.randn(2, 5), torch.randn(7, 3, 5))],
    "bitwise_and": [lambda: call(_ints(), _ints())],
    "bitwise_not": [lambda: call(_ints())],
    "bitwise_or": [lambda: call(_ints(), _ints())],
    "bitwise_xor": [lambda: call(_ints(), _ints())],
    "bucketize": [lambda: call(X(), torch.tensor([-1.0, 0.0, 1.0]))],
    "cat": [lambda: call([X(), X()]), lambda: call([X()])],
    "channel_shuffle": [lambda: call(X(), 2), lambda: call(X(), 1)],
    "conv1d": [lambda: call(torch.randn(2, 4, 6), torch.randn(3, 4, 3))],
    "conv2d": [lambda: call(X(), torch.randn(3, 4, 3, 3))],
    "conv3d": [lambda: call(torch.randn(1, 2, 4, 4, 4), torch.randn(3, 2, 3, 3, 3))],
    "conv_transpose1d": [lambda: call(torch.randn(2, 4, 6), torch.randn(4, 3, 3))],
    "conv_transpose2d": [lambda: call(X(), torch.randn(4, 3, 3, 3))],
    "conv_transpose3d": [lambda: call(torch.randn(1, 2, 4, 4, 4), torch.randn(2, 3, 3, 3, 3))],
    "cross": [lambda: call(torch.randn(4, 3), torch.randn(4, 3), 1)],
    "diag": [lambda: call(torch.randn(4))],
    "dropout": [lambda: call(X(), 0.5, False)],
    "dropout1d": [lambda: call(torch.randn(2, 4, 6), 0.5, False)],
    "dropout2d": [lambda: call(X(), 0.5, False)],
    "dropout3d": [lambda: call(X(), 0.5, False)],
    "einsum": [lambda: call("ij->ji", torch.randn(3, 4))],
    "embedding": [lambda: call(torch.randint(0, 5, (2, 3)), torch.randn(5, 4))],
    "empty": [lambda: call(2, 3)],
    "expand": [lambda: call(torch.randn(4, 1), (4, 5))],
    "eye": [lambda: call(3)],
    "flip": [lambda: call(X(), [1]), lambda: call(X(), [])],
    "fold": [lambda: call(torch.randn(2, 4, 9), (4, 4), 2)],
    "full": [lambda: call((2, 3), 1.0)],
    "gather": [lambda: call(X(), 1, _long(2, 4, 6, 6))],
    "grid_sample": [lambda: call(X(), torch.rand(2, 3, 3, 2) * 2 - 1, align_corners=False)],
    "index_put": [lambda: call(X(), (torch.tensor([0]),), torch.tensor(1.0))],
    "index_select": [lambda: call(X(), 1, torch.tensor([0, 2]))],
    "interpolate": [lambda: call(X(), (12, 12)), lambda: call(X(), (6, 6))],
    "layer_norm": [lambda: call(X(), [6])],
    "lerp": [lambda: call(X(), X(), 0.5)],
    "linear": [lambda: call(torch.randn(2, 3), torch.randn(4, 3))],
    "linspace": [lambda: call(0, 1, 5)],
    "masked_fill": [lambda: call(X(), X() > 0, 0.0)],
    "masked_select": [lambda: call(X(), X() > 0)],
    "max_pool1d": [lambda: call(torch.randn(2, 4, 6), 2)],
    "max_pool2d": [lambda: call(X(), 2), lambda: call(X(), 1)],
    "meshgrid": [lambda: call(torch.randn(3), torch.randn(4), indexing="ij")],
    "narrow": [lambda: call(X(), 1, 0, 2)],
    "new_full": [lambda: call(X(), (2, 3), 1.0)],
    "one_hot": [lambda: call(torch.randint(0, 4, (5,)), 4)],
    "ones": [lambda: call(2, 3)],
    "outer": [lambda: call(torch.randn(4), torch.randn(5))],
    "pad": [lambda: call(X(), [1, 1]), lambda: call(X(), [0, 0])],
    "permute": [lambda: call(X(), (0, 2, 1, 3))],
    "pixel_shuffle": [lambda: call(X(), 2), lambda: call(X(), 1)],
    "prelu": [lambda: call(X(), torch.full((1,), 0.25))],
    "rand": [lambda: call(2, 3)],
    "randint": [lambda: call(0, 5, (2, 3))],
    "randn": [lambda: call(2, 3)],
    "repeat": [lambda: call(X(), (1, 2, 1, 1)), lambda: call(X(), (1, 1, 1, 1))],
    "reshape": [lambda: call(X(), (2, -1))],
    "rms_norm": [lambda: call(X(), [6])],
    "roll": [lambda: call(X(), 1, 2), lambda: call(X(), 0, 2)],
    "scaled_dot_product_attention": [
        lambda: call(torch.randn(2, 4, 5), torch.randn(2, 4, 5), torch.randn(2, 4, 5))
    ],
    "multi_head_attention_forward": [
        lambda: call(
            *(torch.randn(5, 2, 8),) * 3,
            8,
            2,
            torch.randn(24, 8),
            torch.randn(24),
            None,
            None,
            False,
            0.0,
            torch.randn(8, 8),
            torch.randn(8),
            training=False,
        )
    ],
    "scatter": [lambda: call(X(), 1, _long(2, 4, 6, 6), X())],
    "stack": [lambda: call([X(), X()])],
    "sum": [lambda: call(X()), lambda: call(X(), ())],
    "t": [lambda: call(torch.randn(4, 5))],
    "take_along_dim": [lambda: call(X(), _long(2, 4, 6, 6), 1)],
    "tile": [lambda: call(X(), (2,)), lambda: call(X(), (1,))],
    "trace": [lambda: call(torch.randn(4, 4))],
    "unflatten": [lambda: call(X(), 1, (2, 2))],
    "unfold_dim": [lambda: call(X(), 3, 2, 2)],
    "where": [lambda: call(X() > 0, X(), X())],
    "zeros": [lambda: call(2, 3)],
}
GENERIC_CALLS: list[Call] = [
    lambda: call(X()),
    lambda: call(X(), X()),
    lambda: call(X(), 1),
    lambda: call(X(), 2, 2),
]
# function ops that take no tensors at all: nothing to alias
NOT_ON_TENSORS = {"assert", "assert_async", "guard", "size_ceil", "size_floor", "size_max", "size_min"}


def tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors(item)]
    if isinstance(value, dict):
        return tensors(list(value.values()))
    return []


def shares_storage(out: Any, inputs: Any) -> bool:
    pointers = {t.untyped_storage().data_ptr() for t in tensors(inputs) if t.untyped_storage().nbytes()}
    return any(t.untyped_storage().data_ptr() in pointers for t in tensors(out))


def sample_calls(op: str) -> list[tuple[tuple, dict, Any]]:
    """(args, kwargs, output) of the op's sample calls (the first generic call that runs, if none listed)."""
    fn = FUNCTIONS[op].fn
    if op in SAMPLES:
        return [(args, kwargs, fn(*args, **kwargs)) for args, kwargs in (make() for make in SAMPLES[op])]
    for make in GENERIC_CALLS:
        args, kwargs = make()
        try:
            return [(args, kwargs, fn(*args, **kwargs))]
        except (TypeError, RuntimeError, ValueError, IndexError):
            continue
    raise AssertionError(
        f"no generic call runs {op}: add sample calls for it to SAMPLES in tests/test_traits.py"
    )


def test_sample_tables_name_function_ops():
    assert set(SAMPLES) | NOT_ON_TENSORS <= set(FUNCTIONS)


@pytest.mark.parametrize("op", sorted(set(FUNCTIONS) - NOT_ON_TENSORS))
def test_function_op_aliases_its_input_exactly_when_its_traits_say(op):
    torch.manual_seed(0)
    calls = sample_calls(op)
    aliased = [shares_storage(out, (args, kwargs)) for args, kwargs, out in calls]
    if has_trait(op, Trait.ALIASES_INPUT):
        assert aliased[0], f"{op} is declared ALIASES_INPUT but its sample call returns fresh storage"
    else:
        assert not any(aliased), (
            f"{op} returned a tensor sharing storage with its input but is not declared "
            "ALIASES_INPUT: in-place execution would corrupt that input"
        )


@pytest.mark.parametrize("op", sorted(set(FUNCTIONS) - NOT_ON_TENSORS))
def test_function_op_computes_what_its_traits_say(op):
    torch.manual_seed(0)
    for args, _, out in sample_calls(op):
        if has_trait(op, Trait.METADATA):
            assert not tensors(out), f"{op} reads only metadata, yet returns a tensor"
        if has_trait(op, Trait.IDENTITY):
            assert out.dtype == args[0].dtype and torch.equal(out, args[0])
        if has_trait(op, Trait.ELEMENTWISE) and isinstance(out, torch.Tensor):
            assert out.shape == torch.broadcast_shapes(*(t.shape for t in tensors(args)))
        if has_trait(op, Trait.CONV):  # input, weight (out, in / groups, *kernel)
            assert out.shape[1] == args[1].shape[0], (
                f"{op} is declared CONV, yet a weight {tuple(args[1].shape)} gives {out.shape[1]} output channels, "
                f"not (out, in / groups, *kernel): drop the trait where {op} is registered"
            )
        if has_trait(op, Trait.LINEAR):  # input, weight (out, in) over the last axis
            weight = args[1]
            assert weight.dim() == 2 and out.shape[-1] == weight.shape[0], (
                f"{op} is declared LINEAR, yet its second argument {tuple(weight.shape)} is no (out, in) "
                f"weight for an output {tuple(out.shape)}: drop the trait where {op} is registered"
            )


# module op -> (module, input); a module op not listed is built with no arguments when it can be
MODULE_SAMPLES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "Conv1d": lambda: (nn.Conv1d(4, 3, 3), torch.randn(2, 4, 6)),
    "Conv2d": lambda: (nn.Conv2d(4, 3, 1), X()),
    "Conv3d": lambda: (nn.Conv3d(2, 3, 3), torch.randn(1, 2, 4, 4, 4)),
    "ConvTranspose2d": lambda: (nn.ConvTranspose2d(4, 3, 1), X()),
    "Linear": lambda: (nn.Linear(6, 5), X()),
    "BatchNorm2d": lambda: (nn.BatchNorm2d(4), X()),
    "LayerNorm": lambda: (nn.LayerNorm(6), X()),
    "GroupNorm": lambda: (nn.GroupNorm(2, 4), X()),
    "InstanceNorm2d": lambda: (nn.InstanceNorm2d(4), X()),
    "RMSNorm": lambda: (nn.RMSNorm(6), X()),
    "LocalResponseNorm": lambda: (nn.LocalResponseNorm(2), X()),
    "Threshold": lambda: (nn.Threshold(0.1, 0.0), X()),
    "MaxPool2d": lambda: (nn.MaxPool2d(1), X()),
    "AvgPool2d": lambda: (nn.AvgPool2d(1), X()),
    "AdaptiveAvgPool2d": lambda: (nn.AdaptiveAvgPool2d(6), X()),
    "AdaptiveMaxPool2d": lambda: (nn.AdaptiveMaxPool2d(6), X()),
    "LPPool2d": lambda: (nn.LPPool2d(2, 1), X()),
    "PixelShuffle": lambda: (nn.PixelShuffle(1), X()),
    "PixelUnshuffle": lambda: (nn.PixelUnshuffle(1), X()),
    "ChannelShuffle": lambda: (nn.ChannelShuffle(1), X()),
    "Dropout1d": lambda: (nn.Dropout1d(), torch.randn(2, 4, 6)),
}


def module_sample(name: str, cls: type[nn.Module]) -> tuple[nn.Module, torch.Tensor] | None:
    if name in MODULE_SAMPLES:
        return MODULE_SAMPLES[name]()
    try:
        return cls(), X()
    except TypeError:  # needs constructor arguments: not sampled
        return None


# (Parameter and Constant, the FACTORY modules, take no input: they hand out their own tensor)
MODULE_CASES = [
    (spec.name, cls)
    for cls, spec in MODULE_OPS.items()
    if not has_trait(spec.name, Trait.FACTORY) and module_sample(spec.name, cls) is not None
]


def test_module_samples_name_module_ops():
    assert set(MODULE_SAMPLES) <= {spec.name for spec in MODULE_OPS.values()}


@pytest.mark.parametrize(("name", "cls"), MODULE_CASES, ids=[name for name, _ in MODULE_CASES])
def test_module_op_aliases_its_input_exactly_when_its_traits_say(name, cls):
    torch.manual_seed(0)
    module, x = module_sample(name, cls)
    with torch.no_grad():
        out = module.eval()(x)
    assert shares_storage(out, x) == has_trait(name, Trait.ALIASES_INPUT), name
    if has_trait(name, Trait.IDENTITY):
        assert torch.equal(out, x)
    if has_trait(name, Trait.CONV) or has_trait(name, Trait.LINEAR):
        channels = out.shape[1] if has_trait(name, Trait.CONV) else out.shape[-1]
        assert channels == module.weight.shape[0], f"{name}: weight is not (out, in, ...)"
