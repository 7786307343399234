"""Time of each graph pass on timm models, and the CPU speedup of fold_batchnorm.

    python benchmarks/passes_bench.py                     # resnet50 convnext_tiny vit_base_patch16_224 efficientnet_b0
    python benchmarks/passes_bench.py --speedup-models resnet50 mobilenetv3_large_100 --runs 100

Pass times are medians of --repeats runs on a converted DAG (224x224); the speedup compares the DAG
with its folded copy at batch 1 and 8 in eval mode, interleaved in one process (median of --runs).
Rows go to benchmarks/results/passes.csv and benchmarks/results/fold_speedup.csv.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import timm
import torch
from torch import nn

import torch_dag as td
from torch_dag import passes as P
from torch_dag.core.compare import compare_outputs

RESULTS = Path(__file__).resolve().parent / "results"
PASSES = {
    "swap_activations": lambda d: P.swap_activations(
        d, {"relu": "hardswish", "gelu": "silu", "silu": "relu"}
    ),
    "insert_after (BN after lonely convs)": lambda d: P.insert_after(
        d,
        P.op(P.CONVS, where=P.not_followed_by(P.BATCH_NORMS)),
        lambda v: nn.BatchNorm2d(v.module.out_channels),
    ),
    "remove_identities": P.remove_identities,
    "dedupe_constants": P.dedupe_constants,
    "fold_batchnorm": P.fold_batchnorm,
    "nest_by_module(depth 2)": lambda d: P.nest_by_module(d, 2),
    "flatten(nested)": None,  # timed on the nested DAG
}


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_passes(names: list[str], repeats: int) -> list[dict]:
    rows = []
    for name in names:
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(1, *model.pretrained_cfg["input_size"])
        dag = td.build_from_unstructured_module(model, (x,))
        nested = P.nest_by_module(dag, 2)
        for pass_name, fn in PASSES.items():
            run = (lambda n=nested: P.flatten(n)) if fn is None else (lambda fn=fn, d=dag: fn(d))
            rows.append(
                {
                    "model": name,
                    "vertices": len(dag),
                    "pass": pass_name,
                    "seconds": round(median_seconds(run, repeats), 4),
                }
            )
            print(f"{name:24s} {pass_name:40s} {rows[-1]['seconds']:8.4f} s")
    return rows


def fold_speedup(names: list[str], runs: int, batches: list[int]) -> list[dict]:
    rows = []
    for name in names:
        model = timm.create_model(name, pretrained=False).eval()
        size = model.pretrained_cfg["input_size"]
        dag = td.build_from_unstructured_module(model, (torch.randn(1, *size),))
        folded = P.fold_batchnorm(dag)
        for batch in batches:
            x = torch.randn(batch, *size)
            with torch.inference_mode():
                assert compare_outputs(dag(x), folded(x), rtol=1e-4)[0], f"{name}: folding changed outputs"
                for _ in range(3):
                    dag(x), folded(x)
                times = {"dag": [], "folded": []}
                for i in range(runs):
                    for variant in ("dag", "folded") if i % 2 == 0 else ("folded", "dag"):
                        module = dag if variant == "dag" else folded
                        start = time.perf_counter()
                        module(x)
                        times[variant].append(time.perf_counter() - start)
            base, fast = statistics.median(times["dag"]), statistics.median(times["folded"])
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "threads": torch.get_num_threads(),
                    "dag_ms": round(base * 1e3, 3),
                    "folded_ms": round(fast * 1e3, 3),
                    "speedup": round(base / fast, 3),
                    "bn_removed": sum(v.op.startswith("BatchNorm") for v in dag)
                    - sum(v.op.startswith("BatchNorm") for v in folded),
                }
            )
            print(
                f"{name:24s} batch {batch:3d}: {rows[-1]['dag_ms']:9.2f} ms -> {rows[-1]['folded_ms']:9.2f} ms "
                f"(x{rows[-1]['speedup']:.3f}), {rows[-1]['bn_removed']} BatchNorms folded"
            )
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="*",
        default=["resnet50", "convnext_tiny", "vit_base_patch16_224", "efficientnet_b0"],
    )
    parser.add_argument("--speedup-models", nargs="*", default=["resnet50", "mobilenetv3_large_100"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    args = parser.parse_args()
    if args.models:
        write(RESULTS / "passes.csv", time_passes(args.models, args.repeats))
    if args.speedup_models:
        write(RESULTS / "fold_speedup.csv", fold_speedup(args.speedup_models, args.runs, args.batches))


if __name__ == "__main__":
    main()
