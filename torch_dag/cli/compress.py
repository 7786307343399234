"""`torch-dag prune`, `factorize` and `flexify`: the compressions, each printing what it achieved."""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any, cast

from .. import analysis, flex, passes, pruning, serde
from ..core.dag import DagModule
from ..core.errors import DagError
from ..latency import LatencyTable
from ..pruning.prune import DEFAULT_ROUND_TO
from .info import print_levels
from .latency import table_for_prune
from .models import calibration_batches, check_runs, load_or_convert, recalibrate_if_asked
from .values import increasing_fractions


def _width_settings(args: argparse.Namespace) -> dict:
    """The options prune and flexify share (PruneConfig / FlexConfig fields of the same names)."""
    names = ("criterion", "min_channels", "attention", "compensate")
    return {"round_to": args.round_to or DEFAULT_ROUND_TO, **{name: getattr(args, name) for name in names}}


def cmd_prune(args: argparse.Namespace) -> None:
    calibration = calibration_batches(args)
    dag, inputs = load_model_and_data(args, calibration)
    table, table_file = table_for_prune(args, dag, inputs) if args.latency_ratio is not None else (None, None)
    # the rounding asked for: --round-to, else prune's own default (the table's with a latency target)
    asked = args.round_to or (table.round_to if table is not None else DEFAULT_ROUND_TO)
    config = pruning.PruneConfig(**{**_width_settings(args), "round_to": asked})
    start = time.perf_counter()
    with warnings.catch_warnings():  # the report says which rounding was used, and why a target was missed
        warnings.simplefilter("ignore")
        try:
            pruned, report = pruning.prune(
                dag,
                args.flops_ratio,
                inputs,
                params_ratio=args.params_ratio,
                kmapp=args.kmapp,
                latency_ratio=args.latency_ratio,
                latency_table=table,
                config=config,
                calibration=calibration,
                protected=args.protect,
                progress=not args.quiet,
                return_report=True,
            )
        except DagError as e:
            if table_file is not None and "latency table" in str(e):
                raise DagError(f"latency table {table_file}: {e}") from None
            raise
    recalibrated = recalibrate_if_asked(pruned, calibration, args)
    seconds = time.perf_counter() - start
    serde.save(pruned, args.output)
    _print_pruned(args, dag, pruned, inputs, report, asked, seconds, table)
    if recalibrated is not None:
        print(f"  batchnorm statistics re-estimated on {args.calibration}: {recalibrated} layers")


def _rounding(
    args: argparse.Namespace, report: pruning.PruneReport, asked: int, table: LatencyTable | None
) -> str:
    """How the widths were rounded, and why: as asked, the latency table's choice, or the default."""
    text = f"widths rounded to multiples of {report.round_to} where a group is that wide"
    if report.round_to != asked:
        return f"{text}; {asked} could not reach the target"
    if args.round_to is not None:
        return f"{text}, as --round-to asks"
    if table is not None and table.fit.get("rounding", {}).get("reason") == "given":
        return f"{text}, the latency table's rounding (given when it was built)"
    if table is not None:
        return f"{text}, the rounding the latency table found fastest on its device"
    return f"{text}, as hardware kernels run fastest on such widths"


def _print_pruned(
    args: argparse.Namespace,
    dag: DagModule,
    pruned: DagModule,
    inputs: tuple,
    report: pruning.PruneReport,
    asked: int,
    seconds: float,
    table: LatencyTable | None,
) -> None:
    """The before/after table of a prune, the latency reached with a latency target, and the report."""
    before, after = analysis.count_flops(dag, *inputs), analysis.count_flops(pruned, *inputs)
    rows = [
        ("params (M)", before.total_params / 1e6, after.total_params / 1e6),
        ("FLOPs (G)", before.total_flops / 1e9, after.total_flops / 1e9),
        ("kmapp", before.kmapp or 0.0, after.kmapp or 0.0),
    ]
    print(
        f"pruned {args.source} to {after.total_flops / before.total_flops:.1%} of its FLOPs and "
        f"{after.total_params / before.total_params:.1%} of its params in {seconds:.1f} s "
        f"({args.criterion}; {_rounding(args, report, asked, table)}); saved to {args.output}"
    )
    print(f"  {'':12s} {'before':>10s} {'after':>10s} {'ratio':>7s}")
    if report.measured_ms is not None and table is not None:
        rows.insert(0, ("latency (ms)", *report.measured_ms))
    for label, old, new in rows:
        print(f"  {label:12s} {old:10.3f} {new:10.3f} {new / old if old else 0:7.3f}")
    if report.predicted is not None and table is not None:
        print(
            f"  latency ratio {report.reached:.3f} measured (median of per-round ratios, side by side), "
            f"{report.predicted:.3f} predicted by the table (target {report.target:.3f}); "
            f"{table.device}, {table.dtype}, batch {table.batch_size}, {table.threads} threads"
        )
    print(f"  channel groups: {report.groups}, prunable {report.prunable}, narrowed {report.narrowed}")
    if report.missed:
        print(f"  target missed: {report.why()}")
    if args.report:
        print(pruning.group_table(report.group_rows, report.measure))
        print(pruning.layer_table(report.layer_rows))


def cmd_factorize(args: argparse.Namespace) -> None:
    calibration = calibration_batches(args)
    dag, inputs = load_model_and_data(args, calibration)
    missing = [name for name in args.protect if name not in dag]
    if missing:
        raise DagError(
            f"--protect {' '.join(missing)}: no such vertex in {args.source} (`torch-dag info` lists "
            f"the heaviest; vertices are named like {', '.join(v.name for v in list(dag)[:3])})"
        )
    if args.latency_table is not None and not args.latency:
        raise DagError("--latency-table is read with --latency: give both, or leave the table out")
    latency: bool | LatencyTable = args.latency
    if args.latency_table is not None:
        latency = LatencyTable.load(args.latency_table)
    small, report = passes.factorize(
        dag,
        args.flops_ratio,
        params_ratio=args.params_ratio,
        rank_ratio=args.rank_ratio,
        calibration=calibration,
        example_inputs=inputs,
        allocation=args.allocation,
        protected=args.protect,
        latency=latency,
        progress=not args.quiet,
        return_report=True,
    )
    serde.save(small, args.output)
    print(report.table(top=args.top))
    print(f"saved to {args.output}")


def cmd_flexify(args: argparse.Namespace) -> None:
    increasing_fractions("--levels", args.levels)
    increasing_fractions("--flops-ratios", args.flops_ratios)
    levels = len(args.flops_ratios or args.levels)
    if args.starting_level >= levels:
        raise DagError(
            f"--starting-level {args.starting_level}: the model will have {levels} levels; "
            f"give 0 to {levels - 1}"
        )
    calibration = calibration_batches(args)
    dag, inputs = load_model_and_data(args, calibration)
    config = flex.FlexConfig(**_width_settings(args))
    start = time.perf_counter()
    model = flex.make_flexible(
        dag, args.levels, inputs, flops_ratios=args.flops_ratios, config=config, calibration=calibration
    )
    recalibrated = recalibrate_if_asked(model, calibration, args)
    seconds = time.perf_counter() - start
    serde.save(model, args.output)
    ranking = cast(dict[str, Any], model.width_info)["ranking"]  # make_flexible records its width plan
    print(
        f"made {args.source} flexible with {model.num_levels} levels over {len(ranking)} "
        f"channel groups in {seconds:.1f} s ({config.criterion}); saved to {args.output}"
    )
    if recalibrated is not None:
        print(
            f"  per-level batchnorm statistics re-estimated on {args.calibration} ({recalibrated} over all levels)"
        )
    model.set_level_use(model.max_level())
    print_levels(model, inputs, analysis.count_flops(dag, *inputs))
    if args.delta_file:
        level = args.starting_level
        flex.FileDeltaManager.make_delta_file(
            args.delta_file, model, starting_level=level, progress=not args.quiet
        )
        size = args.delta_file.stat().st_size
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        print(
            f"delta file {args.delta_file}: {size / 1e6:.2f} MB (the flexible model's weights: "
            f"{weights / 1e6:.2f} MB), starting at level {level}"
        )


def load_model_and_data(args: argparse.Namespace, calibration: list | None) -> tuple:
    """The source as a DAG with example inputs, the calibration data checked to run on it."""
    dag, inputs = load_or_convert(args.source, args.input_size, "the source")
    if calibration:
        check_runs(dag, calibration[0], f"--calibration {args.calibration}")
    return dag, inputs
