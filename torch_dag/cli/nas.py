"""`torch-dag search`: search a searchable `.dag` under a FLOPs, params or latency constraint; print the
Pareto front, plot it, save the best sub-network."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import finetuning, nas, serde
from ..core.errors import DagError
from ..latency import LatencyTable
from .models import check_runs, load_dag
from .values import FRACTION, check_output, integer, load_array, load_labels

CONSTRAINTS = ("flops_ratio", "params_ratio", "latency_ratio")


def cmd_search(args: argparse.Namespace) -> None:
    if args.save_best is not None:
        check_output(args.save_best, "--save-best")
    if args.output is not None:
        _require_matplotlib()
    sdag = load_dag(args.path, "the searchable model")
    if not nas.mutables(sdag):
        raise DagError(
            f"{args.path} has no mutables: make a searchable DAG with td.nas.make_mutable (or td.make_flexible) "
            "and save it"
        )
    calibration, scoring, what = _data(args, sdag)
    table = _latency_table(args)
    constraints = {name: getattr(args, name) for name in CONSTRAINTS if getattr(args, name) is not None}
    front = nas.search(
        sdag,
        scoring,
        constraints,
        strategy=args.strategy,
        budget=args.budget,
        calibration=calibration,
        predictor=None if args.predictor == "none" else args.predictor,
        latency_table=table,
        population=args.population,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(front_table(front, what))
    if args.output is not None:
        plot_front(front, args.output, what, constraints)
        print(f"plot of {what} against {front.metric} written to {args.output}")
    if args.save_best is not None:
        best = nas.export_subnet(sdag, front.best.choice)
        finetuning.recalibrate_batchnorm(best, calibration)  # as it was scored
        serde.save(best, args.save_best)
        print(f"best sub-network (batchnorm statistics re-estimated as scored) saved to {args.save_best}")


def _data(args: argparse.Namespace, sdag: Any) -> tuple[list, Any, str]:
    """Calibration batches (the first --calibration-samples of --data) and the score on the rest:
    accuracy with --labels, else minus the distillation loss from the largest sub-network."""
    inputs = load_array(args.data, "--data").float()
    check_runs(sdag, (inputs,), f"--data {args.data}")
    held = args.calibration_samples if args.calibration_samples is not None else min(256, len(inputs) // 2)
    if not 0 < held < len(inputs):
        raise DagError(
            f"--calibration-samples {held}: --data has {len(inputs)} samples; keep at least one for "
            "batchnorm recalibration and one to score on"
        )
    calibration = [(chunk,) for chunk in inputs[:held].split(args.batch_size)]
    rest = inputs[held:].split(args.batch_size)
    if args.labels is None:
        reference = nas.export_subnet(sdag, nas.largest(sdag))
        return calibration, nas.loss_score(rest, reference), "-distillation loss"
    labels = load_labels(args.labels, len(inputs))
    batches = list(zip(rest, labels[held:].split(args.batch_size)))
    return calibration, nas.accuracy_score(batches), "accuracy"


def _latency_table(args: argparse.Namespace) -> LatencyTable | None:
    if args.latency_ratio is None:
        if args.latency_table is not None:
            raise DagError("--latency-table is read with --latency-ratio: give both, or neither")
        return None
    if args.latency_table is None:
        raise DagError(
            "--latency-ratio needs --latency-table: build one on the largest sub-network with "
            "`torch-dag latency-table` (td.nas.export_subnet of the largest choice)"
        )
    if not args.latency_table.is_file():
        raise DagError(f"--latency-table {args.latency_table}: no such file")
    return LatencyTable.load(args.latency_table)


def front_table(front: nas.ParetoFront, what: str) -> str:
    """The front as printed: one row per candidate, cheapest first, and the best one's choice."""
    stats = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in front.stats.items())
    lines = [
        f"Pareto front: {len(front)} of {len(front.evaluated)} candidates scored in {front.seconds:.1f} s ({stats})",
        f"  {'#':>3} {front.metric:>14} {what:>20}",
    ]
    lines += [f"  {i:>3} {c.cost:>14.4g} {c.score:>20.4f}" for i, c in enumerate(front)]
    if front:
        best = front.best
        lines.append(f"best: {front.metric} {best.cost:.4g}, {what} {best.score:.4f}")
        lines.append(f"  choice: {json.dumps(best.choice)}")
    return "\n".join(lines)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DagError(
            "-o writes a PNG plot with matplotlib, which is not installed: pip install matplotlib"
        ) from None


def plot_front(front: nas.ParetoFront, path: Path, what: str, constraints: dict[str, float]) -> None:
    """A PNG of every scored candidate's score against its cost, the front drawn over them."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    axes.scatter(
        [c.cost for c in front.evaluated], [c.score for c in front.evaluated], s=8, c="0.7", label="scored"
    )
    axes.plot([c.cost for c in front], [c.score for c in front], "o-", c="C0", label="Pareto front")
    if front:
        axes.plot([front.best.cost], [front.best.score], "*", c="C3", ms=14, label="best")
    if front.metric in constraints:
        axes.axvline(constraints[front.metric], c="C3", ls=":", label="constraint")
    axes.set_xlabel(front.metric.replace("_", " "))
    axes.set_ylabel(what)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    finally:
        plt.close(figure)


def add_search_parser(sub: argparse._SubParsersAction) -> None:
    """`torch-dag search`'s options (registered by parser.py)."""
    find = sub.add_parser(
        "search", help="search a searchable .dag under a constraint: Pareto front table, plot, best subnet"
    )
    find.add_argument("path", type=Path, help="a searchable .dag (td.nas.make_mutable, saved)")
    target = find.add_mutually_exclusive_group(required=True)
    target.add_argument("--flops-ratio", type=FRACTION, help="FLOPs to keep, of the largest sub-network's")
    target.add_argument("--params-ratio", type=FRACTION, help="parameters to keep, of the largest's")
    target.add_argument("--latency-ratio", type=FRACTION, help="predicted latency to keep (--latency-table)")
    find.add_argument("--latency-table", type=Path, help="a table built on the largest sub-network")
    find.add_argument("--data", type=Path, required=True, help="a .npy array of model inputs (N x ...)")
    find.add_argument("--labels", type=Path, help="a .npy array of N class labels: score by accuracy")
    find.add_argument(
        "--calibration-samples",
        type=integer(1),
        help="the first samples of --data, for batchnorm recalibration; the rest score (default: "
        "min(256, N/2))",
    )
    find.add_argument(
        "--batch-size", type=integer(1), default=64, help="batch size of calibration and scoring"
    )
    find.add_argument("--budget", type=integer(1), default=1000, help="candidates scored")
    find.add_argument(
        "--strategy", choices=("evolution", "random"), default="evolution", help="how candidates are drawn"
    )
    find.add_argument("--population", type=integer(2), default=50, help="evolution's population")
    find.add_argument("--predictor", choices=("none", "ridge"), default="none", help="pre-screen candidates")
    find.add_argument("--seed", type=integer(0), default=0, help="seeds the draws")
    find.add_argument("-o", "--output", type=Path, help="a PNG plot of the front")
    find.add_argument("--save-best", type=Path, help="save the best sub-network as a plain .dag")
    find.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    find.set_defaults(run=cmd_search)
