"""Checked option values: argparse types that refuse nonsense with the accepted range, output paths
checked before any work, and .npy arrays loaded without pickle. Every refusal is a user error: one line
on stderr, exit status 2 (see `main`)."""

from __future__ import annotations

import argparse
import itertools
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DagError


def parse_size(text: str) -> tuple[int, ...]:
    """`3x224x224` -> (3, 224, 224); every size a positive integer."""
    try:
        sizes = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 3x224x224, got {text!r}") from None
    if not all(0 < s <= 1 << 20 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected sizes like 3x224x224, each from 1 to 2**20, got {text!r}")
    return sizes


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from `low` (to `high`)."""
    accepted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
        return value

    return parse


def number(
    *, low: float | None = None, above: float | None = None, high: float | None = None
) -> Callable[[str], float]:
    """An argparse type: a finite number >= `low` (or > `above`), <= `high`."""
    bounds = [f">= {low:g}" if low is not None else "", f"> {above:g}" if above is not None else ""]
    bounds.append(f"<= {high:g}" if high is not None else "")
    accepted = "a finite number" + "".join(f" {b}" for b in bounds if b).replace(" <=", " and <=", 1)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}") from None
        if (
            not math.isfinite(value)
            or (low is not None and value < low)
            or (above is not None and value <= above)
            or (high is not None and value > high)
        ):
            raise argparse.ArgumentTypeError(f"expected {accepted}, got {text!r}")
        return value

    return parse


FRACTION = number(above=0.0, high=1.0)  # a ratio to keep: (0, 1]


def increasing_fractions(option: str, values: list[float] | None) -> None:
    """Levels narrowest first: each in (0, 1], strictly increasing (two equal levels are one level)."""
    if values and any(b <= a for a, b in itertools.pairwise(values)):
        shown = " ".join(f"{v:g}" for v in values)
        raise DagError(f"{option} {shown}: expected distinct values in increasing order, e.g. 0.25 0.5 1.0")


def check_output(path: Path, option: str) -> None:
    """Refuse an output path where nothing can be written, before any work: a folder, a path through a
    file, a folder this process may not write into."""
    if path.is_dir():
        raise DagError(f"{option} {path} is a folder: give a file path, e.g. {path / 'model.dag'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DagError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DagError(f"{option} {path}: no permission to write into {parent}")


def check_outputs(args: argparse.Namespace) -> None:
    """The output options of any subcommand."""
    for attribute, option in (("output", "-o/--output"), ("delta_file", "--delta-file")):
        path = getattr(args, attribute, None)
        if path is not None:
            check_output(path, option)


def load_array(path: Path, option: str) -> torch.Tensor:
    """A .npy array of at least one sample (loaded without pickle), as a tensor."""
    if not path.is_file():
        raise DagError(f"{option} {path}: no such file (expected a .npy array written by numpy.save)")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DagError(
            f"{option} {path} is not a .npy array ({_first_line(e)}): write one with numpy.save"
        ) from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise DagError(f"{option} {path} is an .npz archive: give one array written by numpy.save")
    if array.ndim < 1 or len(array) == 0 or array.dtype.kind not in "biuf":
        raise DagError(
            f"{option} {path} holds a {array.dtype} array of shape {array.shape}: expected numbers, "
            "N samples along the first axis (N >= 1)"
        )
    return torch.from_numpy(array)


def load_labels(path: Path, samples: int) -> torch.Tensor:
    """A .npy array of one integer class label per sample of --data (`samples` of them), as int64."""
    labels = load_array(path, "--labels")
    if labels.ndim != 1 or labels.is_floating_point() or len(labels) != samples:
        raise DagError(
            f"--labels {path}: expected {samples} integer class labels (one per sample of --data), got a "
            f"{labels.dtype} array of shape {tuple(labels.shape)}"
        )
    return labels.long()


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
