"""The op vocabulary: every registered module op rebuilds from its config, registration is strict,
unknown names fail with an error that says what is known."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import torch_dag as td
from torch_dag.core import ops
from torch_dag.core.functions import FUNCTIONS
from torch_dag.core.lowrank import LowRankConv2d, LowRankLinear
from torch_dag.core.wsconv import WSConv2d
from torch_dag.finetuning.gates import Gate

# One or more instances per registered class, with non-default arguments wherever the class has them.
# A new registration without an entry here fails `test_every_registered_op_has_a_case`.
CASES: dict[str, Callable[[], nn.Module]] = {
    "Conv1d": lambda: nn.Conv1d(
        4, 6, 5, stride=2, padding=2, dilation=2, groups=2, bias=False, padding_mode="circular"
    ),
    "Conv2d": lambda: nn.Conv2d(
        4, 8, 3, stride=2, padding=1, dilation=1, groups=2, bias=False, padding_mode="reflect"
    ),
    "Conv2d_same": lambda: nn.Conv2d(4, 8, (3, 5), padding="same", dilation=(2, 1), padding_mode="replicate"),
    "Conv3d": lambda: nn.Conv3d(2, 4, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), groups=2),
    "ConvTranspose1d": lambda: nn.ConvTranspose1d(
        4, 6, 4, stride=2, padding=1, output_padding=1, groups=2, bias=False, dilation=2
    ),
    "ConvTranspose2d": lambda: nn.ConvTranspose2d(4, 8, 3, stride=2, padding=1, output_padding=1, groups=4),
    "ConvTranspose3d": lambda: nn.ConvTranspose3d(2, 4, (1, 2, 2), stride=(1, 2, 2), bias=False),
    "Linear": lambda: nn.Linear(5, 7, bias=False),
    "Bilinear": lambda: nn.Bilinear(3, 4, 5, bias=False),
    "Embedding": lambda: nn.Embedding(
        10, 4, padding_idx=-2, max_norm=1.5, norm_type=1.0, scale_grad_by_freq=True, sparse=True
    ),
    "BatchNorm1d": lambda: nn.BatchNorm1d(6, eps=1e-3, momentum=None, affine=False),
    "BatchNorm2d": lambda: nn.BatchNorm2d(6, eps=1e-3, momentum=0.2, track_running_stats=False),
    "BatchNorm3d": lambda: nn.BatchNorm3d(6, momentum=0.01),
    "LayerNorm": lambda: nn.LayerNorm((8,), eps=1e-3, elementwise_affine=False),
    "LayerNorm_no_bias": lambda: nn.LayerNorm((4, 8), bias=False),
    "GroupNorm": lambda: nn.GroupNorm(2, 8, eps=1e-4, affine=False),
    "InstanceNorm1d": lambda: nn.InstanceNorm1d(6, eps=1e-3, momentum=0.3, affine=True),
    "InstanceNorm2d": lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True),
    "InstanceNorm3d": lambda: nn.InstanceNorm3d(6, track_running_stats=True),
    "LocalResponseNorm": lambda: nn.LocalResponseNorm(3, alpha=1e-3, beta=0.5, k=2.0),
    "RMSNorm": lambda: nn.RMSNorm((6,), eps=1e-4, elementwise_affine=False),
    "RMSNorm_affine": lambda: nn.RMSNorm([2, 6]),
    "ReLU": lambda: nn.ReLU(inplace=True),
    "ReLU6": lambda: nn.ReLU6(inplace=True),
    "LeakyReLU": lambda: nn.LeakyReLU(0.2, inplace=True),
    "PReLU": lambda: nn.PReLU(6, init=0.1),
    "ELU": lambda: nn.ELU(alpha=0.5, inplace=True),
    "CELU": lambda: nn.CELU(alpha=2.0),
    "SELU": lambda: nn.SELU(inplace=True),
    "GELU": lambda: nn.GELU("tanh"),
    "SiLU": lambda: nn.SiLU(inplace=True),
    "Mish": lambda: nn.Mish(inplace=True),
    "Sigmoid": lambda: nn.Sigmoid(),
    "Tanh": lambda: nn.Tanh(),
    "Hardswish": lambda: nn.Hardswish(inplace=True),
    "Hardsigmoid": lambda: nn.Hardsigmoid(inplace=True),
    "Hardtanh": lambda: nn.Hardtanh(-2.0, 3.0, inplace=True),
    "Softplus": lambda: nn.Softplus(beta=2.0, threshold=10.0),
    "Softsign": lambda: nn.Softsign(),
    "Softmax": lambda: nn.Softmax(dim=1),
    "LogSoftmax": lambda: nn.LogSoftmax(dim=-2),
    "Softmax2d": lambda: nn.Softmax2d(),
    "GLU": lambda: nn.GLU(dim=1),
    "Tanhshrink": lambda: nn.Tanhshrink(),
    "Hardshrink": lambda: nn.Hardshrink(0.3),
    "Softshrink": lambda: nn.Softshrink(0.7),
    "Threshold": lambda: nn.Threshold(0.1, -1.0, inplace=True),
    "LogSigmoid": lambda: nn.LogSigmoid(),
    "Identity": lambda: nn.Identity(),
    "Dropout": lambda: nn.Dropout(0.3, inplace=True),
    "Dropout1d": lambda: nn.Dropout1d(0.2),
    "Dropout2d": lambda: nn.Dropout2d(0.1, inplace=True),
    "Dropout3d": lambda: nn.Dropout3d(0.4),
    "AlphaDropout": lambda: nn.AlphaDropout(0.25),
    "MaxPool1d": lambda: nn.MaxPool1d(3, stride=1, padding=1, dilation=2, return_indices=True),
    "MaxPool2d": lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
    "MaxPool3d": lambda: nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), dilation=(1, 2, 1), return_indices=True),
    "AvgPool1d": lambda: nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    "AvgPool2d": lambda: nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False, divisor_override=2),
    "AvgPool3d": lambda: nn.AvgPool3d((1, 2, 2), stride=(1, 1, 2), divisor_override=3),
    "AdaptiveAvgPool1d": lambda: nn.AdaptiveAvgPool1d(3),
    "AdaptiveAvgPool2d": lambda: nn.AdaptiveAvgPool2d((2, None)),
    "AdaptiveAvgPool3d": lambda: nn.AdaptiveAvgPool3d((1, 2, 3)),
    "AdaptiveMaxPool1d": lambda: nn.AdaptiveMaxPool1d(4, return_indices=True),
    "AdaptiveMaxPool2d": lambda: nn.AdaptiveMaxPool2d((None, 3)),
    "AdaptiveMaxPool3d": lambda: nn.AdaptiveMaxPool3d(2, return_indices=True),
    "LPPool1d": lambda: nn.LPPool1d(3.0, 2, stride=1, ceil_mode=True),
    "LPPool2d": lambda: nn.LPPool2d(1.5, (2, 3), stride=(1, 2)),
    "PixelShuffle": lambda: nn.PixelShuffle(3),
    "PixelUnshuffle": lambda: nn.PixelUnshuffle(2),
    "ChannelShuffle": lambda: nn.ChannelShuffle(4),
    "Fold": lambda: nn.Fold((6, 8), (2, 3), dilation=(1, 2), padding=1, stride=(2, 1)),
    "Unfold": lambda: nn.Unfold((2, 3), dilation=2, padding=(1, 0), stride=2),
    "MultiheadAttention": lambda: nn.MultiheadAttention(16, 4, batch_first=True, kdim=8, vdim=8),
    "MultiheadAttention_dropout": lambda: nn.MultiheadAttention(12, 3, dropout=0.1, add_zero_attn=True),
    "LSTM": lambda: nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True),
    "LSTM_proj": lambda: nn.LSTM(4, 6, bias=False, dropout=0.2, num_layers=2, proj_size=3),
    "GRU": lambda: nn.GRU(4, 6, num_layers=3, bias=False, batch_first=True, dropout=0.1, bidirectional=True),
    "RNN": lambda: nn.RNN(4, 6, nonlinearity="relu"),
    "RNN_deep": lambda: nn.RNN(4, 6, 2, "relu", False, True, 0.5, True),
    "Parameter": lambda: ops.Parameter((1, 3, 4), dtype=torch.float16, requires_grad=False),
    "Constant": lambda: ops.Constant((2, 5), dtype=torch.int64),
    "LowRankLinear": lambda: LowRankLinear(6, 5, rank=2, bias=False),
    "LowRankConv2d": lambda: LowRankConv2d(4, 8, (3, 5), rank=3, stride=2, padding=(1, 2), dilation=2),
    "WSConv2d": lambda: WSConv2d(
        4, 6, 3, stride=2, padding=1, groups=2, bias=False, gain=True, scale=0.3, eps=1e-6
    ),
    "WSConv2d_plain": lambda: WSConv2d(4, 6, (1, 3), padding="same", gain=False),
    "Gate": lambda: Gate(6, axis=2),
}

# Arguments the module does not keep as an attribute of the same name: the spec derives them from its
# state (MultiheadAttention's `bias` is `in_proj_bias is not None`).
DERIVED_CONFIG_CASES = {
    "MultiheadAttention_no_bias": lambda: nn.MultiheadAttention(8, 2, bias=False),
    "MultiheadAttention_bias_kv": lambda: nn.MultiheadAttention(8, 2, add_bias_kv=True),
}


def rebuild(module: nn.Module) -> nn.Module:
    spec = ops.MODULE_OPS[type(module)]
    return spec.build(spec.config(module))


def state_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def assert_rebuilds(module: nn.Module) -> None:
    rebuilt = rebuild(module)
    assert type(rebuilt) is type(module)
    assert rebuilt.extra_repr() == module.extra_repr()
    assert state_shapes(rebuilt) == state_shapes(module)
    assert ops.op_name(rebuilt) == ops.op_name(module) == ops.MODULE_OPS[type(module)].name


def test_every_registered_op_has_a_case():
    covered = {type(make()) for make in CASES.values()}
    missing = sorted(spec.name for cls, spec in ops.MODULE_OPS.items() if cls not in covered)
    assert not missing, f"registered module ops without a case in CASES: {missing}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_module_op_rebuilds_from_config(case):
    assert_rebuilds(CASES[case]())


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trips(case):
    """The config names only constructor parameters, and reading it back from the rebuilt module gives it again."""
    module = CASES[case]()
    spec = ops.MODULE_OPS[type(module)]
    config = spec.config(module)
    assert set(config) <= {p.name for p in spec.params}
    assert spec.config(spec.build(config)) == config


@pytest.mark.parametrize("case", sorted(DERIVED_CONFIG_CASES))
def test_derived_module_op_config(case):
    assert_rebuilds(DERIVED_CONFIG_CASES[case]())


@pytest.mark.parametrize("case", sorted(CASES))
def test_builds_of_one_config_share_no_container(case):
    """Builds copy one prototype per config: two of them share tensors (meta, to be replaced) but no
    dict, list or set (parameters, buffers, hooks, ...)."""
    module = CASES[case]()
    spec = ops.MODULE_OPS[type(module)]
    config = spec.config(module)
    first, second = spec.build(config), spec.build(config)
    for a, b in zip(first.modules(), second.modules(), strict=True):
        assert a is not b
        shared = [k for k, v in vars(a).items() if isinstance(v, (dict, list, set)) and v is vars(b)[k]]
        assert not shared, shared
    first.register_forward_hook(lambda *args: None)
    assert not second._forward_hooks and spec.config(second) == config


def test_configs_equal_in_value_but_not_in_type_build_apart():
    spec = ops.MODULE_OPS[nn.LayerNorm]
    assert type(spec.build({"normalized_shape": (4,), "eps": 1}).eps) is int
    assert type(spec.build({"normalized_shape": (4,), "eps": 1.0}).eps) is float


def test_built_modules_are_on_the_meta_device():
    built = rebuild(nn.Conv2d(3, 4, 3))
    assert all(p.is_meta for p in built.parameters())


def test_parameter_and_constant_keep_shape_dtype_and_grad():
    param = rebuild(ops.Parameter((2, 3), dtype=torch.float64, requires_grad=False))
    assert (param.shape, param.dtype, param.requires_grad) == ((2, 3), torch.float64, False)
    const = rebuild(ops.Constant((4,), dtype=torch.bool))
    assert (const.shape, const.dtype) == ((4,), torch.bool)
    assert [name for name, _ in const.named_buffers()] == ["value"]
    assert not list(const.parameters())


class Unregistered(nn.Module):
    def forward(self, x):
        return x


def test_duplicate_class_registration_raises():
    before = dict(ops.MODULE_OPS)
    with pytest.raises(ValueError, match="already registered"):
        td.register_module_op(nn.Conv2d)
    with pytest.raises(ValueError, match="already registered"):
        td.register_module_op(nn.Conv2d, name="MyConv")
    assert before == ops.MODULE_OPS


@pytest.mark.parametrize("name", ["Conv2d", "add", "Parameter"])
def test_duplicate_name_registration_raises(name):
    """A new class under a taken name (module op or function op) is refused and leaves no trace."""
    assert name in td.known_ops()
    with pytest.raises(ValueError, match=repr(name)):
        td.register_module_op(Unregistered, name=name)
    assert Unregistered not in ops.MODULE_OPS


def test_op_name_of_unregistered_class_names_it():
    with pytest.raises(td.UnknownOpError, match="Unregistered") as info:
        ops.op_name(Unregistered())
    assert "register_module_op" in str(info.value)


def test_unknown_function_op_lists_the_known_ones():
    with pytest.raises(td.UnknownOpError, match="'nope'") as info:
        ops.function_spec("nope")
    message = str(info.value)
    assert all(name in message for name in ("add", "cat", "reshape"))
    assert message.count(",") >= len(FUNCTIONS) - 1


def test_unknown_module_op_lists_the_known_ones():
    with pytest.raises(td.UnknownOpError, match="'Nope'") as info:
        ops.module_op_spec("Nope")
    assert "Conv2d" in str(info.value)
    assert "Constant" in str(info.value)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_function_op_has_a_callable(name):
    spec = ops.function_spec(name)
    assert spec.name == name
    assert callable(spec.fn)
    op = ops.FunctionOp(name)
    assert ops.op_name(op) == name
    assert ops.callable_of(op) is spec.fn
    assert not list(op.parameters()) and not list(op.buffers())


def test_known_ops_is_the_whole_vocabulary():
    known = td.known_ops()
    assert known == sorted(known)
    module_ops = {spec.name for spec in ops.MODULE_OPS.values()}
    assert set(known) == {*FUNCTIONS, *module_ops, *ops.CUSTOM_OPS, "DagModule"}
    assert {"Flex", "Mutable", "MutableElementwise"} <= set(ops.CUSTOM_OPS)
    assert len(known) == len(set(known))
