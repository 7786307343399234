"""`torch-dag swap-act`, `fold-bn` and `simplify`: passes that read a `.dag` and write one."""

from __future__ import annotations

import argparse
import re
import time

import torch

from .. import analysis, passes, serde
from ..core.errors import DagError
from .models import load_dag


def _rewrite(args: argparse.Namespace, rewrite, what: str, *, preserves: bool = False) -> None:
    """Load, rewrite, check the outputs where the pass keeps the function, save, report."""
    from ..core.compare import compare_outputs

    dag = load_dag(args.path, "the .dag file")
    inputs = dag.example_inputs()
    start = time.perf_counter()
    result = rewrite(dag)
    seconds = time.perf_counter() - start
    if preserves:
        with torch.no_grad():
            equal, _, reason = compare_outputs(dag(*inputs), result(*inputs), rtol=1e-4)
        if not equal:
            raise DagError(f"{what}: outputs changed, not saving: {reason}")
    before, after = analysis.count_flops(dag, *inputs), analysis.count_flops(result, *inputs)
    serde.save(result, args.output)
    print(
        f"{what} in {seconds:.2f} s: {len(dag)} -> {len(result)} vertices, params "
        f"{before.total_params / 1e6:.3f} M -> {after.total_params / 1e6:.3f} M, FLOPs "
        f"{before.total_flops / 1e9:.3f} G -> {after.total_flops / 1e9:.3f} G; saved to {args.output}"
    )


def cmd_swap_act(args: argparse.Namespace) -> None:
    mapping = {}
    for item in args.mapping:
        old, sep, new = item.partition("=")
        if not sep:
            raise DagError(f"expected OLD=NEW (e.g. relu=hardswish), got {item!r}")
        mapping[old] = new
    if args.names is not None:
        try:
            re.compile(args.names)
        except re.error as e:
            raise DagError(f"--names {args.names!r} is not a regular expression: {e}") from None
    _rewrite(args, lambda d: passes.swap_activations(d, mapping, names=args.names), "swapped activations")


def cmd_fold_bn(args: argparse.Namespace) -> None:
    _rewrite(args, lambda dag: passes.fold_batchnorm(dag.eval()), "folded batch norms", preserves=True)


def cmd_simplify(args: argparse.Namespace) -> None:
    _rewrite(
        args, lambda d: passes.dedupe_constants(passes.remove_identities(d)), "simplified", preserves=True
    )
