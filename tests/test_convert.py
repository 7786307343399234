"""Conversion of the hand-written zoo: equal outputs in eval, identical behaviour in training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dag as td
from tests.zoo import ZOO, convert, make
from torch_dag.core.compare import compare_outputs


@pytest.mark.parametrize("name", sorted(ZOO))
def test_eval_outputs_equal(name):
    model, inputs, dag = convert(name)
    td.verify(dag)
    with torch.no_grad():
        equal, _diff, reason = compare_outputs(model(*inputs), dag(*inputs))
    assert equal, reason


@pytest.mark.parametrize("name", sorted(ZOO))
def test_other_batch_size(name):
    """Shapes are not baked in: the DAG runs at a batch size it was not converted with."""
    model, inputs, dag = convert(name)
    if name == "recurrent":
        pytest.skip("LSTM example uses batch_first sequences; covered by the eval test")
    bigger = tuple(torch.cat([x, x[:1] * 0.5]) for x in inputs)
    with torch.no_grad():
        equal, _, reason = compare_outputs(model(*bigger), dag(*bigger))
    assert equal, reason


@pytest.mark.parametrize("name", sorted(ZOO))
def test_training_mode_matches_eager(name):
    """Same dropout draws, same batch-norm statistic updates, same gradients on the same parameters."""
    model, inputs = make(name)
    reference = copy.deepcopy(model).train()
    dag = td.build_from_unstructured_module(model, inputs).train()
    torch.manual_seed(1)
    expected = reference(*inputs)
    torch.manual_seed(1)
    actual = dag(*inputs)
    equal, _, reason = compare_outputs(expected, actual)
    assert equal, reason

    for ref_buffer, buffer in zip(reference.buffers(), model.buffers()):  # the DAG updated model's BN stats
        torch.testing.assert_close(buffer, ref_buffer, rtol=1e-5, atol=1e-6)

    if not list(model.parameters()):
        return

    def loss_of(out):
        leaves = torch.utils._pytree.tree_leaves(out)
        return sum(
            t.float().square().mean() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()
        )

    loss_of(expected).backward()
    loss_of(actual).backward()
    dag_params = dict(dag.named_parameters())
    assert len({id(p) for p in dag_params.values()}) == len(list(model.parameters()))
    for (name_, ref_param), param in zip(reference.named_parameters(), model.parameters()):
        assert (ref_param.grad is None) == (param.grad is None), name_
        if param.grad is not None:
            torch.testing.assert_close(param.grad, ref_param.grad, rtol=1e-4, atol=1e-6, msg=name_)


def test_dropout_is_active_in_training():
    _model, inputs, dag = convert("dropouts")
    dag.train()
    assert not torch.equal(dag(*inputs), dag(*inputs))
    dag.eval()
    assert torch.equal(dag(*inputs), dag(*inputs))


def test_every_spelling_is_one_op():
    _, _, dag = convert("spellings")
    ops = [v.op for v in dag]
    assert "add" in ops and "ReLU" in ops and "Sigmoid" in ops and "Softmax" in ops and "reshape" in ops
    adds = [v for v in dag if v.op == "add" and all(isinstance(a, td.Ref) for a in v.args)][:3]
    assert [(a.args, a.kwargs) for a in adds] == [((td.Ref("x"), td.Ref("y")), {"alpha": 1})] * 3
    assert not {"view", "relu", "sigmoid", "softmax"} & set(ops)


def test_shared_module_stays_shared():
    model, _, dag = convert("shared_module")
    linear_vertices = [v for v in dag if v.op == "Linear"]
    assert len(linear_vertices) == 2 and linear_vertices[0].module is linear_vertices[1].module
    assert len(list(dag.parameters())) == len(list(model.parameters()))


def test_functional_layers_on_own_weights_become_modules():
    model, inputs, dag = convert("functional_own_weights")
    ops = [v.op for v in dag]
    assert ops.count("Conv2d") == 1 and "BatchNorm2d" in ops and "LayerNorm" in ops
    # weight standardization (with and without gain) is one op holding the model's own tensors
    assert ops.count("WSConv2d") == 2 and "conv2d" not in ops and "batch_norm" not in ops, ops
    plain, scaled = [v.module for v in dag if v.op == "WSConv2d"]
    assert plain.gain is None and plain.bias is None and plain.weight is model.std_weight
    assert scaled.gain is model.gain and scaled.bias is model.scaled_bias and scaled.scale == 72**-0.5
    with torch.no_grad():
        assert torch.equal(dag(*inputs), model(*inputs))  # the same ops, in the same order


def test_functional_pooling_with_traced_sizes_stays_a_function():
    """timm's MobileNetV5 pools with a kernel computed from the input's shape: no module can hold it."""

    class Pool(torch.nn.Module):
        def forward(self, x):
            k = x.shape[-1] // 4
            return F.avg_pool2d(x, kernel_size=(k, k), stride=(k, k))

    x = torch.randn(2, 3, 16, 16)
    dag = td.build_from_unstructured_module(Pool(), (x,))
    assert "avg_pool2d" in [v.op for v in dag]
    torch.testing.assert_close(dag(x), Pool()(x), rtol=0, atol=0)


def test_in_place_ops_are_functionalized():
    _, _, dag = convert("in_place")
    assert "index_put" in [v.op for v in dag]
    assert all(not getattr(v.module, "inplace", False) for v in dag)


def test_guard_catches_a_different_branch():
    _model, _inputs, dag = convert("shape_arithmetic")
    assert "guard" in [v.op for v in dag]
    with pytest.raises(RuntimeError, match="guard failed"):
        dag(torch.randn(1, 3, 12, 12))  # 12 % 4 == 0 takes the other branch in the source model


def test_optional_input_baked_as_default():
    _model, _inputs, dag = convert("multi_input_outputs")
    assert dag.input_names == ["x", "y"]  # mask=None was not given, so it is not an input


def test_failed_vertex_is_named():
    dag = td.build_from_unstructured_module(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (torch.randn(2, 4),))
    with pytest.raises(RuntimeError) as info:
        dag(torch.randn(2, 5))
    assert any("vertex" in note and "Linear" in note for note in getattr(info.value, "__notes__", []))


def test_dags_of_one_structure_share_their_forward_and_keep_their_own_weights():
    x = torch.randn(2, 4)
    dags = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
        dags.append((model, td.build_from_unstructured_module(model, (x,))))
    (first_model, first), (second_model, second) = dags
    assert first.code == second.code and first._fn is second._fn  # compiled once
    with torch.no_grad():
        assert torch.equal(first(x), first_model(x)) and torch.equal(second(x), second_model(x))
        assert not torch.equal(first(x), second(x))
    with pytest.raises(RuntimeError) as info:  # errors still name the vertex of the DAG that raised
        second(torch.randn(2, 5))
    assert any("vertex" in note and "Linear" in note for note in getattr(info.value, "__notes__", []))


class _Untraceable(nn.Module):
    def forward(self, x):
        return x.numpy_not_a_method()


class _UnknownFunction(nn.Module):
    def forward(self, x):
        return torch.special.i0(x)


@pytest.mark.parametrize("model", [_UnknownFunction()])
def test_unknown_op_fails_loudly_with_node_and_target(model):
    with pytest.raises(td.ConversionError, match=r"fx node .*target"):
        td.build_from_unstructured_module(model, (torch.randn(2, 3),))


def test_symbolic_trace_without_example_inputs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    dag = td.build_from_unstructured_module(model)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(model(x), dag(x))


def test_conversion_does_not_touch_the_model_or_inputs():
    model, inputs = make("in_place")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = [x.clone() for x in inputs]
    model.train()
    td.build_from_unstructured_module(model, inputs)
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(snapshot, inputs))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_deepcopy_and_state_dict():
    _model, inputs, dag = convert("residual")
    clone = copy.deepcopy(dag)
    assert clone.vertex_modules["head"] is not dag.vertex_modules["head"]
    with torch.no_grad():
        assert torch.equal(clone(*inputs), dag(*inputs))
    clone.load_state_dict(dag.state_dict())


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model, inputs, dag = convert("residual")
    compiled = torch.compile(dag)
    with torch.no_grad():
        equal, _, reason = compare_outputs(model(*inputs), compiled(*inputs), rtol=1e-4)
    assert equal, reason


def test_input_rank_of_functional_softmax_dtype_kept_as_function():
    class M(nn.Module):
        def forward(self, x):
            return F.softmax(x, dim=-1, dtype=torch.float64)

    dag = td.build_from_unstructured_module(M(), (torch.randn(2, 3),))
    assert [v.op for v in dag] == ["softmax"]
    assert dag(torch.randn(2, 3)).dtype == torch.float64


class _ActivationInputReadLater(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        view = y.flatten(1)  # shares y's storage and is read after the activation
        return self.act(y).flatten(1).sum(1) + view.sum(1), self.act(self.conv(x) * 2)


def test_inference_runs_activations_in_place_only_where_safe():
    model = _ActivationInputReadLater().eval()
    x = torch.randn(2, 3, 8, 8)
    dag = td.build_from_unstructured_module(model, (x,))
    in_place = [v.name for v, a, b in zip(dag, dag._calls, dag._inference_calls) if a is not b]
    assert in_place == ["act_1"]  # the second ReLU reads a fresh product nobody else reads
    with torch.no_grad():
        equal, _, reason = compare_outputs(model(x), dag(x))
    assert equal, reason
    resnet_like = td.build_from_unstructured_module(make("residual")[0], make("residual")[1])
    assert any(a is not b for a, b in zip(resnet_like._calls, resnet_like._inference_calls))
