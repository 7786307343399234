"""Conversion time and forward overhead of a DagModule against the eager timm model, on the CPU.

    python benchmarks/timing.py                                 # resnet50, vit_small_patch16_224
    python benchmarks/timing.py --models resnet18 --runs 20 --no-compile
    python benchmarks/timing.py --batches 1 8 --threads 1

Eager, DAG and torch.compile(dag) run interleaved in one process (A B C, then C B A, ...), each call timed
alone with perf_counter_ns in eval mode under torch.inference_mode(), with the garbage collector paused
(as timeit does). Every run is kept. Overhead % = (median_variant / median_eager - 1) * 100, with a 95%
interval from a paired bootstrap over rounds. Rows go to benchmarks/results/timing.csv, one per
(model, batch, variant); `setup_s` is the median conversion time (dag) or the first-call compile time.
"""

from __future__ import annotations

import argparse
import csv
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import timm
import torch

import torch_dag as td
from torch_dag.core.compare import compare_outputs

OUT = Path(__file__).resolve().parent / "results" / "timing.csv"
COMPILED_RTOL = 1e-4  # compiled kernels reorder float math


@dataclass
class Row:
    model: str
    batch: int
    variant: str  # eager | dag | compiled
    threads: int
    runs: int = 0
    median_ms: float | None = None
    p25_ms: float | None = None
    p75_ms: float | None = None
    overhead_pct: float | None = None
    ci95_lo_pct: float | None = None
    ci95_hi_pct: float | None = None
    setup_s: float | None = None
    max_abs_diff: float | None = None
    error: str = ""


def time_conversion(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[td.DagModule, float]:
    """Median seconds of `build_from_unstructured_module` over `repeats` runs after one warm-up."""
    dag = td.build_from_unstructured_module(model, (x,))
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dag = td.build_from_unstructured_module(model, (x,))
        seconds.append(time.perf_counter() - t0)
    return dag, statistics.median(seconds)


def interleaved(fns: dict[str, Callable], x: torch.Tensor, runs: int, warmup: int) -> dict[str, list[int]]:
    """Nanoseconds per call of each function, alternating the order every round so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    names, times = list(fns), {name: [] for name in fns}
    gc.collect()
    gc.disable()
    try:
        for r in range(runs):
            for name in names if r % 2 == 0 else reversed(names):
                t0 = time.perf_counter_ns()
                fns[name](x)
                times[name].append(time.perf_counter_ns() - t0)
    finally:
        gc.enable()
    return times


def overhead_interval(eager: list[int], other: list[int], resamples: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the overhead %, resampling whole rounds (the pairs were timed together)."""
    a, b = torch.tensor(eager, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)
    idx = torch.randint(len(a), (resamples, len(a)), generator=torch.Generator().manual_seed(0))
    ratios = (b[idx].quantile(0.5, dim=1) / a[idx].quantile(0.5, dim=1) - 1) * 100
    lo, hi = ratios.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def checked(fn: Callable, x: torch.Tensor, reference: Any, rtol: float) -> tuple[bool, float, float, str]:
    """Run `fn` once (this call includes any lazy compilation): (ran, seconds, max abs diff, error or '')."""
    t0 = time.perf_counter()
    try:
        out = fn(x)
    except Exception as e:
        return (
            False,
            time.perf_counter() - t0,
            float("nan"),
            f"{type(e).__name__}: {e}".replace("\n", " ")[:500],
        )
    seconds = time.perf_counter() - t0
    equal, diff, reason = compare_outputs(reference, out, rtol=rtol)
    return True, seconds, diff, "" if equal else f"outputs differ: {reason}"


def bench_model(name: str, args: argparse.Namespace) -> list[Row]:
    model = timm.create_model(name, pretrained=False).eval()
    input_size = tuple(model.pretrained_cfg["input_size"])
    dag, convert_s = time_conversion(model, torch.randn(1, *input_size), args.repeats)
    dag.eval()
    rows: list[Row] = []
    for batch in args.batches:
        x = torch.randn(batch, *input_size)
        variants = ["eager", "dag", "compiled"] if args.compile else ["eager", "dag"]
        row = {v: Row(name, batch, v, args.threads) for v in variants}
        row["dag"].setup_s = convert_s
        fns = {"eager": model}
        with torch.inference_mode():
            reference = model(x)
            row["eager"].max_abs_diff = 0.0
            candidates = {"dag": (dag, 1e-5)}
            if args.compile:
                torch._dynamo.reset()  # a fresh, static-shape compile per batch size
                candidates["compiled"] = (torch.compile(dag), COMPILED_RTOL)
            for variant, (fn, rtol) in candidates.items():
                ran, seconds, row[variant].max_abs_diff, row[variant].error = checked(fn, x, reference, rtol)
                if variant == "compiled":
                    row[variant].setup_s = seconds
                if ran:
                    fns[variant] = fn  # a mismatch is reported in `error`, and still timed
            times = interleaved(fns, x, args.runs, args.warmup)
        for variant, ns in times.items():
            r = row[variant]
            p25, median, p75 = statistics.quantiles(ns, n=4, method="inclusive")
            r.runs, r.median_ms, r.p25_ms, r.p75_ms = len(ns), median / 1e6, p25 / 1e6, p75 / 1e6
            if variant != "eager":
                r.overhead_pct = (median / statistics.median(times["eager"]) - 1) * 100
                r.ci95_lo_pct, r.ci95_hi_pct = overhead_interval(times["eager"], ns)
        rows.extend(row.values())
    return rows


def fmt(value: float | None, spec: str, width: int) -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


def print_table(rows: list[Row]) -> None:
    print(
        f"{'model':28s} {'batch':>5s} {'variant':9s} {'median ms':>10s} {'p25-p75 ms':>17s} "
        f"{'overhead %':>10s} {'95% CI %':>17s} {'setup s':>8s} {'max diff':>9s}  error"
    )
    for r in rows:
        spread = "-" if r.p25_ms is None else f"{r.p25_ms:.3f}-{r.p75_ms:.3f}"
        ci = "-" if r.ci95_lo_pct is None else f"[{r.ci95_lo_pct:+.1f}, {r.ci95_hi_pct:+.1f}]"
        print(
            f"{r.model:28s} {r.batch:5d} {r.variant:9s} {fmt(r.median_ms, '.3f', 10)} {spread:>17s} "
            f"{fmt(r.overhead_pct, '+.1f', 10)} {ci:>17s} {fmt(r.setup_s, '.2f', 8)} "
            f"{fmt(r.max_abs_diff, '.1e', 9)}  {r.error[:200]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--runs", type=int, default=200, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per variant first")
    parser.add_argument("--repeats", type=int, default=5, help="conversions timed per model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile(dag)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [row for name in args.models for row in bench_model(name, args)]
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[field.name for field in fields(Row)])
        writer.writeheader()
        writer.writerows(
            {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in asdict(r).items()} for r in rows
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
