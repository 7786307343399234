"""Pruning coverage of every timm model: prune to half the FLOPs, check the result.

    python benchmarks/timm_prune.py                       # the whole zoo, resumable, small models first
    python benchmarks/timm_prune.py --models resnet50 convnext_tiny
    python benchmarks/timm_prune.py --summary

A model is prunable when `td.prune(dag, 0.5, (x,))` runs, the pruned DAG keeps the output shapes, its
FLOPs (fvcore convention) are within 2 points of the target, and it round-trips bitwise through
save/load. Rows go to benchmarks/results/timm_prune.csv (same subprocess sweep as timm_coverage.py).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path

from _sweep import read_rows, sweep  # benchmarks/ is on sys.path when a script here runs
from timm_coverage import BIG, RESULTS, model_sizes

OUT = RESULTS / "timm_prune.csv"
FIELDS = [
    "model",
    "status",
    "stage",
    "params_m",
    "groups",
    "prunable_groups",
    "flops_ratio",
    "params_ratio",
    "prune_s",
    "shapes_kept",
    "roundtrip_equal",
    "error_class",
    "error",
]
STAGES = ["start", "build", "convert", "prune", "check", "done"]
TARGET = 0.5


def prune_model(name: str, stage) -> dict:
    import timm
    import torch

    import torch_dag as td
    from torch_dag.core.compare import bitwise_equal

    def at(s: str) -> None:
        stage.value = STAGES.index(s)

    at("build")
    torch.manual_seed(0)  # random weights decide the channel scores: the same ones every run
    try:
        model = timm.create_model(name, pretrained=False).eval()
    except Exception as e:
        return {"status": "build_error", "error_class": type(e).__name__, "error": str(e)[:300]}
    row = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    at("convert")
    try:
        dag = td.build_from_unstructured_module(model, (x,))
    except Exception as e:
        return {**row, "status": "convert_error", "error_class": type(e).__name__, "error": str(e)[:300]}
    groups = td.pruning.channel_groups(dag, (x,)).groups()
    row.update(groups=len(groups), prunable_groups=sum(g.prunable for g in groups))
    at("prune")
    start = time.perf_counter()
    try:
        pruned = td.prune(dag, TARGET, (x,))
    except Exception as e:
        return {**row, "status": "prune_error", "error_class": type(e).__name__, "error": str(e)[:300]}
    row["prune_s"] = round(time.perf_counter() - start, 2)
    at("check")
    before, after = td.count_flops(dag, x), td.count_flops(pruned, x)
    row.update(
        flops_ratio=round(after.total_flops / before.total_flops, 4),
        params_ratio=round(after.total_params / before.total_params, 4),
    )
    with torch.no_grad():
        reference, out = dag(x), pruned(x)
    row["shapes_kept"] = torch.utils._pytree.tree_map(
        lambda t: getattr(t, "shape", t), reference
    ) == torch.utils._pytree.tree_map(lambda t: getattr(t, "shape", t), out)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = td.load(td.save(pruned, Path(tmp) / "pruned.dag"))
        with torch.no_grad():
            row["roundtrip_equal"] = bitwise_equal(out, loaded(x))
    at("done")
    within = abs(row["flops_ratio"] - TARGET) <= 0.02
    ok = within and row["shapes_kept"] and row["roundtrip_equal"]
    reason = "" if ok else f"flops ratio {row['flops_ratio']}" if not within else "shape or round-trip check"
    return {
        **row,
        "status": "ok" if ok else "not_prunable",
        "error_class": "" if ok else "Target",
        "error": reason,
    }


def summarize(rows: dict[str, dict[str, str]]) -> str:
    statuses = collections.Counter(r["status"] for r in rows.values())
    converted = [r for r in rows.values() if r["status"] not in ("build_error", "convert_error")]
    ok = [r for r in converted if r["status"] == "ok"]
    times = sorted(float(r["prune_s"]) for r in ok if r.get("prune_s"))
    lines = [
        f"models: {len(rows)}, converted: {len(converted)}, prunable to {TARGET:.0%} FLOPs: {len(ok)} "
        f"= {100 * len(ok) / max(1, len(converted)):.1f}%",
        f"prune time: median {statistics.median(times):.2f} s, max {times[-1]:.2f} s" if times else "",
        "status counts: " + ", ".join(f"{k}={v}" for k, v in statuses.most_common()),
    ]
    failures = collections.Counter(r["error_class"] for r in converted if r["status"] != "ok")
    for cls, n in failures.most_common():
        examples = [r["model"] for r in converted if r["status"] != "ok" and r["error_class"] == cls][:4]
        lines.append(f"  {n:4d}  {cls:24s} e.g. {', '.join(examples)}")
    return "\n".join(line for line in lines if line)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--limit", type=int, help="only the N smallest models")
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    if not args.summary:
        import timm
        import torch  # noqa: F401  (imported once here; children are forked)

        import torch_dag  # noqa: F401

        names = args.models or timm.list_models()
        sizes = model_sizes(names)
        names = sorted(names, key=lambda n: sizes.get(n, -1))[: args.limit]
        sweep(
            names,
            prune_model,
            args.out,
            FIELDS,
            workers=args.workers,
            timeout=args.timeout,
            stages=STAGES,
            exclusive=lambda n: sizes.get(n, 0) > BIG,
        )
    print(summarize(read_rows(args.out)))


if __name__ == "__main__":
    main()
