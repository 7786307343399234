"""Latency tables and latency targets on this CPU: prediction error, the ratio reached, build time.

    python benchmarks/latency.py                                   # the six models, batch 1 and 32
    python benchmarks/latency.py --models resnet18 --batches 1 --assignments 3 --out /tmp/latency.csv
    python benchmarks/latency.py --threads 2 --timeout 3600        # resumes: rows already there are kept
    python benchmarks/latency.py --allocator system                # glibc's default: results/latency.csv

`--allocator steady` (the default) calls `td.steady_allocator()` in each job first: freed memory stays in
the process, as with jemalloc or tcmalloc in a deployment. With glibc's default (`system`) a CNN at batch
32 faults its activations in afresh on every call: half of mobilenetv3_large_100's time on this machine,
and its least steady half. Each allocator writes its own CSV (`latency_steady.csv`, `latency.csv`).

For each model (timm, pretrained=False, default input size) and batch, in a subprocess of its own:
1. `latency_table(dag, (x,), batch_size=batch)` and its build seconds (row kind `table`; the table is
   saved beside the CSV and reused by a rerun);
2. `--assignments` random width assignments (seeded, none of them a probe of the table: each prunable
   group kept at a fraction uniform in [0.25, 1], rounded as the table rounds), each built by pruning
   surgery, timed beside the unpruned DAG at the batch (`compare_latency`) and compared with the table's
   prediction (kinds `assign00`, ...: `rel_error` = predicted latency ratio / measured latency ratio - 1,
   free of the machine's drift: this shared machine runs the same model up to half again slower minutes
   later; `abs_time_error` = predicted / measured microseconds - 1, drift included; kind `prediction`:
   median |rel_error|);
3. `prune(dag, 0.5, (x,))` (kind `flops`), `prune(dag, None, (x,), latency_ratio=0.5,
   latency_table=table)` (kind `latency`) and FLOPs pruning at the FLOPs ratio whose measured latency
   matches the latency pruning's (kind `flops_matched`: bisected on the table, then corrected by up to 3
   measurements beside the latency pruning) timed beside the unpruned DAG
   (kind `unpruned`) in ONE `compare_latency` run: latency ratio to the unpruned DAG (median of per-round
   ratios), FLOPs ratio, the table's predicted latency ratio, what the prune report reached (FLOPs
   ratio, or its own measured latency ratio), and output fidelity on 32 random inputs (top-1 agreement
   with the unpruned DAG, mean cosine similarity of the logits; `distinct_top1` on the unpruned row: how
   many classes the unpruned DAG's top-1 takes over those inputs, as random weights may give one).
Rows go to benchmarks/results/latency.csv as they come (one per model, batch, kind; `seconds` is the
wall time of that row's stage). Jobs run one at a time so that no two timings overlap; a failure or hang
is a row of kind `error` naming its stage (retried by the next run), never a crash of the sweep.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from prune_latency import (
    MODELS,  # the six models of issue 23, as prune_latency.py times them; benchmarks/ is on sys.path
)

import torch_dag as td
from torch_dag.analysis.latency import device_name
from torch_dag.latency.build import _keep, _removal  # the probes' own surgery, to build assignments alike
from torch_dag.passes.prepare import prepare
from torch_dag.pruning import surgery
from torch_dag.pruning.groups import channel_groups
from torch_dag.pruning.prune import must_keep

RESULTS = Path(__file__).resolve().parent / "results"
OUT = {"steady": RESULTS / "latency_steady.csv", "system": RESULTS / "latency.csv"}
TARGET = 0.5  # the FLOPs ratio and the latency ratio compared
NARROWEST = 0.25  # the smallest kept fraction of a group in a random assignment
FIDELITY_INPUTS = 32
TARGET_KINDS = ("unpruned", "flops", "latency", "flops_matched")  # measured together: redone together
MATCH_TITLES = {"flops": "flops 0.5", "latency": "latency 0.5", "flops_matched": "same latency"}
MATCH_STEPS = 6  # bisection steps of the FLOPs ratio that matches the latency target's predicted latency
MATCH_MEASURES = 3  # then corrections of it by measured latency
FIELDS = [
    "model",
    "batch",
    "kind",
    "status",
    "seconds",
    "threads",
    "round_to",
    "predicted_us",
    "measured_us",
    "rel_error",
    "median_abs_error",
    "abs_time_error",
    "assignments",
    "median_ms",
    "latency_ratio",
    "reported_ratio",
    "predicted_ratio",
    "flops_ratio",
    "top1_agreement",
    "cosine",
    "distinct_top1",
    "stage",
    "error_class",
    "error",
]
Send = Callable[[str, Any], None]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--assignments", type=int, default=20, help="random width assignments per job")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per (model, batch) job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--allocator",
        choices=tuple(OUT),
        default="steady",
        help="steady: td.steady_allocator() in each job; system: the C library's default",
    )
    parser.add_argument("--out", type=Path, help="the CSV (default: by --allocator, see above)")
    args = parser.parse_args()
    args.out = args.out or OUT[args.allocator]
    jobs = [(model, batch) for model in args.models for batch in args.batches]
    kept = _kept_rows(_read(args.out), args.assignments)
    _write(args.out, kept)
    for model, batch in jobs:
        done = {r["kind"]: r for r in kept if r["model"] == model and int(r["batch"]) == batch}
        if _complete(done, args.assignments):
            print(f"{model} batch {batch}: done already", flush=True)
            continue
        _run(model, batch, args, done)
    print(summary(_read(args.out), jobs))
    print(f"rows in {args.out}")


def _kept_rows(rows: list[dict[str, str]], assignments: int) -> list[dict[str, str]]:
    """The rows a rerun keeps: every ok row, except a job's target rows unless all three are ok (they
    are timed in one run) and its `prediction` row unless every assignment it summarises is there."""
    ok = [r for r in rows if r["status"] == "ok"]
    jobs = {(r["model"], r["batch"]) for r in ok}
    kept = []
    for job in jobs:
        mine = {r["kind"]: r for r in ok if (r["model"], r["batch"]) == job}
        if not all(k in mine for k in TARGET_KINDS):
            mine = {k: r for k, r in mine.items() if k not in TARGET_KINDS}
        assigned = [k for k in mine if k.startswith("assign")]
        if "prediction" in mine and (
            len(assigned) < assignments or mine["prediction"]["assignments"] != str(len(assigned))
        ):
            del mine["prediction"]
        kept.extend(mine.values())
    return sorted(kept, key=lambda r: (r["model"], int(r["batch"])))


def _complete(done: dict[str, dict[str, str]], assignments: int) -> bool:
    wanted = ["table", "prediction", *TARGET_KINDS, *(_assign_kind(i) for i in range(assignments))]
    return all(k in done for k in wanted)


def _assign_kind(index: int) -> str:
    return f"assign{index:02d}"


def _run(model: str, batch: int, args: argparse.Namespace, done: dict[str, dict[str, str]]) -> None:
    """One job in a forked child: its rows are appended as they arrive; a timeout or death is a row."""
    ctx = mp.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(model, batch, args, done, sender), daemon=True)
    proc.start()
    sender.close()
    stage, started, finished = "start", time.monotonic(), False
    base = {"model": model, "batch": batch}
    while not finished:
        if receiver.poll(0.2):
            try:
                kind, payload = receiver.recv()
            except EOFError:
                break
            if kind == "stage":
                stage = payload
                print(f"{model} batch {batch}: {stage} ({time.monotonic() - started:.1f} s)", flush=True)
            elif kind == "row":
                _append(args.out, {**base, **payload})
            finished = kind == "done"
        elif time.monotonic() - started > args.timeout:
            proc.kill()
            error = {"error_class": "Timeout", "error": f"over {args.timeout:.0f} s in stage {stage}"}
            _append(args.out, {**base, "kind": "error", "status": "timeout", "stage": stage, **error})
            finished = True
    proc.join(timeout=10)
    if not finished:
        error = {"error_class": f"exit {proc.exitcode}", "error": f"process died in stage {stage}"}
        _append(args.out, {**base, "kind": "error", "status": "crashed", "stage": stage, **error})


def _child(
    model: str, batch: int, args: argparse.Namespace, done: dict[str, dict[str, str]], conn: Any
) -> None:
    stage = ["start"]

    def send(kind: str, payload: Any) -> None:
        if kind == "stage":
            stage[0] = payload
        conn.send((kind, payload))

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.allocator == "steady" and not td.steady_allocator():
            raise RuntimeError("--allocator steady needs glibc (td.steady_allocator() had no effect)")
        job(model, batch, args, done, send)
    except BaseException as e:  # the parent records whatever stopped the job
        send("row", {"kind": "error", "status": "error", "stage": stage[0], **_error(e)})
    send("done", None)
    conn.close()


def job(name: str, batch: int, args: argparse.Namespace, done: dict[str, dict[str, str]], send: Send) -> None:
    """Stages 1 to 3 of one model at one batch; rows already `done` (kinds) are skipped."""
    send("stage", "convert")
    torch.manual_seed(args.seed)
    model = timm.create_model(name, pretrained=False).eval()
    size = tuple(model.pretrained_cfg["input_size"])
    x = torch.randn(1, *size)
    dag = td.build_from_unstructured_module(model, (x,))
    send("stage", "table")
    table = _table(name, dag, x, batch, args, "table" not in done, send)
    if "prediction" not in done:
        send("stage", "assignments")
        earlier = [float(r["rel_error"]) for k, r in done.items() if k.startswith("assign")]
        errors = earlier + _assignments(dag, x, batch, table, args, set(done), send)
        median = statistics.median(abs(e) for e in errors) if errors else None
        row = {"kind": "prediction", "status": "ok" if errors else "error", "assignments": len(errors)}
        send("row", {**row, "median_abs_error": None if median is None else round(median, 4)})
    if not all(k in done for k in TARGET_KINDS):
        send("stage", "targets")
        for row in targets(dag, x, batch, table, args, send):
            send("row", row)


def _table(
    name: str,
    dag: td.DagModule,
    x: torch.Tensor,
    batch: int,
    args: argparse.Namespace,
    record: bool,
    send: Send,
) -> td.LatencyTable:
    """The job's table: read back from beside the CSV when a previous run saved it for this batch,
    device, torch and thread count, else built (and saved)."""
    path = args.out.with_name(args.out.stem + "_tables") / f"{name}_b{batch}.json"
    table = td.LatencyTable.load(path) if path.exists() else None
    here = (batch, device_name(torch.device("cpu")), torch.__version__, torch.get_num_threads())
    if table is None or (table.batch_size, table.device, table.torch_version, table.threads) != here:
        table = td.latency_table(dag, (x,), batch_size=batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
    if record:
        row = {"kind": "table", "status": "ok", "seconds": table.build_seconds, "threads": table.threads}
        measured = {"measured_us": round(table.measured_us, 1), "predicted_us": round(table.predict(), 1)}
        send("row", {**row, "round_to": table.round_to, **measured})
    print(f"  {table}", flush=True)
    return table


def _assignments(
    dag: td.DagModule,
    x: torch.Tensor,
    batch: int,
    table: td.LatencyTable,
    args: argparse.Namespace,
    done: set[str],
    send: Send,
) -> list[float]:
    """Relative errors of the table's prediction over the random assignments not yet done (sent as
    rows); the caller adds those of earlier runs."""
    prep = prepare(dag, (x,))
    groups = channel_groups(prep.dag, prep.example_inputs, attention=table.attention)
    cost = table.cost_model(groups)  # raises when the table was built on other groups
    prunable = [g for g in groups.groups() if g.prunable]
    owners = must_keep(groups)
    errors = []
    for index in range(args.assignments):
        kind = _assign_kind(index)
        if kind in done:
            continue
        start = time.perf_counter()
        try:
            draw = np.random.default_rng([args.seed, index]).uniform(NARROWEST, 1.0, len(prunable))
            removed = _removal(groups, prunable, draw, table.round_to, owners)
            pruned = surgery.apply(prep.dag, groups, _keep(groups, removed))
            both = td.compare_latency(
                {"unpruned": prep.dag, "assignment": pruned},
                (x,),
                batch_size=batch,
                threads=args.threads,
                runs=None if batch < 16 else 3,
                warmup=1,
            )
            measured = both.latencies["assignment"]
            predicted = cost.predict_us(removed)
            error = cost.ratio(removed) / both.ratio("assignment", "unpruned") - 1
            row = {
                "status": "ok",
                "threads": measured.threads,
                "round_to": table.round_to,
                "predicted_us": round(predicted, 1),
                "measured_us": round(measured.median_ms * 1e3, 1),
                "rel_error": round(error, 4),
                "abs_time_error": round(predicted / (measured.median_ms * 1e3) - 1, 4),
                "predicted_ratio": round(cost.ratio(removed), 4),
                "latency_ratio": round(both.ratio("assignment", "unpruned"), 4),
            }
            errors.append(error)
        except Exception as e:
            row = {"status": "error", **_error(e)}
        send("row", {"kind": kind, "seconds": round(time.perf_counter() - start, 2), **row})
    return errors


def targets(
    dag: td.DagModule,
    x: torch.Tensor,
    batch: int,
    table: td.LatencyTable,
    args: argparse.Namespace,
    send: Send,
) -> list[dict[str, Any]]:
    """Rows `unpruned`, `flops`, `latency`, `flops_matched`: the prunings timed beside the unpruned DAG
    in one `compare_latency` run, their FLOPs ratios and fidelity."""
    variants, rows = pruned_variants(dag, x, batch, table, send)
    send("stage", "compare latency")
    start = time.perf_counter()
    comparison = td.compare_latency(variants, (x,), batch_size=batch, threads=args.threads)
    rows["unpruned"] = {"status": "ok", "seconds": round(time.perf_counter() - start, 2)}
    print(comparison.table("unpruned"), flush=True)
    send("stage", "fidelity")
    inputs = torch.randn(
        FIDELITY_INPUTS, *x.shape[1:], generator=torch.Generator().manual_seed(args.seed + 1)
    )
    with torch.inference_mode():
        reference = dag(inputs)
    rows["unpruned"]["distinct_top1"] = len(
        reference.argmax(-1).unique()
    )  # 1: top-1 agreement is all-or-none
    full_flops = td.count_flops(dag, x).total_flops
    for kind, model in variants.items():
        latency = comparison.latencies[kind]
        rows[kind].update(median_ms=round(latency.median_ms, 3), threads=latency.threads)
        if kind != "unpruned":
            ratio = comparison.ratio(kind, "unpruned")
            flops = td.count_flops(model, x).total_flops / full_flops
            rows[kind].update(latency_ratio=round(ratio, 4), flops_ratio=round(flops, 4))
            rows[kind].update(fidelity(reference, model, inputs))
    return [{"kind": kind, **row} for kind, row in rows.items()]


def pruned_variants(
    dag: td.DagModule, x: torch.Tensor, batch: int, table: td.LatencyTable, send: Send
) -> tuple[dict[str, td.DagModule], dict[str, dict[str, Any]]]:
    """The unpruned DAG and its prunings (to half the FLOPs, to half the latency, and to the FLOPs whose
    measured latency matches the latency pruning's), with their rows so far; a failed pruning is a row
    with its error and no variant."""
    variants = {"unpruned": dag}
    rows: dict[str, dict[str, Any]] = {}
    aims: dict[str, Callable[[], tuple[td.DagModule, Any]]] = {
        "flops": lambda: td.prune(dag, TARGET, (x,), return_report=True),
        "latency": lambda: td.prune(
            dag, None, (x,), latency_ratio=TARGET, latency_table=table, return_report=True
        ),
        "flops_matched": lambda: matched_flops(dag, x, batch, table, *_latency_goal(variants, rows)),
    }
    for kind, aim in aims.items():
        send("stage", f"prune: {kind}")
        start = time.perf_counter()
        try:
            variants[kind], report = aim()
            rows[kind] = {"status": "ok", "reported_ratio": round(report.reached, 4)}
            rows[kind]["predicted_ratio"] = round(predicted_ratio(table, report), 4)
        except Exception as e:
            rows[kind] = {"status": "error", **_error(e)}
        rows[kind]["seconds"] = round(time.perf_counter() - start, 2)
    return variants, rows


def predicted_ratio(table: td.LatencyTable, report: Any) -> float:
    """The table's predicted latency ratio of a pruning result, from the widths its report lists."""
    widths = {g.producers[0]: g.kept / g.width for g in report.group_rows if g.kept is not None}
    return table.predict(widths) / table.predict()


def _latency_goal(
    variants: dict[str, td.DagModule], rows: dict[str, dict[str, Any]]
) -> tuple[td.DagModule, float]:
    """The latency pruning, and its latency ratio the table predicts."""
    if "latency" not in variants:
        raise RuntimeError("no latency pruning to match (it failed: see the row of kind latency)")
    return variants["latency"], rows["latency"]["predicted_ratio"]


def matched_flops(
    dag: td.DagModule,
    x: torch.Tensor,
    batch: int,
    table: td.LatencyTable,
    goal: td.DagModule,
    goal_ratio: float,
) -> tuple[td.DagModule, Any]:
    """FLOPs pruning at the measured latency of `goal` (the latency pruning), so that fidelity is compared
    at the same latency: the FLOPs ratio whose table-predicted latency matches `goal_ratio` (`goal`'s) first (bisected
    over `MATCH_STEPS` prunings), then corrected `MATCH_MEASURES` times by the two measured side by side
    with the unpruned DAG (the FLOPs ratio scaled by the goal's measured latency ratio over the
    candidate's); the candidate measured nearest the goal is kept."""
    low, high, ratio = 0.05, 1.0, TARGET
    nearest = float("inf")
    for _ in range(MATCH_STEPS):
        middle = (low + high) / 2
        predicted = predicted_ratio(table, _flops_pruned(dag, x, middle)[1])
        if abs(predicted - goal_ratio) < nearest:
            ratio, nearest = middle, abs(predicted - goal_ratio)
        low, high = (low, middle) if predicted > goal_ratio else (middle, high)
    best = None
    for _ in range(MATCH_MEASURES):
        pruned, report = _flops_pruned(dag, x, ratio)
        both = td.compare_latency({"unpruned": dag, "goal": goal, "it": pruned}, (x,), batch_size=batch)
        off = both.ratio("it", "unpruned") - both.ratio("goal", "unpruned")
        if best is None or abs(off) < abs(best[2]):
            best = (pruned, report, off)
        if abs(off) < 0.01:
            break
        ratio = min(1.0, ratio * both.ratio("goal", "unpruned") / both.ratio("it", "unpruned"))
    assert best is not None
    return best[0], best[1]


def _flops_pruned(dag: td.DagModule, x: torch.Tensor, ratio: float) -> tuple[td.DagModule, Any]:
    with warnings.catch_warnings():  # a missed FLOPs target is only a step of the search
        warnings.simplefilter("ignore", UserWarning)
        return td.prune(dag, ratio, (x,), return_report=True)


def fidelity(reference: torch.Tensor, model: td.DagModule, inputs: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement of `model`'s logits with `reference` and their mean cosine similarity."""
    with torch.inference_mode():
        logits = model(inputs)
    if not isinstance(logits, torch.Tensor) or logits.shape != reference.shape:
        raise TypeError(f"expected logits of shape {tuple(reference.shape)}, got {type(logits).__name__}")
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    cosine = torch.nn.functional.cosine_similarity(logits, reference, dim=-1).mean().item()
    return {"top1_agreement": round(agree, 4), "cosine": round(cosine, 4)}


def summary(rows: list[dict[str, str]], jobs: list[tuple[str, int]]) -> str:
    """One line per job: table build s, median |prediction error|, and for each target the measured
    latency ratio (its FLOPs ratio) and fidelity (top-1 agreement / cosine)."""
    lines = [
        f"{'model':24s} {'batch':>5s} {'table s':>8s} {'|pred err|':>10s}   "
        + "   ".join(f"{'at ' + MATCH_TITLES[k] + ': latency (flops) top1/cos':>40s}" for k in MATCH_TITLES)
    ]
    for model, batch in jobs:
        mine = {r["kind"]: r for r in rows if r["model"] == model and int(r["batch"]) == batch}
        lines.append(_summary_line(model, batch, mine))
    return "\n".join(lines)


def _summary_line(model: str, batch: int, rows: dict[str, dict[str, str]]) -> str:
    def get(kind: str, field: str) -> str:
        return rows.get(kind, {}).get(field) or "-"

    cells = [
        f"{model:24s} {batch:5d} {get('table', 'seconds'):>8s} {get('prediction', 'median_abs_error'):>10s}"
    ]
    for kind in MATCH_TITLES:
        if get(kind, "status") == "error":
            cells.append(f"{'error: ' + get(kind, 'error_class'):>40s}")
            continue
        measured = f"{get(kind, 'latency_ratio')} ({get(kind, 'flops_ratio')})"
        cells.append(f"{measured:>22s} {get(kind, 'top1_agreement'):>8s}/{get(kind, 'cosine'):<8s}")
    if "error" in rows:
        cells.append(f"{rows['error']['status']} in {get('error', 'stage')}: {get('error', 'error')[:80]}")
    return "   ".join(cells)


def _error(e: BaseException) -> dict[str, str]:
    message = " ".join((str(e) or traceback.format_exc()).split())[:400]
    return {"error_class": type(e).__name__, "error": message}


def _read(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _append(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    if not rows and not path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
