"""torch-dag vs Torch-Pruning, side by side, on the CI timm sample (tests/test_timm.py's SAMPLE).

    pip install -e ".[bench]"                        # torch-pruning: a benchmark extra only
    python benchmarks/torch_pruning_compare.py       # rows in benchmarks/results/torch_pruning_compare.csv
    python benchmarks/torch_pruning_compare.py --summary

Per model (timm, pretrained=False, the sample's input size, batch 1, eval), each tool prunes to half the
FLOPs with the L2 magnitude criterion, global ranking, no width rounding:
- torch-dag: `td.prune(dag, 0.5, (x,), config=PruneConfig(criterion="l2", round_to=1))`;
- Torch-Pruning: `MetaPruner(GroupMagnitudeImportance(p=2), global_pruning=True)`, the model's classifier
  ignored, its `pruning_ratio` bisected (8 steps) until the FLOPs are closest to half, then run once more
  at the best ratio.
Times: torch-dag's is the median of three whole `prune` calls (bisection included); Torch-Pruning's `tp_s`
is the median of its nine runs (one run at one ratio), `tp_search_s` their sum: what reaching a FLOPs
target costs with it (our FLOP counts between the runs not included).
FLOPs are counted the same way for both (fvcore convention, torch-dag's counter on the converted model).
A tool "prunes" a model when it runs, keeps the output shape and lands within 2 points of 50%. Fidelity:
relative output error ||f'(x) - f(x)|| / ||f(x)|| on 8 random inputs (random weights: a consistency
figure, not accuracy). Each model runs in a forked subprocess with a timeout, resumable.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

from _sweep import read_rows, sweep  # benchmarks/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "torch_pruning_compare.csv"
FIELDS = [
    "model",
    "status",
    "stage",
    "input_size",
    "td_ok",
    "td_flops",
    "td_s",
    "td_error",
    "tp_ok",
    "tp_flops",
    "tp_s",
    "tp_search_s",
    "tp_error",
    "tp_ratio",
    "td_fail",
    "tp_fail",
    "error_class",
    "error",
]
STAGES = ["start", "torch_dag", "torch_pruning", "done"]
TARGET, TOLERANCE = 0.5, 0.02


def check_model(name: str, stage, size: int) -> dict:
    import copy

    import timm
    import torch

    import torch_dag as td
    from torch_dag.pruning import PruneConfig

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, 3, size, size)
    probe = torch.randn(8, 3, size, size)
    dag = td.build_from_unstructured_module(model, (x,))
    base_flops = td.count_flops(dag, x).total_flops
    with torch.no_grad():
        reference = model(probe)
    row = {"input_size": f"3x{size}x{size}"}

    def fidelity(fn) -> float:
        with torch.no_grad():
            return ((fn(probe) - reference).norm() / reference.norm()).item()

    def flops_of(module) -> float:
        return td.count_flops(td.build_from_unstructured_module(module, (x,)), x).total_flops / base_flops

    stage.value = STAGES.index("torch_dag")
    try:
        seconds = []
        for _ in range(3):
            t0 = time.perf_counter()
            pruned = td.prune(dag, TARGET, (x,), config=PruneConfig(criterion="l2", round_to=1))
            seconds.append(time.perf_counter() - t0)
        row["td_s"] = round(statistics.median(seconds), 3)
        ratio = td.count_flops(pruned, x).total_flops / base_flops
        with torch.no_grad():
            shape_kept = pruned(probe).shape == reference.shape
        row.update(
            td_flops=round(ratio, 4),
            td_error=round(fidelity(pruned), 5),
            td_ok=shape_kept and abs(ratio - TARGET) <= TOLERANCE,
        )
        if not row["td_ok"]:
            row["td_fail"] = f"FLOPs ratio {ratio:.3f}" if shape_kept else "output shape changed"
    except Exception as e:
        row.update(td_ok=False, td_fail=f"{type(e).__name__}: {e}"[:200].replace("\n", " "))

    stage.value = STAGES.index("torch_pruning")
    import torch_pruning as tp

    def tp_prune(ratio: float) -> tuple[torch.nn.Module, float]:
        """A pruned copy of the model and the seconds Torch-Pruning took (graph analysis + pruning)."""
        candidate = copy.deepcopy(model)
        classifier = candidate.get_classifier() if hasattr(candidate, "get_classifier") else None
        ignored = [classifier] if isinstance(classifier, torch.nn.Module) else []
        t0 = time.perf_counter()
        pruner = tp.pruner.MetaPruner(
            candidate,
            x,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            global_pruning=True,
            pruning_ratio=ratio,
            ignored_layers=ignored,
        )
        pruner.step()
        return candidate.eval(), time.perf_counter() - t0

    try:
        low, high, best, seconds = 0.0, 0.95, None, []
        for _ in range(8):
            ratio = (low + high) / 2
            candidate, took = tp_prune(ratio)
            kept = flops_of(candidate)
            seconds.append(took)
            if best is None or abs(kept - TARGET) < abs(best[1] - TARGET):
                best = (ratio, kept)
            low, high = (ratio, high) if kept > TARGET else (low, ratio)
        pruned_tp, took = tp_prune(best[0])
        seconds.append(took)
        row.update(tp_s=round(statistics.median(seconds), 3), tp_search_s=round(sum(seconds), 3))
        with torch.no_grad():
            shape_kept = pruned_tp(probe).shape == reference.shape
        row.update(
            tp_ratio=round(best[0], 4),
            tp_flops=round(best[1], 4),
            tp_error=round(fidelity(pruned_tp), 5),
            tp_ok=shape_kept and abs(best[1] - TARGET) <= TOLERANCE,
        )
        if not row["tp_ok"]:
            row["tp_fail"] = f"FLOPs ratio {best[1]:.3f}" if shape_kept else "output shape changed"
    except Exception as e:
        row.update(tp_ok=False, tp_fail=f"{type(e).__name__}: {e}"[:200].replace("\n", " "))
    stage.value = STAGES.index("done")
    return {**row, "status": "done"}


def summarize(rows: dict[str, dict[str, str]]) -> str:
    done = [r for r in rows.values() if r["status"] == "done"]
    td_ok = [r for r in done if r["td_ok"] == "True"]
    tp_ok = [r for r in done if r["tp_ok"] == "True"]
    both = [r for r in done if r["td_ok"] == "True" and r["tp_ok"] == "True"]
    lines = [
        f"models: {len(rows)} ({len(done)} finished; others: "
        f"{dict(collections.Counter(r['status'] for r in rows.values() if r['status'] != 'done'))})",
        f"prunable to 50% FLOPs (+-2 points, output shape kept): torch-dag {len(td_ok)} / {len(done)}, "
        f"Torch-Pruning {len(tp_ok)} / {len(done)}",
    ]
    if both:
        td_s = statistics.median(float(r["td_s"]) for r in both)
        tp_s = statistics.median(float(r["tp_s"]) for r in both)
        td_e = statistics.median(float(r["td_error"]) for r in both)
        tp_e = statistics.median(float(r["tp_error"]) for r in both)
        better = sum(float(r["td_error"]) <= float(r["tp_error"]) for r in both)
        faster = sum(float(r["td_s"]) < float(r["tp_s"]) for r in both)
        lines += [
            f"on the {len(both)} models both prune: median time torch-dag {td_s:.2f} s, Torch-Pruning "
            f"{tp_s:.2f} s (one run at one ratio); torch-dag faster on {faster} / {len(both)}"
        ]
        searched = [r for r in both if r.get("tp_search_s")]
        if searched:
            lines.append(
                f"  Torch-Pruning's runs to reach half the FLOPs, summed: median "
                f"{statistics.median(float(r['tp_search_s']) for r in searched):.2f} s "
                f"({len(searched)} models)"
            )
        lines.append(
            f"  median relative output error torch-dag {td_e:.3f}, Torch-Pruning {tp_e:.3f}; torch-dag's "
            f"is lower or equal on {better} / {len(both)}"
        )
    for tool in ("td", "tp"):
        failed = [r for r in done if r[f"{tool}_ok"] != "True"]
        if failed:
            lines.append(f"{'torch-dag' if tool == 'td' else 'Torch-Pruning'} does not prune:")
            lines += [f"  {r['model']:32s} {r[f'{tool}_fail'][:110]}" for r in failed]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", help="names from the sample (default: all of it)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    if not args.summary:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_timm import SAMPLE

        sizes = dict(SAMPLE)
        names = args.models or [n for n, _ in SAMPLE]
        sweep(
            names,
            lambda name, stage: check_model(name, stage, sizes[name]),
            OUT,
            FIELDS,
            workers=args.workers,
            timeout=args.timeout,
            stages=STAGES,
        )
    print(summarize(read_rows(OUT)))


if __name__ == "__main__":
    main()
