"""Coverage of every timm model: converts, outputs equal, bitwise round-trip through save/load, and
every conv/linear + BatchNorm pair folds with equal outputs.

    python benchmarks/timm_coverage.py                      # the whole zoo, resumable
    python benchmarks/timm_coverage.py --models resnet50 vit_small_patch16_224
    python benchmarks/timm_coverage.py --retry-failed       # redo rows that did not pass
    python benchmarks/timm_coverage.py --redo-missing bn_pairs   # redo rows written before a column existed
    python benchmarks/timm_coverage.py --summary            # print the table from the CSV only
    python benchmarks/timm_coverage.py --tracer export --sample   # the torch.export path alone, on the CI
                                                            # sample (its own CSV: timm_coverage_export.csv)

Each model runs in a forked subprocess (default input size, pretrained=False, batch 1, eval) with a
timeout; rows go to benchmarks/results/timm_coverage.csv as they finish.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _sweep import read_rows, sweep  # benchmarks/ is on sys.path when a script here runs

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "timm_coverage.csv"
SIZES = RESULTS / "timm_sizes.json"
BIG = 300e6  # parameters above which a model runs alone
FIELDS = [
    "model",
    "status",
    "stage",
    "params_m",
    "input_size",
    "build_s",
    "convert_s",
    "vertices",
    "converted",
    "outputs_equal",
    "max_diff",
    "roundtrip_equal",
    "bn_pairs",
    "bn_folded",
    "fold_equal",
    "error_class",
    "error",
    "traced_with",
]
TRACER = "auto"  # set by --tracer before the children are forked
STAGES = ["start", "build", "eager", "convert", "compare", "roundtrip", "fold", "done"]


def check_model(name: str, stage) -> dict:
    import timm
    import torch

    import torch_dag as td
    from torch_dag.core.compare import bitwise_equal, compare_outputs

    def at(s: str) -> None:
        stage.value = STAGES.index(s)

    at("build")
    t0 = time.perf_counter()
    try:
        model = timm.create_model(name, pretrained=False).eval()
    except Exception as e:
        return {"status": "build_error", "error_class": type(e).__name__, "error": str(e)[:300]}
    build_s = time.perf_counter() - t0
    input_size = tuple(model.pretrained_cfg["input_size"])
    row = {
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "input_size": "x".join(map(str, input_size)),
        "build_s": round(build_s, 2),
        "converted": False,
        "outputs_equal": False,
        "roundtrip_equal": False,
    }
    torch.manual_seed(0)
    x = torch.randn(1, *input_size)
    at("eager")
    with torch.no_grad():
        try:
            reference = model(x)
        except Exception as e:
            return {**row, "status": "eager_error", "error_class": type(e).__name__, "error": str(e)[:300]}
    at("convert")
    t0 = time.perf_counter()
    try:
        dag = td.build_from_unstructured_module(model, (x,), tracer=TRACER)
    except Exception as e:
        return {
            **row,
            "status": "convert_error",
            "error_class": type(e).__name__,
            "error": str(e)[:300].replace("\n", " "),
        }
    row.update(
        convert_s=round(time.perf_counter() - t0, 3),
        vertices=len(dag),
        converted=True,
        traced_with=dag.traced_with,
    )
    at("compare")
    with torch.no_grad():
        out = dag(x)
    equal, diff, reason = compare_outputs(reference, out)
    row.update(outputs_equal=equal, max_diff=f"{diff:.2e}")
    if not equal:
        return {**row, "status": "mismatch", "error_class": "OutputMismatch", "error": reason[:300]}
    at("roundtrip")
    with tempfile.TemporaryDirectory() as tmp:
        path = td.save(dag, Path(tmp) / f"{name}.dag")
        del dag
        loaded = td.load(path)
        with torch.no_grad():
            again = loaded(x)
    row["roundtrip_equal"] = bitwise_equal(out, again)
    if not row["roundtrip_equal"]:
        return {**row, "status": "roundtrip_mismatch", "error_class": "RoundTripMismatch"}
    at("fold")
    row.update(fold_row(loaded, x, out))
    at("done")
    return {**row, "status": "ok"}


def fold_row(dag, x, reference) -> dict:
    """How many conv/linear -> BatchNorm pairs there are, how many fold_batchnorm folded, and whether
    the folded model's outputs equal the DAG's (rtol 1e-4: folding reorders float math)."""
    import torch

    from torch_dag import passes
    from torch_dag.core.compare import compare_outputs

    pairs = len(
        passes.find(dag, passes.op(passes.BATCH_NORMS, inputs=[passes.op(passes.CONVS | {"Linear"})]))
    )
    folded = passes.fold_batchnorm(dag)
    remaining = len(
        passes.find(folded, passes.op(passes.BATCH_NORMS, inputs=[passes.op(passes.CONVS | {"Linear"})]))
    )
    with torch.no_grad():
        equal = compare_outputs(reference, folded(x), rtol=1e-4)[0]
    return {"bn_pairs": pairs, "bn_folded": pairs - remaining, "fold_equal": equal}


def model_sizes(names: list[str]) -> dict[str, float]:
    """Parameter counts, measured on the meta device in a separate process and cached as JSON."""
    sizes = json.loads(SIZES.read_text()) if SIZES.exists() else {}
    missing = [n for n in names if n not in sizes]
    if missing:
        code = (
            "import json, sys, torch, timm\n"
            "out = {}\n"
            "for name in json.load(sys.stdin):\n"
            "    try:\n"
            "        with torch.device('meta'):\n"
            "            m = timm.create_model(name, pretrained=False)\n"
            "        out[name] = sum(p.numel() for p in m.parameters())\n"
            "    except Exception:\n"
            "        out[name] = -1\n"
            "print(json.dumps(out))\n"
        )
        print(f"measuring the size of {len(missing)} models on the meta device ...", flush=True)
        result = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(missing),
            capture_output=True,
            text=True,
            check=True,
        )
        sizes.update(json.loads(result.stdout.strip().splitlines()[-1]))
        SIZES.parent.mkdir(parents=True, exist_ok=True)
        SIZES.write_text(json.dumps(sizes, indent=0, sort_keys=True))
    return sizes


def summarize(rows: dict[str, dict[str, str]]) -> str:
    statuses = collections.Counter(r["status"] for r in rows.values())
    unbuildable = {"build_error", "eager_error"}
    timeouts_before_convert = [
        r
        for r in rows.values()
        if r["status"] in ("timeout", "crashed") and r.get("stage") in ("start", "build", "eager")
    ]
    buildable = [
        r for r in rows.values() if r["status"] not in unbuildable and r not in timeouts_before_convert
    ]
    ok = [r for r in buildable if r["status"] == "ok"]
    times = sorted(float(r["convert_s"]) for r in rows.values() if r.get("convert_s"))
    lines = [
        f"models in sweep:            {len(rows)}",
        f"build on this machine:      {len(buildable)} (not buildable: "
        f"{sum(statuses[s] for s in unbuildable)} errors, {len(timeouts_before_convert)} timeouts/OOM before conversion)",
        f"convert + equal + roundtrip: {len(ok)} / {len(buildable)} = {100 * len(ok) / max(1, len(buildable)):.1f}%",
        f"conversion time: median {statistics.median(times):.3f} s, p90 {times[int(0.9 * len(times))]:.3f} s, "
        f"max {times[-1]:.3f} s over {len(times)} models"
        if times
        else "conversion time: n/a",
        _fold_summary(ok),
        "tracer used: "
        + ", ".join(
            f"{k or 'not recorded (rows from before the export fallback: fx)'}={v}"
            for k, v in collections.Counter(r.get("traced_with", "") for r in ok).items()
        ),
        "status counts: " + ", ".join(f"{k}={v}" for k, v in statuses.most_common()),
        "failures by class:",
    ]
    failures = collections.Counter((r["status"], r["error_class"]) for r in buildable if r["status"] != "ok")
    for (status, cls), n in failures.most_common():
        examples = [r["model"] for r in buildable if r["status"] == status and r["error_class"] == cls][:4]
        lines.append(f"  {n:4d}  {status:18s} {cls:24s} e.g. {', '.join(examples)}")
    return "\n".join(lines)


def _fold_summary(ok: list[dict]) -> str:
    with_fold = [r for r in ok if r.get("bn_pairs")]
    pairs = sum(int(r["bn_pairs"]) for r in with_fold)
    folded = sum(int(r["bn_folded"]) for r in with_fold)
    equal = sum(r["fold_equal"] == "True" for r in with_fold)
    return (
        f"fold_batchnorm: {folded} / {pairs} conv/linear+BN pairs folded in {len(with_fold)} models "
        f"(of {len(ok)} ok rows, {sum(1 for r in ok if r.get('bn_pairs') == '')} not yet checked); "
        f"outputs equal after folding in {equal} / {len(with_fold)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="*", help="model names (default: every timm.list_models())")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--retry-failed", action="store_true", help="redo rows whose status is not ok")
    parser.add_argument("--redo-missing", metavar="COLUMN", help="redo ok rows with no value in COLUMN")
    parser.add_argument("--summary", action="store_true", help="only print the summary of the CSV")
    parser.add_argument(
        "--tracer",
        choices=["auto", "fx", "export"],
        default="auto",
        help="force one conversion path (a CSV of its own unless --out is given)",
    )
    parser.add_argument("--sample", action="store_true", help="the CI sample of tests/test_timm.py only")
    args = parser.parse_args()
    global TRACER
    TRACER = args.tracer
    if args.tracer != "auto" and args.out == OUT:
        args.out = RESULTS / f"timm_coverage_{args.tracer}.csv"
    if args.sample:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_timm import SAMPLE

        args.models = [n for n, _ in SAMPLE]
    if not args.summary:
        import timm
        import torch  # noqa: F401  (imported once here; children are forked)

        import torch_dag  # noqa: F401

        names = args.models or timm.list_models()
        sizes = model_sizes(names)
        names = sorted(names, key=lambda n: sizes.get(n, -1))  # small first; big ones run alone, last

        def retry(row: dict) -> bool:
            missing = args.redo_missing and row["status"] == "ok" and not row.get(args.redo_missing)
            return bool((args.retry_failed and row["status"] != "ok") or missing)

        sweep(
            names,
            check_model,
            args.out,
            FIELDS,
            workers=args.workers,
            timeout=args.timeout,
            retry=retry if args.retry_failed or args.redo_missing else None,
            stages=STAGES,
            exclusive=lambda n: sizes.get(n, 0) > BIG,
        )
    print(summarize(read_rows(args.out)))


if __name__ == "__main__":
    main()
