"""Stateful forwards never convert to a silently different model: each module of `tests/zoo_stateful.py`
converts to a DAG equal to eager (outputs, gradients, inputs and buffers after several calls, in train
and eval mode) or is refused with a `ConversionError`; its outcome is the one the zoo labels it with."""

from __future__ import annotations

import copy

import pytest
import torch

import torch_dag as td
from tests.zoo_stateful import ZOO_STATEFUL


def _convert(model: torch.nn.Module, inputs: tuple, tracer: str) -> td.DagModule | td.ConversionError:
    try:
        return td.build_from_unstructured_module(model, inputs, tracer=tracer)
    except td.ConversionError as e:
        return e


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module, when: str) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n} {when}: {m}")


def _assert_equal_to_eager(model: torch.nn.Module, dag: td.DagModule, twin: torch.nn.Module, example: tuple):
    """`dag` shares its tensors with `twin`, a copy of `model`: run both side by side."""
    for training in (True, False, True):
        model.train(training)
        dag.train(training)
        for step in range(3):
            when = f"after call {step} in {'train' if training else 'eval'} mode"
            inputs = [torch.randn_like(x).requires_grad_() for x in example]
            copies = [x.detach().clone().requires_grad_() for x in inputs]
            expected, got = model(*[x.clone() for x in inputs]), dag(*[x.clone() for x in copies])
            torch.testing.assert_close(
                got, expected, rtol=1e-5, atol=1e-6, msg=lambda m, w=when: f"output {w}: {m}"
            )
            weights = torch.randn_like(expected)
            (expected * weights).sum().backward()
            (got * weights).sum().backward()
            for (name, p), q in zip(model.named_parameters(), twin.parameters()):
                torch.testing.assert_close(
                    q.grad, p.grad, msg=lambda m, n=name, w=when: f"grad of {n} {w}: {m}"
                )
            for x, y in zip(inputs, copies):
                torch.testing.assert_close(y.grad, x.grad, msg=lambda m, w=when: f"input grad {w}: {m}")
            model.zero_grad()
            twin.zero_grad()
            _assert_same_state(model, twin, when)


@pytest.mark.parametrize("tracer", ["auto", "fx", "export"])
@pytest.mark.parametrize("name", sorted(ZOO_STATEFUL))
def test_stateful_zoo_equal_or_refused(name, tracer):
    expected_outcome, factory, make_inputs = ZOO_STATEFUL[name]
    torch.manual_seed(0)
    model, example = factory(), make_inputs()
    twin = copy.deepcopy(model)
    result = _convert(twin, tuple(x.clone() for x in example), tracer)
    _assert_same_state(model, twin, "after conversion")  # converting never runs an update for real
    if isinstance(result, td.ConversionError):
        outcome = "refused"
    else:
        _assert_equal_to_eager(model, result, twin, example)  # a silent difference fails here
        outcome = "equal"
    if tracer == "export" and expected_outcome == "equal" and outcome == "refused":
        return  # the export path maps fewer programs (grad-mode regions, lifted constants, caches): refusing is fine
    assert outcome == expected_outcome, f"{name}: {outcome}, expected {expected_outcome}: {result}"


def test_zoo_is_large_and_labelled():
    outcomes = [outcome for outcome, _, _ in ZOO_STATEFUL.values()]
    assert len(outcomes) >= 30
    assert {"equal", "refused"} == set(outcomes)


@pytest.mark.parametrize(
    "name, words",
    [
        ("count_in_place", ["buffer 'count'", "add_", "self.count += 1", "Move the update out of forward"]),
        ("ema_mul_add", ["buffer 'buf'", "mul_", "zoo_stateful.py"]),
        ("parameter_under_no_grad", ["'lin.weight'", "mul_", "self.lin.weight.mul_(0.99)"]),
        ("train_only_count", ["buffer 'count'", "train mode"]),
        ("count_assigned", ["'count'", "self.count = self.count + 1"]),
        ("input_masked_fill", ["input 'x'", "masked_fill_", "clone the input"]),
    ],
)
def test_refusal_names_tensor_op_and_line(name, words):
    _, factory, make_inputs = ZOO_STATEFUL[name]
    with pytest.raises(td.ConversionError) as info:
        td.build_from_unstructured_module(factory(), make_inputs(), tracer="fx")
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_symbolic_trace_refuses_state_writes_too():
    """Without example inputs nothing runs: writes to state are found in the graph (views included)."""
    for name in ("count_in_place", "buffer_view_in_place", "parameter_under_no_grad", "input_masked_fill"):
        _, factory, _ = ZOO_STATEFUL[name]
        with pytest.raises(td.ConversionError):
            td.build_from_unstructured_module(factory(), tracer="fx")


def test_no_grad_region_becomes_detach_vertex():
    _, factory, make_inputs = ZOO_STATEFUL["no_grad_branch"]
    dag = td.build_from_unstructured_module(factory(), make_inputs())
    assert [v.op for v in dag].count("detach") == 1


def test_export_path_refuses_grad_mode_regions_by_name():
    _, factory, make_inputs = ZOO_STATEFUL["no_grad_branch"]
    with pytest.raises(td.ConversionError, match="switches grad mode"):
        td.build_from_unstructured_module(factory(), make_inputs(), tracer="export")
