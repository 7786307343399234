"""`torch-dag info` (ops, params, FLOPs; every level of a flexible model) and `torch-dag viz` (drawings)."""

from __future__ import annotations

import argparse

from .. import analysis, flex, pruning, viz
from ..core.dag import DagModule
from .models import load_dag, sized_inputs


def cmd_info(args: argparse.Namespace) -> None:
    dag = load_dag(args.path, "the .dag file")
    inputs = sized_inputs(dag, args.input_size)
    report = analysis.count_flops(dag, *inputs)
    shapes = ", ".join(f"{n}: {'x'.join(map(str, t.shape))}" for n, t in zip(dag.input_names, inputs))
    print(f"{args.path}  (inputs {shapes})")
    print_recorded_inputs(dag)
    print(report.table(top=args.top))
    if isinstance(dag, flex.FlexDagModule):
        print(f"flexible: {dag.num_levels} levels (the figures above are of level {dag.current_level()})")
        print_levels(dag, inputs, report)
    if args.groups:
        groups = pruning.channel_groups(dag, inputs)
        print(pruning.group_table(pruning.group_rows(groups, report)))


def print_recorded_inputs(dag: DagModule) -> None:
    """The inputs the DAG was converted with (`input_meta`), marked where they were inferred, not given."""
    for name in dag.input_names:
        meta = dag.input_meta.get(name, {})
        shape = meta.get("shape")
        described = "x".join(map(str, shape)) if isinstance(shape, list) else "shape not recorded"
        line = f"  input {name}: {described} {meta.get('dtype', '')}".rstrip()
        if meta.get("inferred"):
            how = meta["inferred"] if isinstance(meta["inferred"], str) else "from the model's first layer"
            line += (
                f" [inferred {how}: converted without example inputs; convert with --input-size or "
                "example inputs to choose them]"
            )
        print(line)


def print_levels(model: flex.FlexDagModule, inputs: tuple, full: analysis.FlopReport) -> None:
    """Params, FLOPs and kmapp of every level of a flexible model (ratios to `full`)."""
    was = model.current_level()
    print(f"  {'level':>5s} {'params (M)':>11s} {'FLOPs (G)':>10s} {'FLOPs ratio':>12s} {'kmapp':>8s}")
    for level in range(model.num_levels):
        model.set_level_use(level)
        count = analysis.count_flops(model, *inputs)
        print(
            f"  {level:5d} {count.total_params / 1e6:11.3f} {count.total_flops / 1e9:10.3f} "
            f"{count.total_flops / full.total_flops:12.3f} {count.kmapp or 0.0:8.2f}"
        )
    if was is not None:
        model.set_level_use(was)


def cmd_viz(args: argparse.Namespace) -> None:
    dag = load_dag(args.path, "the .dag file")
    inputs = None if args.no_flops else dag.example_inputs()
    if args.html:
        path = viz.to_html(dag, args.output, inputs, title=args.path.name)
    else:
        path = viz.render(
            dag, args.output, inputs, fmt=args.format or args.output.suffix.lstrip(".") or "svg"
        )
    print(f"{args.path}: {len(dag)} vertices drawn to {path}")
