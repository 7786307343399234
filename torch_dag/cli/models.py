"""Models and inputs for the subcommands: a model spec loaded, a `.dag` file or a spec converted, example
inputs, calibration batches and batchnorm re-estimation."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch
from torch import nn

from .. import converters, finetuning, serde
from ..converters.inputs import InputsNotInferred
from ..core.dag import DagModule
from ..core.errors import DagError
from .values import load_array


def load_model(spec: str) -> nn.Module:
    """`timm:NAME` (pretrained=False) or `package.module:factory` (called with no arguments)."""
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise DagError(f"model spec {spec!r} must be 'timm:NAME' or 'package.module:factory'")
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise DagError("timm is not installed: pip install 'torch-dag[timm]'") from None
        try:
            return timm.create_model(name, pretrained=False)
        except RuntimeError as e:  # timm's "Unknown model"
            raise DagError(f"timm cannot build {name!r}: {e}") from None
    try:
        module = importlib.import_module(source)  # the user named this module on the command line
    except ImportError as e:
        raise DagError(f"cannot import {source!r} for model spec {spec!r}: {e}") from None
    factory = getattr(module, name, None)
    if factory is None:
        raise DagError(f"{source} has no attribute {name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise DagError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def example_input(model: nn.Module, input_size: tuple[int, ...] | None, batch: int) -> torch.Tensor:
    """A random batch of `input_size` (default: the model's timm `pretrained_cfg`; `convert_model`
    infers inputs for a model that has neither)."""
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "input_size" not in cfg:
            raise DagError("cannot tell the model's input size: pass --input-size, e.g. 3x224x224")
        input_size = tuple(cfg["input_size"])
    return torch.randn(batch, *input_size)


def check_runs(model: nn.Module, inputs: tuple, what: str) -> None:
    """Refuse inputs `model` cannot run on (the wrong number of dimensions or channels ...), naming
    `what` gave them, before any work: one sample, in eval mode, without gradients."""
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(*(x[:1] for x in inputs))
    except (RuntimeError, ValueError, IndexError, TypeError, DagError) as e:
        shapes = ", ".join("x".join(map(str, x.shape[1:])) for x in inputs)
        message = " ".join(str(e).split())
        raise DagError(f"{what} ({shapes} per sample): the model cannot run on it: {message}") from None
    finally:
        model.train(was)


def load_dag(path: Path | str, option: str) -> DagModule:
    """A .dag file named on the command line."""
    if not Path(path).is_file():
        raise DagError(f"{option} {path}: no such file")
    return serde.load(path)


def sized_inputs(dag: DagModule, input_size: tuple[int, ...] | None) -> tuple:
    """The DAG's example inputs, or random ones of `--input-size` (checked to run)."""
    inputs = dag.example_inputs()
    if input_size:
        inputs = (torch.randn(inputs[0].shape[0], *input_size),)
        check_runs(dag, inputs, f"--input-size {'x'.join(map(str, input_size))}")
    return inputs


def convert_model(model: nn.Module, input_size: tuple[int, ...] | None, batch: int = 1) -> tuple:
    """`model` converted, with the inputs it was converted on: of `--input-size` (or the timm
    `pretrained_cfg` size), else inferred by the converter from the layer that first reads them."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if input_size is None and "input_size" not in cfg:
        try:
            dag = converters.build_from_unstructured_module(model)
        except InputsNotInferred as e:
            reason = str(e).split(". Give them")[0]
            raise DagError(f"{reason}: pass --input-size, e.g. 3x224x224") from None
        try:  # traced symbolically: no shapes recorded
            return dag, dag.example_inputs()
        except DagError:
            raise DagError(
                f"{type(model).__name__} does not tell the size of its input; pass --input-size, e.g. 3x224x224"
            ) from None
    x = example_input(model, input_size, batch)
    check_runs(model, (x,), f"--input-size {'x'.join(map(str, x.shape[1:]))}")
    return converters.build_from_unstructured_module(model, (x,)), (x,)


def load_or_convert(source: str, input_size: tuple[int, ...] | None, option: str = "the source") -> tuple:
    """A .dag file, or a model spec converted on the spot; with example inputs for analysis."""
    if Path(source).is_file() or source.endswith(".dag"):
        dag = load_dag(source, option)
        return dag, sized_inputs(dag, input_size)
    return convert_model(load_model(source).eval(), input_size)


_NEEDS_CALIBRATION = "--recalibrate-bn re-estimates statistics on --calibration data: give --calibration"


def calibration_batches(args: argparse.Namespace) -> list[tuple[torch.Tensor]] | None:
    """Batches of `--calibration` (a .npy array of model inputs, loaded without pickle)."""
    if args.calibration is None:
        if getattr(args, "recalibrate_bn", False):
            raise DagError(_NEEDS_CALIBRATION)
        return None
    data = load_array(args.calibration, "--calibration").float()
    return [(chunk,) for chunk in data.split(args.batch_size)]


def recalibrate_if_asked(
    model: nn.Module, calibration: list[tuple[torch.Tensor]] | None, args: argparse.Namespace
) -> int | None:
    """With `--recalibrate-bn`, re-estimate `model`'s batchnorm statistics on the calibration batches."""
    if not args.recalibrate_bn:
        return None
    if calibration is None:  # `calibration_batches` raised this already
        raise DagError(_NEEDS_CALIBRATION)
    return finetuning.recalibrate_batchnorm(model, calibration)
