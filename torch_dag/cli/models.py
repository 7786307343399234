"""Models and inputs for the subcommands: a model spec loaded, a `.dag` file or a spec converted, example
inputs, calibration batches and batchnorm re-estimation."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch
from torch import nn

from .. import converters, finetuning, serde
from ..core.errors import DagError


def load_model(spec: str) -> nn.Module:
    """`timm:NAME` (pretrained=False) or `package.module:factory` (called with no arguments)."""
    source, sep, name = spec.partition(":")
    if not sep or not name:
        raise SystemExit(f"model spec {spec!r} must be 'timm:NAME' or 'package.module:factory'")
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise SystemExit("timm is not installed: pip install 'torch-dag[timm]'") from None
        try:
            return timm.create_model(name, pretrained=False)
        except RuntimeError as e:  # timm's "Unknown model"
            raise SystemExit(f"timm cannot build {name!r}: {e}") from None
    try:
        module = importlib.import_module(source)  # the user named this module on the command line
    except ImportError as e:
        raise SystemExit(f"cannot import {source!r} for model spec {spec!r}: {e}") from None
    factory = getattr(module, name, None)
    if factory is None:
        raise SystemExit(f"{source} has no attribute {name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise SystemExit(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def example_input(model: nn.Module, input_size: tuple[int, ...] | None, batch: int) -> torch.Tensor:
    """A random batch of `input_size` (default: the model's timm `pretrained_cfg`)."""
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "input_size" not in cfg:
            raise SystemExit("cannot tell the model's input size: pass --input-size, e.g. 3x224x224")
        input_size = tuple(cfg["input_size"])
    return torch.randn(batch, *input_size)


def load_or_convert(source: str, input_size: tuple[int, ...] | None) -> tuple:
    """A .dag file, or a model spec converted on the spot; with example inputs for analysis."""
    if Path(source).is_file():
        dag = serde.load(source)
        inputs = dag.example_inputs()
        if input_size:
            inputs = (torch.randn(inputs[0].shape[0], *input_size),)
        return dag, inputs
    model = load_model(source).eval()
    x = example_input(model, input_size, 1)
    return converters.build_from_unstructured_module(model, (x,)), (x,)


_NEEDS_CALIBRATION = "--recalibrate-bn re-estimates statistics on --calibration data: give --calibration"


def calibration_batches(args: argparse.Namespace) -> list[tuple[torch.Tensor]] | None:
    """Batches of `--calibration` (a .npy array of model inputs, loaded without pickle)."""
    if args.calibration is None:
        if getattr(args, "recalibrate_bn", False):
            raise DagError(_NEEDS_CALIBRATION)
        return None
    import numpy as np

    data = torch.from_numpy(np.load(args.calibration, allow_pickle=False)).float()
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
