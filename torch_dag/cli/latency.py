"""`torch-dag bench` and `latency-table`: one or two models timed side by side, and the latency table that
`prune --latency-ratio` reads (saved beside the model under a name `table_path` gives, and reused)."""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

import torch

from ..analysis.latency import DTYPES, compare_latency
from ..core.dag import DagModule
from ..core.errors import DagError
from ..latency import LatencyTable, latency_table
from .models import check_runs, load_or_convert
from .values import check_output

DTYPE_CHOICES = tuple(DTYPES)


def device_option(text: str) -> str:
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:1, mps)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected a device like cpu, cuda or cuda:1, got {text!r}"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA devices; use cpu")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"expected a device like cpu, cuda or cuda:1, got {text!r}")
    return text


def batch_of(inputs: tuple, batch_size: int | None) -> int:
    """The batch a timing runs at: `--batch-size`, else the example inputs' own."""
    if batch_size is not None:
        return batch_size
    first = next((x for x in inputs if isinstance(x, torch.Tensor) and x.dim()), None)
    return int(first.shape[0]) if first is not None else 1


def dtype_of(dag: DagModule, dtype: str | None) -> str:
    """The dtype a timing runs in: `--dtype`, else the model's own (that of its floating weights)."""
    if dtype is not None:
        return dtype
    own = next((p.dtype for p in dag.parameters() if p.is_floating_point()), torch.float32)
    return str(own).removeprefix("torch.")


def table_path(
    source: str, device: str, dtype: str, batch: int, input_size: tuple[int, ...] | None = None
) -> Path:
    """Where a model's latency table is kept by default: beside a .dag file (`net.dag` ->
    `net.latency-cpu-float32-b1.json`), or in the current folder for a model spec (`timm:resnet50` ->
    `timm_resnet50.latency-...`); an `--input-size` other than the model's own is part of the name."""
    if Path(source).is_file() or source.endswith(".dag"):
        base = Path(source)
        base = base.with_suffix("") if base.suffix == ".dag" else base
    else:
        base = Path(re.sub(r"[^\w.-]+", "_", source))
    size = "-" + "x".join(map(str, input_size)) if input_size else ""
    return base.with_name(f"{base.name}.latency-{torch.device(device).type}-{dtype}-b{batch}{size}.json")


def build_table(
    dag: DagModule, inputs: tuple, args: argparse.Namespace, device: str, batch_size: int | None
) -> LatencyTable:
    """`latency_table` with the command line's settings, a progress bar unless `--quiet`."""
    return latency_table(
        dag,
        inputs,
        device=device,
        dtype=args.dtype,
        batch_size=batch_of(inputs, batch_size),
        probes=getattr(args, "probes", None),
        round_to=args.round_to,
        attention=args.attention,
        progress=not args.quiet,
    )


def table_for_prune(args: argparse.Namespace, dag: DagModule, inputs: tuple) -> tuple[LatencyTable, Path]:
    """The table `prune --latency-ratio` reads: `--latency-table`, else the default one beside the model
    (for --device, --dtype, --latency-batch), built and saved there when missing."""
    path = args.latency_table
    if path is not None and not path.is_file():
        raise DagError(
            f"--latency-table {path}: no such file (build one with `torch-dag latency-table {args.source}`, "
            "or leave the option out to build and keep the default one)"
        )
    if path is None:
        device, batch = args.device or "cpu", batch_of(inputs, args.latency_batch)
        path = table_path(args.source, device, dtype_of(dag, args.dtype), batch, args.input_size)
        if not path.is_file():
            check_output(path, "the latency table (default path; --latency-table to choose another)")
            print(f"no latency table at {path}: building one (as `torch-dag latency-table` does)", flush=True)
            table = build_table(dag, inputs, args, device, batch)
            table.save(path)
            print(f"  {table}; saved to {path} for the next run")
            return table, path
    table = LatencyTable.load(path)
    check_table(table, path, args)
    return table, path


def cmd_bench(args: argparse.Namespace) -> None:
    first, inputs = load_or_convert(args.model, args.input_size, "MODEL")
    models = {args.model: first}
    second = None
    if args.other is not None:
        other, _ = load_or_convert(args.other, args.input_size, "OTHER")
        check_runs(other, inputs, f"OTHER {args.other} on the inputs of MODEL {args.model}")
        second = args.other if args.other != args.model else f"{args.other} (again)"
        models[second] = other
    comparison = compare_latency(
        models,
        inputs,
        device=args.device,
        batch_size=batch_of(inputs, args.batch_size),
        dtype=args.dtype,
        runs=args.runs,
        threads=args.threads,
    )
    width = max(map(len, models))
    for name, latency in comparison.latencies.items():
        print(f"{name:<{width}s}  {latency}")
    if second is not None:
        runs = comparison.latencies[second].runs
        print(
            f"{second} / {args.model}: {comparison.ratio(second, args.model):.3f} (median of the {runs} "
            "per-round ratios, the two models timed in alternating order in each round)"
        )


def cmd_latency_table(args: argparse.Namespace) -> None:
    dag, inputs = load_or_convert(args.model, args.input_size, "MODEL")
    path = args.output
    if path is None:
        batch = batch_of(inputs, args.batch_size)
        path = table_path(args.model, args.device, dtype_of(dag, args.dtype), batch, args.input_size)
        check_output(path, "the latency table (default path; -o to choose another)")
    table = build_table(dag, inputs, args, args.device, args.batch_size)
    table.save(path)
    print(f"{table}; saved to {path}")
    print_fit(table)


def print_fit(table: LatencyTable) -> None:
    """The table's in-sample fit on its probes, its build time and the rounding it chose, with evidence."""
    measured, predicted = table.fit.get("probes_measured_us", []), table.fit.get("probes_predicted_us", [])
    if measured:
        errors = [abs(p / m - 1) for m, p in zip(measured, predicted) if m]
        pairs = ", ".join(f"{m / 1e3:.3f}/{p / 1e3:.3f}" for m, p in zip(measured, predicted))
        print(
            f"  fit on its {len(measured)} probes (in sample): median error {statistics.median(errors):.1%}, "
            f"largest {max(errors):.1%}; measured/predicted ms: {pairs}"
        )
    print(f"  built in {table.build_seconds:.1f} s")
    evidence = dict(table.fit.get("rounding", {}))
    reason = evidence.pop("reason", None)
    if reason is not None:
        print(f"  widths rounded to multiples of {table.round_to}: {reason}")
    else:
        print(
            f"  widths rounded to multiples of {table.round_to}, chosen on timings: {_evidence_text(evidence)}"
        )


def _evidence_text(evidence: dict) -> str:
    """The rounding's evidence as `latency_table` recorded it, on one line ("ms per gflop 1: 2.1, ...")."""
    parts = []
    for key, value in evidence.items():
        if isinstance(value, dict):
            value = ", ".join(
                f"{k}: {v:g}" if isinstance(v, (int, float)) else f"{k}: {v}" for k, v in value.items()
            )
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        parts.append(f"{key.replace('_', ' ')} {value}")
    return "; ".join(parts) or "none recorded"


def check_table(table: LatencyTable, path: Path, args: argparse.Namespace) -> None:
    """Refuse a table measured in other conditions than the command line asks for (the options given)."""
    wanted = {
        "device type": (table.device_type, args.device and torch.device(args.device).type, "--device"),
        "dtype": (table.dtype, args.dtype, "--dtype"),
        "batch": (table.batch_size, args.latency_batch, "--latency-batch"),
    }
    for what, (have, want, option) in wanted.items():
        if want is not None and have != want:
            raise DagError(
                f"--latency-table {path}: built for {what} {have}, but this run asks for {want} ({option}); "
                "give a table built for it, or leave out --latency-table to use or build the default one"
            )
