"""Time of `td.prune` (channel groups + importance + surgery, L2 criterion) on the CPU.

    python benchmarks/prune_time.py                          # resnet50, vit_base_patch16_224
    python benchmarks/prune_time.py --models convnext_tiny --repeats 5

Each model: timm, pretrained=False, default input size, batch 1; one untimed warm-up run, then the
median of `--repeats` runs of `td.prune(dag, 0.5, (x,))` (conversion not included).
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import torch_dag as td


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_base_patch16_224"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(1, *model.pretrained_cfg["input_size"])
        dag = td.build_from_unstructured_module(model, (x,))
        td.prune(dag, 0.5, (x,))
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            td.prune(dag, 0.5, (x,))
            seconds.append(time.perf_counter() - t0)
        print(
            f"{name:28s} prune to 50% FLOPs: median {statistics.median(seconds):.3f} s "
            f"(runs {', '.join(f'{s:.3f}' for s in seconds)})",
            flush=True,
        )


if __name__ == "__main__":
    main()
