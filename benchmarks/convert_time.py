"""Conversion time over a random sample of the timm sweep, measured quietly (one model at a time).

    python benchmarks/convert_time.py                   # 150 models, seed 0
    python benchmarks/convert_time.py --sample 50 --seed 1

The coverage sweep times conversions two models at a time (two processes on two cores, with eager runs,
round trips and folds of the other model in between); this script takes a seeded random sample of the
models that passed the sweep (results/timm_coverage.csv) and converts each in its own forked process,
one at a time: build (`pretrained=False`), one eager forward, then `td.build_from_unstructured_module`
timed once, as in the sweep. Prints the median against the sweep's figure for the same models; rows go
to results/convert_time.csv.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import random
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def convert_once(name: str, queue: mp.Queue) -> None:
    import time

    import timm
    import torch

    import torch_dag as td

    torch.set_num_threads(1)  # as the sweep's workers
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        model(x)
    t0 = time.perf_counter()
    td.build_from_unstructured_module(model, (x,))
    queue.put(time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sample", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    with open(RESULTS / "timm_coverage.csv") as f:
        swept = {r["model"]: r for r in csv.DictReader(f) if r["status"] == "ok"}
    names = sorted(
        random.Random(args.seed).sample(sorted(swept), min(args.sample, len(swept))),
        key=lambda n: float(swept[n]["params_m"] or 0),
    )
    import timm  # noqa: F401  (imported once here: every forked child starts with torch and timm loaded)

    context = mp.get_context("fork")
    rows = []
    for i, name in enumerate(names, 1):
        queue = context.Queue()
        child = context.Process(target=convert_once, args=(name, queue))
        child.start()
        child.join(args.timeout)
        if child.is_alive():
            child.kill()
            child.join()
        seconds = queue.get() if not queue.empty() else None
        rows.append(
            {
                "model": name,
                "params_m": swept[name]["params_m"],
                "convert_s": seconds and round(seconds, 3),
                "sweep_convert_s": swept[name]["convert_s"],
            }
        )
        print(
            f"[{i}/{len(names)}] {name}: {rows[-1]['convert_s']} s (sweep {swept[name]['convert_s']} s)",
            flush=True,
        )
    with open(RESULTS / "convert_time.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    done = [r for r in rows if r["convert_s"] is not None]
    quiet = statistics.median(r["convert_s"] for r in done)
    sweep = statistics.median(float(r["sweep_convert_s"]) for r in done)
    population = statistics.median(float(r["convert_s"]) for r in swept.values())
    print(
        f"\n{len(done)} / {len(rows)} converted (seed {args.seed}); median conversion time: {quiet:.3f} s one at a "
        f"time, {sweep:.3f} s in the sweep for the same models (sweep median over all {len(swept)}: "
        f"{population:.3f} s); p90 {statistics.quantiles([r['convert_s'] for r in done], n=10)[-1]:.3f} s"
    )


if __name__ == "__main__":
    main()
