"""Realized CPU speed-up of pruning: latency of the pruned vs the unpruned DAG at half the FLOPs.

    python benchmarks/prune_latency.py                       # the six models, batch 1 and 32
    python benchmarks/prune_latency.py --models resnet50 --batches 1 --runs 50 --round-to 1

Each model: timm, pretrained=False, default input size; `td.prune(dag, 0.5, (x,))` with the L2
criterion (widths rounded to multiples of `--round-to`, default 8 as in `td.prune`); both DAGs timed
interleaved in one process, eval, inference_mode, all cores; median over runs. Rows go to
benchmarks/results/prune_latency.csv.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import timm
import torch
from timing import interleaved  # benchmarks/ is on sys.path when a script here runs

import torch_dag as td
from torch_dag.pruning import PruneConfig

OUT = Path(__file__).resolve().parent / "results" / "prune_latency.csv"
MODELS = [
    "resnet50",
    "mobilenetv3_large_100",
    "convnext_tiny",
    "vit_small_patch16_224",
    "efficientnet_b0",
    "regnety_016",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument(
        "--runs", type=int, default=40, help="timed calls per variant at batch 1 (fewer above)"
    )
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.5)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        size = tuple(model.pretrained_cfg["input_size"])
        x = torch.randn(1, *size)
        dag = td.build_from_unstructured_module(model, (x,))
        t0 = time.perf_counter()
        pruned = td.prune(dag, args.ratio, (x,), config=PruneConfig(round_to=args.round_to))
        prune_s = time.perf_counter() - t0
        flops = td.count_flops(pruned, x).total_flops / td.count_flops(dag, x).total_flops
        for batch in args.batches:
            runs = max(8, args.runs // max(1, batch // 4))
            with torch.inference_mode():
                times = interleaved({"unpruned": dag, "pruned": pruned}, torch.randn(batch, *size), runs, 3)
            medians = {k: statistics.median(v) / 1e6 for k, v in times.items()}
            row = {
                "model": name,
                "batch": batch,
                "flops_ratio": round(flops, 4),
                "round_to": args.round_to,
                "unpruned_ms": round(medians["unpruned"], 2),
                "pruned_ms": round(medians["pruned"], 2),
                "latency_ratio": round(medians["pruned"] / medians["unpruned"], 3),
                "runs": runs,
                "prune_s": round(prune_s, 2),
                "threads": torch.get_num_threads(),
            }
            rows.append(row)
            print(
                f"{name:24s} batch {batch:3d}: FLOPs {flops:.3f}  unpruned {row['unpruned_ms']:9.2f} ms  "
                f"pruned {row['pruned_ms']:9.2f} ms  latency ratio {row['latency_ratio']:.3f}  "
                f"(prune {prune_s:.2f} s)",
                flush=True,
            )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
