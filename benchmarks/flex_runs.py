"""How contiguous the levels of `make_flexible` are: runs of channel positions per cut, with and without
sorting channels by importance first, and that each level equals its plain copy.

    python benchmarks/flex_runs.py
    python benchmarks/flex_runs.py --models resnet18 swin_tiny_patch4_window7_224
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import timm
import torch

import torch_dag as td
from torch_dag import flex as tf
from torch_dag.flex.modules import index_runs

MODELS = [
    "resnet18",
    "vit_tiny_patch16_224",
    "efficientnet_b0",
    "convnext_atto",
    "ghostnet_050",
    "regnety_002",
    "swin_tiny_patch4_window7_224",
]


def mean_runs(flex: tf.FlexDagModule) -> float:
    """Mean number of runs in the index sets of the narrower levels' cuts."""
    counts = [
        len(index_runs(index))
        for v in flex.flex_vertices()
        for cuts in v.module.cuts[:-1]
        for axes in cuts.values()
        for _, index in axes
    ]
    return float(np.mean(counts))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()
    print(
        f"{'model':32s} {'make s':>7s} {'runs sorted':>12s} {'runs unsorted':>14s} {'levels == plain':>16s} "
        f"{'top |diff|':>10s}"
    )
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(1, *model.pretrained_cfg["input_size"])
        dag = td.build_from_unstructured_module(model, (x,))
        t0 = time.perf_counter()
        flex = tf.make_flexible(dag, [0.25, 0.5, 1.0], (x,))
        seconds = time.perf_counter() - t0
        unsorted = tf.make_flexible(dag, [0.25, 0.5, 1.0], (x,), config=tf.FlexConfig(reorder=False))
        with torch.no_grad():
            equal = True
            for level in range(flex.max_level() + 1):
                flex.set_level_use(level)
                equal &= torch.equal(flex(x), flex.make_base_copy()(x))
            diff = (flex(x) - dag(x)).abs().max().item()
        print(
            f"{name:32s} {seconds:7.2f} {mean_runs(flex):12.2f} {mean_runs(unsorted):14.2f} {equal!s:>16s} "
            f"{diff:10.2e}"
        )


if __name__ == "__main__":
    main()
