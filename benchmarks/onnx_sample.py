"""ONNX export of the CI timm sample (tests/test_timm.py's SAMPLE): every model exported with
`td.export_onnx` (dynamic batch), run in onnxruntime at the conversion batch and at batch 2, outputs
compared with the DagModule's: equal when max |onnx - dag| <= 1e-4 x max(1, max |dag|), the project's
equality criterion (`torch_dag.core.compare.compare_outputs`) at rtol 1e-4. Random-init timm models can have
outputs of 1e10 and more, where element-wise `allclose` fails on fp32 rounding of the smallest logits; its
verdict is recorded beside (`elementwise_allclose`, rtol 1e-4, atol 1e-5).

    python benchmarks/onnx_sample.py              # rows in benchmarks/results/onnx_sample.csv
    python benchmarks/onnx_sample.py --summary

Each model runs in a forked subprocess with a timeout (benchmarks/_sweep.py), resumable.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

from _sweep import read_rows, sweep  # benchmarks/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "onnx_sample.csv"
FIELDS = [
    "model",
    "status",
    "stage",
    "input_size",
    "export_s",
    "max_diff",
    "max_abs_output",
    "batch1_equal",
    "batch2_equal",
    "elementwise_allclose",
    "error_class",
    "error",
]
STAGES = ["start", "convert", "export", "run", "done"]


def check_model(name: str, stage, size: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    import timm
    import torch
    from torch.utils import _pytree as pytree

    import torch_dag as td
    from torch_dag.core.compare import compare_outputs

    stage.value = STAGES.index("convert")
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    dag = td.build_from_unstructured_module(timm.create_model(name, pretrained=False).eval(), (x,))
    row = {"input_size": f"3x{size}x{size}"}
    with tempfile.TemporaryDirectory() as tmp:
        stage.value = STAGES.index("export")
        t0 = time.perf_counter()
        try:
            path = td.export_onnx(dag, Path(tmp) / "model.onnx", (x,))
        except Exception as e:
            return {**row, "status": "export_error", "error_class": type(e).__name__, "error": str(e)[:300]}
        row["export_s"] = round(time.perf_counter() - t0, 2)
        stage.value = STAGES.index("run")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        worst = scale = 0.0
        elementwise = True
        for batch in (1, 2):
            inputs = x if batch == 1 else torch.randn(2, 3, size, size)
            with torch.no_grad():
                expected = [t for t in pytree.tree_leaves(dag(inputs)) if t is not None]
            actual = [torch.from_numpy(a) for a in session.run(None, {dag.input_names[0]: inputs.numpy()})]
            equal, diff, _ = compare_outputs(expected, actual, rtol=1e-4)
            worst, scale = max(worst, diff), max([scale, *(float(t.abs().max()) for t in expected)])
            elementwise &= len(actual) == len(expected) and all(
                np.allclose(a.numpy(), e.numpy(), rtol=1e-4, atol=1e-5) for a, e in zip(actual, expected)
            )
            row[f"batch{batch}_equal"] = equal
        row["elementwise_allclose"] = elementwise
    stage.value = STAGES.index("done")
    ok = row["batch1_equal"] and row["batch2_equal"]
    return {
        **row,
        "max_diff": f"{worst:.2e}",
        "max_abs_output": f"{scale:.2e}",
        "status": "ok" if ok else "mismatch",
        "error_class": "" if ok else "OutputMismatch",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--retry-failed", action="store_true")
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    if not args.summary:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_timm import SAMPLE

        sizes = dict(SAMPLE)
        sweep(
            [n for n, _ in SAMPLE],
            lambda name, stage: check_model(name, stage, sizes[name]),
            OUT,
            FIELDS,
            workers=args.workers,
            timeout=args.timeout,
            stages=STAGES,
            retry=(lambda row: row["status"] != "ok") if args.retry_failed else None,
        )
    rows = read_rows(OUT)
    statuses = collections.Counter(r["status"] for r in rows.values())
    elementwise = sum(r.get("elementwise_allclose") == "True" for r in rows.values())
    print(
        f"ONNX export of the CI timm sample: {statuses['ok']} / {len(rows)} export, run in onnxruntime and "
        f"match the DAG at batch 1 and 2 (max diff <= 1e-4 x max(1, max|output|)); element-wise allclose "
        f"(rtol 1e-4, atol 1e-5) holds for {elementwise}"
    )
    for row in rows.values():
        if row["status"] != "ok":
            print(f"  {row['model']:32s} {row['status']:14s} {row['error_class']:16s} {row['error'][:150]}")
    times = sorted(float(r["export_s"]) for r in rows.values() if r.get("export_s"))
    if times:
        print(f"export time: median {times[len(times) // 2]:.1f} s, max {times[-1]:.1f} s")


if __name__ == "__main__":
    main()
