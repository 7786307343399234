"""torchvision coverage: every name of `torchvision.models.list_models()`, converted without and with
example inputs, checked against eager, round-tripped, then pruned to half the FLOPs.

    python benchmarks/torchvision_coverage.py                      # all 121 names, resumable, small first
    python benchmarks/torchvision_coverage.py --family video optical_flow
    python benchmarks/torchvision_coverage.py --models resnet18 raft_small --out /tmp/tv.csv
    python benchmarks/torchvision_coverage.py --models vgg11 --redo     # run names already in the CSV again
    python benchmarks/torchvision_coverage.py --summary            # per family figures, failures by cause

Every model is built with `weights=None` (and `weights_backbone=None` where the builder takes it: random
weights, nothing downloaded) and runs in its own forked subprocess (`_sweep.py`: timeout, at most
`--workers` at once, models over 300 M parameters alone, rows appended to
benchmarks/results/torchvision_coverage.csv as they finish; a model that times out keeps the stages it
finished). Stages, each recorded on its own so a failure in one does not hide the others:

1. without inputs: `td.build_from_unstructured_module(model)` (the seed call); outputs equal to eager
   on fresh inputs (shaped from the DAG's `input_meta`, else the family's standard input) and a bitwise
   round trip through save / load;
2. with inputs: the same call given the family's standard input (images 1x3x224x224; segmentation the
   same size (torchvision trains at 520, 224 keeps memory low); video 1x3x16xSxS with S the crop size
   of the model's weights transforms (112 for the ResNet-3D family, 224 for S3D, MViT, Swin3D); optical
   flow two 1x3x224x224 images; detection a list of one 3x224x224 image); equal on fresh inputs of that
   shape, round trip;
3. prune: `td.prune(dag, 0.5, inputs)` on the DAG of stage 2 (else of stage 1); FLOPs (fvcore
   convention) within 2 points of half, the pruned DAG runs with the same output shapes, `td.verify`
   passes and it round-trips bitwise.

A model whose forward cannot be traced at all shows as failing stages 1 and 2 with the error's class
and message. The family of a name is the `torchvision.models` submodule that lists it (classification,
quantization: float models with quant / dequant stubs, as built with `quantize=False`; segmentation,
detection, video, optical_flow). `--summary` prints, per family, the share converted with outputs equal
without and with inputs and the share of the convertible ones pruned to half the FLOPs, then the
failures of each stage grouped by cause (error class and message with names and numbers blanked).
"""

from __future__ import annotations

import argparse
import collections
import functools
from pathlib import Path
from typing import Any

from _sweep import attempt, cause, read_rows, sweep  # benchmarks/ is on sys.path when a script here runs

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "torchvision_coverage.csv"
PARTS = ("noinput", "with", "prune")
FIELDS = [
    "model",
    "family",
    "status",
    "stage",
    "params_m",
    "input",
    "noinput_status",
    "noinput_meta",
    "noinput_equal",
    "noinput_roundtrip",
    "noinput_error_class",
    "noinput_error",
    "with_status",
    "traced_with",
    "vertices",
    "with_equal",
    "with_roundtrip",
    "with_error_class",
    "with_error",
    "prune_status",
    "flops_ratio",
    "pruned_runs",
    "pruned_verified",
    "pruned_roundtrip",
    "prune_error_class",
    "prune_error",
    "seconds",
    "error_class",
    "error",
]
STAGES = ["start", "build", "convert without inputs", "convert with inputs", "prune", "done"]
TARGET = 0.5
BIG = 300e6  # parameters: such a model runs alone
# family -> the torchvision.models submodule that lists its names ("" is torchvision.models itself)
FAMILIES = {
    "classification": "",
    "quantization": "quantization",
    "segmentation": "segmentation",
    "detection": "detection",
    "video": "video",
    "optical_flow": "optical_flow",
}


@functools.cache
def families() -> dict[str, str]:
    """Every name of `list_models()` -> its family (computed once, in the parent: children are forked)."""
    import importlib

    import torchvision

    found = {}
    for family, sub in FAMILIES.items():
        module = importlib.import_module(f"torchvision.models.{sub}" if sub else "torchvision.models")
        found.update(dict.fromkeys(torchvision.models.list_models(module=module), family))
    return {name: found.get(name, "other") for name in torchvision.models.list_models()}


def num_params(name: str) -> float:
    """Parameters of the model's default weights, from torchvision's metadata (nothing downloaded)."""
    import torchvision

    try:
        return float(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
    except Exception:  # a name without weights: unknown size, sorted first
        return -1.0


def build(name: str) -> Any:
    """The model with random weights: `weights=None`, and `weights_backbone=None` where the builder
    takes it (segmentation and detection builders otherwise download an ImageNet backbone)."""
    import inspect

    import torchvision

    builder = torchvision.models.get_model_builder(name)
    backbone = (
        {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
    )
    return builder(weights=None, **backbone).eval()


def standard_inputs(name: str, family: str, seed: int = 0) -> tuple:
    """The family's standard input (see the module docstring), random with `seed`."""
    import torch
    import torchvision

    generator = torch.Generator().manual_seed(seed)

    def image(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    if family == "detection":
        return ([image(3, 224, 224)],)
    if family == "optical_flow":
        return image(1, 3, 224, 224), image(1, 3, 224, 224)
    if family == "video":
        weights = torchvision.models.get_model_weights(name).DEFAULT
        size = weights.transforms().crop_size[0]
        frames = max(16, weights.meta.get("min_temporal_size", 0))
        return (image(1, 3, frames, size, size),)
    return (image(1, 3, 224, 224),)


def fresh_inputs(dag: Any, name: str, family: str) -> tuple:
    """New random inputs shaped as the DAG's `input_meta` records, else the family's standard ones."""
    import torch

    from torch_dag.core.dag import DTYPES

    metas = [dag.input_meta.get(n) or {} for n in dag.input_names]
    if not all("shape" in m for m in metas):
        return standard_inputs(name, family, seed=1)
    generator = torch.Generator().manual_seed(1)
    made = []
    for meta in metas:
        dtype = DTYPES.get(meta.get("dtype", "float32"), torch.float32)
        made.append(
            torch.randn(meta["shape"], generator=generator).to(dtype)
            if dtype.is_floating_point
            else torch.randint(0, 2, meta["shape"], generator=generator, dtype=dtype)
        )
    return tuple(made)


def check_dag(model: Any, dag: Any, inputs: tuple) -> tuple[bool, bool]:
    """Outputs equal to eager on `inputs`, and equal bitwise after a save / load round trip."""
    import tempfile

    import torch

    import torch_dag as td
    from torch_dag.core.compare import bitwise_equal, compare_outputs

    with torch.no_grad():
        reference, out = model(*inputs), dag(*inputs)
        equal = compare_outputs(reference, out)[0]
        with tempfile.TemporaryDirectory() as tmp:
            loaded = td.load(td.save(dag, Path(tmp) / "m.dag"))
            roundtrip = bitwise_equal(out, loaded(*inputs))
    return equal, roundtrip


def convert(row: dict, part: str, model: Any, name: str, family: str, example: tuple | None) -> Any:
    """Stage 1 (`example` None) or 2: convert, compare on fresh inputs, round trip."""
    import torch_dag as td

    def run() -> Any:
        dag = td.build_from_unstructured_module(model, example)
        inputs = fresh_inputs(dag, name, family)
        equal, roundtrip = check_dag(model, dag, inputs)
        row.update({f"{part}_equal": equal, f"{part}_roundtrip": roundtrip})
        row[f"{part}_status"] = "ok" if equal and roundtrip else "mismatch"
        return dag

    dag = attempt(row, part, run)
    if dag is not None and example is None:
        row["noinput_meta"] = ";".join(
            f"{n}:{'x'.join(map(str, m.get('shape', '?')))}" for n, m in dag.input_meta.items()
        )
    if dag is not None and example is not None:
        row.update(traced_with=dag.traced_with, vertices=len(dag))
    return dag if row.get(f"{part}_status") == "ok" else None


def prune(row: dict, dag: Any, inputs: tuple) -> None:
    """Stage 3: prune to half the FLOPs; the pruned DAG runs, keeps output shapes, verifies, round-trips."""
    import tempfile

    import torch

    import torch_dag as td
    from torch_dag.core.compare import bitwise_equal

    def shapes(value: Any) -> Any:
        return torch.utils._pytree.tree_map(lambda t: tuple(getattr(t, "shape", ())), value)

    def run() -> None:
        pruned = td.prune(dag, TARGET, inputs)
        before, after = td.count_flops(dag, *inputs), td.count_flops(pruned, *inputs)
        row["flops_ratio"] = round(after.total_flops / before.total_flops, 4)
        with torch.no_grad():
            reference, out = dag(*inputs), pruned(*inputs)
        row["pruned_runs"] = shapes(reference) == shapes(out)
        row["pruned_verified"] = td.verify(pruned) is not None
        with tempfile.TemporaryDirectory() as tmp:
            loaded = td.load(td.save(pruned, Path(tmp) / "pruned.dag"))
            with torch.no_grad():
                row["pruned_roundtrip"] = bitwise_equal(out, loaded(*inputs))
        within = abs(row["flops_ratio"] - TARGET) <= 0.02
        ok = within and row["pruned_runs"] and row["pruned_roundtrip"]
        row["prune_status"] = "ok" if ok else "off_target" if not within else "mismatch"

    attempt(row, "prune", run)


def check(name: str, stage: Any) -> dict:
    import time
    import warnings

    import torch

    def at(s: str) -> None:
        stage.value = STAGES.index(s)
        stage.report(**row)

    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    family = families()[name]
    row: dict[str, Any] = {"family": family}
    at("build")
    torch.manual_seed(0)
    try:
        model = build(name)
    except Exception as e:
        return {**row, "status": "build_error", "error_class": type(e).__name__, "error": str(e)[:300]}
    example = standard_inputs(name, family)
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    row["input"] = ",".join(
        "x".join(map(str, getattr(t, "shape", ()))) for t in torch.utils._pytree.tree_leaves(example)
    )
    at("convert without inputs")
    without = convert(row, "noinput", model, name, family, None)
    at("convert with inputs")
    with_inputs = convert(row, "with", model, name, family, example)
    at("prune")
    dag = with_inputs if with_inputs is not None else without
    if dag is None:
        row["prune_status"] = "not_converted"
    else:
        prune(row, dag, example)
    at("done")
    row["seconds"] = round(time.perf_counter() - start, 1)
    return {**row, **overall(row)}


def overall(row: dict) -> dict:
    """`status` ok when every stage is; else the first failing stage's error as the row's error."""
    failed = [p for p in PARTS if row.get(f"{p}_status") != "ok"]
    if not failed:
        return {"status": "ok", "error_class": "", "error": ""}
    part = failed[0]
    converted = "ok" in (row.get("noinput_status"), row.get("with_status"))
    return {
        "status": f"{part}_failed" if converted or part != "prune" else "not_converted",
        "error_class": row.get(f"{part}_error_class") or row.get(f"{part}_status", ""),
        "error": row.get(f"{part}_error", ""),
    }


def stopped(row: dict) -> None:
    """A row the sweep wrote for a model that failed to build, timed out or died: the error goes to the
    stage it stopped in (stages before it reported their own results)."""
    part = {"build": "noinput", "convert without inputs": "noinput", "convert with inputs": "with"}
    where = "build" if row.get("status") == "build_error" else row.get("stage", "")
    if row.get("status") in ("build_error", "timeout", "crashed") and where in (*part, "prune"):
        name = part.get(where, "prune")
        row.update({f"{name}_status": "error", f"{name}_error_class": row["error_class"]})
        row[f"{name}_error"] = row["error"]


def summarize(rows: dict[str, dict[str, str]]) -> str:
    by_family = collections.defaultdict(list)
    for row in rows.values():
        stopped(row)
        by_family[row.get("family", "")].append(row)
    lines = [f"{'family':14s} {'models':>6s} {'no inputs':>10s} {'inputs':>8s} {'prune/conv':>11s}"]
    for family, group in sorted(by_family.items()):
        without = sum(r.get("noinput_status") == "ok" for r in group)
        with_ = sum(r.get("with_status") == "ok" for r in group)
        convertible = [r for r in group if "ok" in (r.get("noinput_status"), r.get("with_status"))]
        pruned = sum(r.get("prune_status") == "ok" for r in convertible)
        lines.append(
            f"{family:14s} {len(group):6d} {percent(without, len(group)):>10s} {percent(with_, len(group)):>8s} "
            f"{percent(pruned, len(convertible)):>11s}"
        )
    for part, title in zip(PARTS, ("without inputs", "with inputs", "prune (convertible models)")):
        failing = [r for r in rows.values() if r.get(f"{part}_status") not in ("ok", "not_converted")]
        causes = collections.Counter(cause(r, part) for r in failing)
        lines.append(f"failures {title}: {len(failing)}")
        for reason, count in causes.most_common():
            names = [r["model"] for r in failing if cause(r, part) == reason]
            lines.append(
                f"  {count:3d}  {reason}  ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"
            )
    return "\n".join(lines)


def percent(count: int, total: int) -> str:
    return f"{count}/{total} {100 * count / total:.0f}%" if total else "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", help="only these names")
    parser.add_argument("--family", nargs="*", choices=list(FAMILIES), help="only these families")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--redo", action="store_true", help="run the chosen models again even if in the CSV")
    parser.add_argument("--summary", action="store_true", help="only print the summary of the CSV")
    parser.add_argument(
        "--verbose", action="store_true", help="show what the models print (quiet by default)"
    )
    args = parser.parse_args()
    if not args.summary:
        import torch  # noqa: F401  (imported once here; children are forked)
        import torchvision  # noqa: F401

        import torch_dag  # noqa: F401

        names = families()
        chosen = [n for n in names if (not args.models or n in args.models)]
        chosen = [n for n in chosen if not args.family or names[n] in args.family]
        unknown = sorted(set(args.models or ()) - set(names))
        if unknown:
            parser.error(f"not in torchvision.models.list_models(): {', '.join(unknown)}")
        sizes = {n: num_params(n) for n in chosen}
        chosen.sort(key=lambda n: sizes[n])
        sweep(
            chosen,
            check,
            args.out,
            FIELDS,
            workers=args.workers,
            timeout=args.timeout,
            stages=STAGES,
            exclusive=lambda n: sizes[n] > BIG,
            retry=(lambda row: True) if args.redo else None,
            quiet=not args.verbose,
        )
    print(summarize(read_rows(args.out)))


if __name__ == "__main__":
    main()
