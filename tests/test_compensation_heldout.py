"""Compensation never trusts in-sample error: pruning's (`PruneConfig(compensate=...)`) and a flexible
model's (`FlexConfig(compensate="lstsq")`) fit each layer on part of the calibration batches and keep a
solution only where its held-out error is not worse than the plain sliced weights'; a calibration set too
small for a layer is not re-solved, with a warning. The oracle: uncompensated pruning (and flexible
levels) on fresh inputs, with 1, 4 or 64 calibration samples."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import torch_dag as td
import torch_dag.flex as tf
from tests.zoo import make
from torch_dag.pruning import PruneConfig

timm = pytest.importorskip("timm")

# Compensation may lose to none on fresh inputs only by what choosing on a finite held-out sample can
# miss: each layer keeps the solution with the least held-out error, and two errors within that
# estimate's noise can swap on other inputs; layers are chosen one at a time on the unpruned model's
# inputs. A relative 5% of the uncompensated error (plus 1e-4 for errors near zero) bounds that; an
# overfitted re-solve (exact on the calibration rows, arbitrary elsewhere) is far outside it.
RELATIVE_MARGIN, ABSOLUTE_MARGIN = 0.05, 1e-4
SAMPLES = {1: (1, 1), 4: (2, 2), 64: (8, 8)}  # calibration samples -> (batches, samples per batch)
ZOO_MODELS = ["residual", "concat_split", "squeeze_excite", "attention"]
FAST_ZOO = {"squeeze_excite"}  # the others take over 3 s each: slow tier


def _like(inputs: tuple, n: int, g: torch.Generator) -> tuple:
    """Random inputs of the same form as `inputs` with `n` samples on axis 0."""
    return tuple(torch.randn(n, *x.shape[1:], generator=g) for x in inputs)


def _flat(out) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in pytree.tree_leaves(out) if t.is_floating_point()])


def _relative_error(small: nn.Module, dag: td.DagModule, inputs: tuple) -> float:
    with torch.no_grad():
        reference, out = _flat(dag(*inputs)), _flat(small(*inputs))
    return ((out - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def _data(inputs: tuple, samples: int) -> tuple[list[tuple], tuple]:
    g = torch.Generator().manual_seed(samples)
    count, size = SAMPLES[samples]
    return [_like(inputs, size, g) for _ in range(count)], _like(inputs, 16, g)


def _pruned_errors(dag: td.DagModule, inputs: tuple, samples: int, ratio: float) -> dict[str, float]:
    batches, fresh = _data(inputs, samples)
    errors = {}
    for how in ("none", "mean", "lstsq"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # too few rows for some layers: said, and tested below
            small = td.prune(dag, ratio, inputs, calibration=batches, config=PruneConfig(compensate=how))
        errors[how] = _relative_error(small, dag, fresh)
    return errors


def _never_worse(errors: dict[str, float]) -> None:
    bound = errors["none"] * (1 + RELATIVE_MARGIN) + ABSOLUTE_MARGIN
    assert errors["mean"] <= bound and errors["lstsq"] <= bound, errors


@pytest.mark.parametrize("samples", sorted(SAMPLES))
@pytest.mark.parametrize(
    "name", [n if n in FAST_ZOO else pytest.param(n, marks=pytest.mark.slow) for n in ZOO_MODELS]
)
def test_zoo_compensated_pruning_never_worse_on_fresh_inputs(name, samples):
    model, inputs = make(name)
    dag = td.build_from_unstructured_module(model, inputs)
    _never_worse(_pruned_errors(dag, inputs, samples, 0.6))


@pytest.mark.slow
@pytest.mark.parametrize("samples", sorted(SAMPLES))
def test_timm_compensated_pruning_never_worse_on_fresh_inputs(samples):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()  # tests/test_timm.py's SAMPLE
    inputs = (torch.randn(2, 3, 64, 64),)
    dag = td.build_from_unstructured_module(model, inputs)
    _never_worse(_pruned_errors(dag, inputs, samples, 0.6))


def _mlp() -> td.DagModule:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    return td.build_from_unstructured_module(model.eval(), (torch.randn(2, 64),))


def _batches(count: int, g: torch.Generator) -> list[tuple]:
    return [(torch.randn(8, 64, generator=g),) for _ in range(count)]


def test_too_few_rows_warn_with_the_batches_that_would_do():
    dag, g = _mlp(), torch.Generator().manual_seed(0)
    few = _batches(4, g)
    with pytest.warns(UserWarning, match="calibration batches like these would be enough") as record:
        td.prune(dag, 0.5, calibration=few, config=PruneConfig(compensate="lstsq"))
    (message,) = [str(w.message) for w in record if "calibration batches" in str(w.message)]
    assert "not re-solved" in message
    # too few rows for every layer: the least-squares solution is never used, mean's choice is kept
    short = td.prune(dag, 0.5, calibration=few, config=PruneConfig(compensate="lstsq"))
    mean = td.prune(dag, 0.5, calibration=few, config=PruneConfig(compensate="mean"))
    fresh = (torch.randn(64, 64, generator=g),)
    assert _relative_error(short, dag, fresh) == pytest.approx(_relative_error(mean, dag, fresh), rel=1e-6)
    needed = int(re.search(r"; (\d+) calibration batches", message).group(1))
    enough = _batches(needed, g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # that many batches: no layer is short of rows
        td.prune(dag, 0.5, calibration=enough, config=PruneConfig(compensate="lstsq"))
    with pytest.warns(UserWarning, match="calibration batches like these"):  # one fewer would not do
        td.prune(dag, 0.5, calibration=enough[:-1], config=PruneConfig(compensate="lstsq"))


# --- flexible models ------------------------------------------------------------------------------

LEVELS = (0.25, 0.5, 1.0)


def _flex_errors(dag: td.DagModule, inputs: tuple, samples: int) -> dict[str, list[float]]:
    """Per level, narrowest first, the relative output error on fresh inputs."""
    batches, fresh = _data(inputs, samples)
    errors = {}
    for how in ("none", "lstsq"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # too few rows for some layers: said, and tested below
            flex = tf.make_flexible(
                dag, LEVELS, inputs, calibration=batches, config=tf.FlexConfig(compensate=how)
            )
        errors[how] = []
        for level in range(flex.max_level() + 1):
            flex.set_level_use(level)
            errors[how].append(_relative_error(flex, dag, fresh))
    return errors


@pytest.mark.parametrize("samples", sorted(SAMPLES))
@pytest.mark.parametrize("name", ["mlp", "residual", "concat_split"])
def test_compensated_levels_never_worse_on_fresh_inputs(name, samples):
    """The levels below the top are never worse than uncompensated ones; the top level gives up its
    exactness by design (the shared weights fit all levels at once), by no more than what the narrow
    levels gain summed over the levels."""
    if name == "mlp":
        dag, inputs = _mlp(), (torch.randn(2, 64),)
    else:
        model, inputs = make(name)
        dag = td.build_from_unstructured_module(model, inputs)
    errors = _flex_errors(dag, inputs, samples)
    for none, lstsq in zip(errors["none"][:-1], errors["lstsq"][:-1]):
        assert lstsq <= none * (1 + RELATIVE_MARGIN) + ABSOLUTE_MARGIN, errors


def test_flexible_levels_warn_when_too_few_rows():
    dag, g = _mlp(), torch.Generator().manual_seed(0)
    with pytest.warns(
        UserWarning, match="keep their weights.*calibration batches like these would be enough"
    ):
        flex = tf.make_flexible(
            dag, LEVELS, calibration=_batches(4, g), config=tf.FlexConfig(compensate="lstsq")
        )
    plain = tf.make_flexible(dag, LEVELS, calibration=_batches(4, g))
    assert all(torch.equal(a, b) for a, b in zip(flex.state_dict().values(), plain.state_dict().values()))
