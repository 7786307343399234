"""`torch-dag convert` (a model into a `.dag` file) and `torch-dag export-onnx` (a `.dag` into ONNX)."""

from __future__ import annotations

import argparse
import time

import torch

from .. import serde
from ..core.errors import DagError
from ..core.progress import show_progress
from .models import convert_model, load_dag, load_model, sized_inputs


def cmd_convert(args: argparse.Namespace) -> None:
    steps = show_progress(total=4, desc="convert", unit="step", disable=args.quiet)
    steps.set_postfix_str("building model")
    model = load_model(args.model).eval()
    steps.set_postfix_str("tracing")
    start = time.perf_counter()
    dag, inputs = convert_model(model, args.input_size, args.batch)
    seconds = time.perf_counter() - start
    steps.update(2)
    steps.set_postfix_str("checking outputs")
    from ..core.compare import compare_outputs

    named = dict(zip(dag.input_names, inputs))
    with torch.no_grad():
        equal, diff, reason = compare_outputs(model(**named), dag(**named))
    steps.update()
    if not equal:
        raise DagError(f"converted DAG's outputs differ from the model's, not saving: {reason}")
    steps.set_postfix_str("saving")
    path = serde.save(dag, args.output)
    steps.update()
    steps.close()
    print(
        f"{args.model}: {len(dag)} vertices, converted in {seconds:.2f} s, max output difference "
        f"{diff:.1e}, saved to {path} ({path.stat().st_size / 1e6:.1f} MB)"
    )


def cmd_export_onnx(args: argparse.Namespace) -> None:
    from ..converters.onnx import export_onnx

    dag = load_dag(args.path, "the .dag file")
    inputs = sized_inputs(dag, args.input_size)
    start = time.perf_counter()
    path = export_onnx(dag, args.output, inputs, opset=args.opset, dynamic_batch=not args.static_batch)
    print(
        f"{args.path}: {len(dag)} vertices exported in {time.perf_counter() - start:.2f} s to {path} "
        f"({path.stat().st_size / 1e6:.1f} MB)"
    )
