"""Output fidelity against measured latency: does latency pruning keep at least what FLOPs pruning keeps
at the same measured latency?

    python benchmarks/latency_fidelity.py                     # the six models of latency.py, batch 32
    python benchmarks/latency_fidelity.py --models resnet50 --rounds 1 --out /tmp/fidelity.csv

latency.py answers this with one FLOPs pruning matched to the latency pruning's latency, a point whose
own measurement noise (a few hundredths of the latency ratio on this machine) is as large as the
fidelity differences it is meant to show. Here each model (timm, pretrained=False, seeded as latency.py
seeds it, the steady allocator on) at the batch gets:
- `prune(dag, None, (x,), latency_ratio=0.5, latency_table=table)`, the table latency.py saved
  (results/latency_steady_tables/MODEL_bBATCH.json; built and saved when missing);
- `prune(dag, r, (x,))` for the FLOPs ratios r in `--flops` (a curve through the same latencies);
- all of them timed beside the unpruned DAG in one `compare_latency` run, `--rounds` times;
- fidelity on 32 random inputs (cosine of the logits with the unpruned DAG's, top-1 agreement).
The FLOPs curve's cosine at the latency pruning's measured latency is the least-squares line through the
curve's points within 0.1 of it (the three nearest when fewer), per round; `gap` is the latency
pruning's cosine minus that. Rows (one per model, batch, variant, round) go to
results/latency_fidelity.csv; a model with rows is skipped on a rerun.
"""

from __future__ import annotations

import argparse
import csv
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
from latency import FIDELITY_INPUTS, OUT, fidelity  # benchmarks/ is on sys.path when a script here runs
from prune_latency import MODELS

import torch_dag as td

CSV = Path(__file__).resolve().parent / "results" / "latency_fidelity.csv"
FIELDS = ["model", "batch", "variant", "round", "flops_ratio", "latency_ratio", "cosine", "top1_agreement"]
NEAR = 0.1  # FLOPs-curve points within this latency ratio of the latency pruning's make its line
TARGET = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--flops", type=float, nargs="+", default=[0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7])
    parser.add_argument("--rounds", type=int, default=2, help="independent side-by-side timings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=CSV)
    args = parser.parse_args()
    if not td.steady_allocator():
        raise SystemExit("this benchmark times with td.steady_allocator(), which needs glibc")
    done = {row["model"] for row in _read(args.out) if int(row["batch"]) == args.batch}
    for name in args.models:
        if name in done:
            print(f"{name}: done already", flush=True)
            continue
        start = time.perf_counter()
        rows = model_rows(name, args)
        _append(args.out, rows)
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    print(summary(_read(args.out), args.batch))


def model_rows(name: str, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    dag = td.build_from_unstructured_module(model, (x,))
    path = OUT["steady"].with_name(OUT["steady"].stem + "_tables") / f"{name}_b{args.batch}.json"
    if path.exists():
        table = td.LatencyTable.load(path)
    else:
        table = td.latency_table(dag, (x,), batch_size=args.batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
    variants = {"unpruned": dag}
    variants["latency"] = td.prune(dag, None, (x,), latency_ratio=TARGET, latency_table=table)
    with warnings.catch_warnings():  # a FLOPs target missed by a little is still a point of the curve
        warnings.simplefilter("ignore", UserWarning)
        for ratio in args.flops:
            variants[f"flops{ratio:g}"] = td.prune(dag, ratio, (x,))
    inputs = torch.randn(
        FIDELITY_INPUTS, *x.shape[1:], generator=torch.Generator().manual_seed(args.seed + 1)
    )
    with torch.inference_mode():
        reference = dag(inputs)
    full = td.count_flops(dag, x).total_flops
    kept = {
        k: {**fidelity(reference, m, inputs), "flops_ratio": td.count_flops(m, x).total_flops / full}
        for k, m in variants.items()
        if k != "unpruned"
    }
    rows = []
    for index in range(args.rounds):
        comparison = td.compare_latency(variants, (x,), batch_size=args.batch, runs=5, warmup=1)
        print(comparison.table("unpruned"), flush=True)
        for kind, values in kept.items():
            ratio = comparison.ratio(kind, "unpruned")
            rows.append(
                {"model": name, "batch": args.batch, "variant": kind, "round": index}
                | {"latency_ratio": round(ratio, 4), "flops_ratio": round(values["flops_ratio"], 4)}
                | {"cosine": values["cosine"], "top1_agreement": values["top1_agreement"]}
            )
    return rows


def curve_at(points: list[tuple[float, float]], latency: float) -> float:
    """The cosine of the FLOPs curve at `latency`: the line through its (latency, cosine) points within
    `NEAR` of it (the three nearest when fewer are)."""
    ordered = sorted(points, key=lambda p: abs(p[0] - latency))
    near = [p for p in ordered if abs(p[0] - latency) <= NEAR]
    used = near if len(near) >= 3 else ordered[:3]
    xs, ys = np.array([p[0] for p in used]), np.array([p[1] for p in used])
    if np.ptp(xs) < 1e-9:
        return float(ys.mean())
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(slope * latency + intercept)


def summary(rows: list[dict[str, str]], batch: int) -> str:
    lines = [
        f"{'model':24s} {'round':>5s} {'latency 0.5: latency (flops)':>28s} {'cosine':>7s} "
        f"{'flops curve there':>17s} {'gap':>7s}"
    ]
    for name in dict.fromkeys(r["model"] for r in rows if int(r["batch"]) == batch):
        mine = [r for r in rows if r["model"] == name and int(r["batch"]) == batch]
        for index in sorted({int(r["round"]) for r in mine}):
            at = {r["variant"]: r for r in mine if int(r["round"]) == index}
            goal = at.get("latency")
            if goal is None:
                continue
            points = [
                (float(r["latency_ratio"]), float(r["cosine"]))
                for k, r in at.items()
                if k.startswith("flops")
            ]
            latency, cosine = float(goal["latency_ratio"]), float(goal["cosine"])
            there = curve_at(points, latency)
            lines.append(
                f"{name:24s} {index:5d} {latency:17.3f} ({float(goal['flops_ratio']):.3f}) {cosine:7.3f} "
                f"{there:17.3f} {cosine - there:+7.3f}"
            )
    return "\n".join(lines)


def _read(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _append(path: Path, rows: list[dict]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
