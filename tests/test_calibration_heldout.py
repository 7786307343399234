"""Data-aware compression never trusts in-sample error: calibration is split into fitting and held-out
batches, the errors that choose ranks and solutions are held-out errors, a calibration set too small
for a layer falls back to the data-free solution with a warning, and data-aware factorization is never
worse than the truncated SVD on fresh inputs (the oracle) with 1, 4 or 64 calibration samples."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import torch_dag as td
from tests.zoo import ZOO, make
from torch_dag.passes import factorize
from torch_dag.passes.prepare import split_calibration

timm = pytest.importorskip("timm")

# Data-aware may lose to the SVD on fresh inputs only by what choosing on a finite held-out sample can
# miss: each rank takes the solution with the lesser held-out error, and two errors within the held-out
# estimate's noise can swap on other inputs. A relative 5% of the SVD's error (plus 1e-4 for errors
# near zero) bounds that noise; an overfitted solution (issue 25: 0.94 against ~0) is far outside it.
RELATIVE_MARGIN, ABSOLUTE_MARGIN = 0.05, 1e-4
SAMPLES = {1: (1, 1), 4: (2, 2), 64: (8, 8)}  # calibration samples -> (batches, samples per batch)


def _like(inputs: tuple, n: int, g: torch.Generator) -> tuple:
    """Random inputs of the same form as `inputs` with `n` samples on axis 0."""
    return tuple(torch.randn(n, *x.shape[1:], generator=g) for x in inputs)


def _flat(out) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in pytree.tree_leaves(out) if t.is_floating_point()])


def _relative_error(small: td.DagModule, dag: td.DagModule, inputs: tuple) -> float:
    with torch.no_grad():
        reference, out = _flat(dag(*inputs)), _flat(small(*inputs))
    return ((out - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def _aware_and_svd(dag: td.DagModule, inputs: tuple, samples: int, **target) -> tuple[float, float]:
    g = torch.Generator().manual_seed(samples)
    count, size = SAMPLES[samples]
    batches = [_like(inputs, size, g) for _ in range(count)]
    fresh = _like(inputs, 16, g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few rows for some layers: said, and tested below
        aware = factorize(dag, calibration=batches, example_inputs=inputs, **target)
    svd = factorize(dag, example_inputs=inputs, **target)
    return _relative_error(aware, dag, fresh), _relative_error(svd, dag, fresh)


@pytest.mark.parametrize("samples", sorted(SAMPLES))
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_data_aware_never_worse_than_svd_on_fresh_inputs(name, samples):
    model, inputs = make(name)
    dag = td.build_from_unstructured_module(model, inputs)
    aware, svd = _aware_and_svd(dag, inputs, samples, rank_ratio=0.4)
    assert aware <= svd * (1 + RELATIVE_MARGIN) + ABSOLUTE_MARGIN, (aware, svd)


@pytest.mark.slow
@pytest.mark.parametrize("samples", sorted(SAMPLES))
@pytest.mark.parametrize(
    "name, size", [("resnet18", 64), ("mobilenetv3_small_100", 64), ("convnext_atto", 64)]
)  # from tests/test_timm.py's SAMPLE, at small inputs
def test_timm_data_aware_never_worse_than_svd_on_fresh_inputs(name, size, samples):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, size, size)
    dag = td.build_from_unstructured_module(model, (x,))
    aware, svd = _aware_and_svd(dag, (x,), samples, flops_ratio=0.8)
    assert aware <= svd * (1 + RELATIVE_MARGIN) + ABSOLUTE_MARGIN, (aware, svd)


@pytest.mark.slow
def test_issue_25_convnext_tiny_classifier_no_longer_overfits():
    """torchvision's ConvNeXt-T, 4 calibration batches of 2, its classifier (768 inputs, 8 rows)
    factorized on purpose: the report's errors are held-out and the model is no worse than the SVD."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    dag = td.build_from_unstructured_module(model, (x,))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 64, 64, generator=g),) for _ in range(4)]
    with pytest.warns(UserWarning, match="use the data-free solution"):
        small, report = factorize(
            dag, 0.7, calibration=batches, example_inputs=(x,), protect_outputs=False, return_report=True
        )
    head = next(layer for layer in report.layers if layer.name == "classifier_2")
    assert head.rank is None or head.solution.startswith("svd")
    svd = factorize(dag, 0.7, example_inputs=(x,), protect_outputs=False)
    fresh = (torch.randn(8, 3, 64, 64, generator=g),)
    aware_error, svd_error = _relative_error(small, dag, fresh), _relative_error(svd, dag, fresh)
    assert aware_error <= svd_error * (1 + RELATIVE_MARGIN) + ABSOLUTE_MARGIN, (aware_error, svd_error)
    assert report.error_kind == "held-out" and "held-out" in report.table()


def _mlp() -> td.DagModule:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    return td.build_from_unstructured_module(model.eval(), (torch.randn(2, 64),))


def test_split_calibration():
    batches = tuple((torch.full((2, 3), float(i)),) for i in range(8))
    split = split_calibration(batches)
    assert [b[0][0, 0].item() for b in split.held] == [3, 7] and len(split.fit) == 6
    assert [b[0][0, 0].item() for b in split_calibration(batches[:3]).held] == [2]
    one = split_calibration(((torch.arange(8.0)[:, None].expand(8, 3), torch.tensor(1.0)),))
    assert one.fit[0][0][:, 0].tolist() == [0, 1, 2, 3, 4, 5] and one.held[0][0][:, 0].tolist() == [6, 7]
    assert one.fit[0][1] is one.held[0][1]  # what has no sample axis goes to both
    single = split_calibration(((torch.randn(1, 3),),))
    assert single.held == () and [part for part, _ in single.parts()] == ["split"]


def test_too_few_rows_warn_with_the_batches_that_would_do():
    dag = _mlp()
    g = torch.Generator().manual_seed(0)
    few = [(torch.randn(8, 64, generator=g),) for _ in range(4)]
    with pytest.warns(UserWarning, match="calibration batches like these would be enough") as record:
        _, report = factorize(dag, rank_ratio=0.3, calibration=few, return_report=True)
    needed = int(re.search(r"; (\d+) calibration batches", str(record[0].message)).group(1))
    assert all(layer.solution.startswith("svd") for layer in report.factorized)
    enough = [(torch.randn(8, 64, generator=g),) for _ in range(needed)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # that many batches: no layer is short of rows
        factorize(dag, rank_ratio=0.3, calibration=enough)
    with pytest.warns(UserWarning, match="calibration batches like these"):  # one fewer would not do
        factorize(dag, rank_ratio=0.3, calibration=enough[:-1])


def test_output_layers_are_protected_by_default():
    dag = _mlp()
    _, report = factorize(dag, rank_ratio=0.3, return_report=True)
    reasons = {layer.name: layer.reason for layer in report.layers}
    last = [layer.name for layer in report.layers][-1]
    assert "produces the output" in reasons[last] and "protect_outputs=False" in reasons[last]
    assert all(not reason for name, reason in reasons.items() if name != last)
    small = factorize(dag, rank_ratio=0.3, protect_outputs=False)
    assert small[last].op == "LowRankLinear"


def test_reported_errors_are_errors_on_the_held_out_batch():
    """4 batches: the 4th is held out; each layer's reported error is its output error there."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 48)
    dag = td.build_from_unstructured_module(nn.Sequential(layer, nn.ReLU()), (torch.randn(2, 32),))
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(32, 32, generator=g) * torch.logspace(0, -2, 32)
    batches = [(torch.randn(64, 32, generator=g) @ mix,) for _ in range(4)]
    small, report = factorize(
        dag, rank_ratio=0.25, calibration=batches, protect_outputs=False, return_report=True
    )
    (factorized,) = report.factorized
    module = small[factorized.name].module
    (held,) = batches[3]
    with torch.no_grad():
        want = held @ layer.weight.T
        got = module(held) - layer.bias
    assert factorized.error == pytest.approx(((got - want).norm() / want.norm()).item(), rel=1e-3)
    assert report.error_kind == "held-out" and "held-out" in report.table()
