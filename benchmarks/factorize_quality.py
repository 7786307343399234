"""Low-rank factorization: whole-model output error vs FLOPs kept, CPU latency, and the pass's time.

    python benchmarks/factorize_quality.py                 # error vs FLOPs (resnet50, vit_small)
    python benchmarks/factorize_quality.py --latency       # CPU latency, factorized vs original
    python benchmarks/factorize_quality.py --latency --latency-aware --models resnet50 --batches 32
    python benchmarks/factorize_quality.py --pass-time     # factorize() on vit_base_patch16_224
    python benchmarks/factorize_quality.py --overfit       # issue 25: ConvNeXt-T, 4 batches of 2

Error vs FLOPs: timm resnet50 and vit_small_patch16_224 (10 classes, 64 x 64 inputs: Fashion-MNIST
upscaled to 3 channels) trained here for 300 AdamW steps (benchmarks/_fmnist.py, weights cached), so the
weights and activations look trained. Calibration: 8 batches of 32 training images; evaluation: 1,000
test images. For each FLOPs ratio and method (solution svd | data-aware, allocation uniform | error):
relative output error ||f'(x) - f(x)||_F / ||f(x)||_F of the logits on the test images and on the
calibration images, top-1 agreement with the original and test accuracy. Rows go to
benchmarks/results/factorize_quality.csv.

Latency: the default-size (224 x 224) models, random weights (speed depends on shapes only), the
original DAG against the one factorized to 70% of the FLOPs (SVD, error allocation), interleaved
calls (`td.compare_latency`), median over runs, batch 1 and 32; `--latency-aware` adds the model
factorized with `latency=True` at each batch (layers whose pair measures no faster left whole). Pass time: factorize(flops_ratio=0.7) on vit_base_patch16_224
with 8 calibration batches of 1 image (224 x 224 Fashion-MNIST; --calibration-batch to change).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import _fmnist  # benchmarks/ is on sys.path when a script here runs
import torch

import torch_dag as td

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {
    "svd-uniform": (False, "uniform"),
    "svd-error": (False, "error"),
    "data-uniform": (True, "uniform"),
    "data-error": (True, "error"),
}


def relative_error(model, reference: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        out = torch.cat([model(chunk) for chunk in x.split(250)])
    return ((out - reference).norm() / reference.norm()).item()


def quality(models: list[str], ratios: list[float], size: int, out: Path) -> None:
    images, _ = _fmnist.load("train")
    test_images, test_labels = _fmnist.load("t10k")
    g = torch.Generator().manual_seed(1)
    calibration = _fmnist.to_input(images[torch.randperm(len(images), generator=g)[: 8 * 32]], size)
    batches = [(chunk,) for chunk in calibration.split(32)]
    x_test, y_test = _fmnist.to_input(test_images[:1000], size), test_labels[:1000]
    rows = []
    for name in models:
        model = _fmnist.trained_model(name, size, steps=300, batch=32, lr=2e-3 if "resnet" in name else 1e-3)
        dag = td.build_from_unstructured_module(model, (x_test[:2],))
        with torch.no_grad():
            reference = torch.cat([dag(chunk) for chunk in x_test.split(250)])
            calibration_reference = dag(calibration)
        base_accuracy = (reference.argmax(1) == y_test).float().mean().item()
        print(f"{name}: test accuracy {base_accuracy:.3f} (1,000 images)")
        for ratio in ratios:
            for method, (data_aware, allocation) in METHODS.items():
                t0 = time.perf_counter()
                small, report = td.factorize(
                    dag,
                    ratio,
                    calibration=batches if data_aware else None,
                    example_inputs=(x_test[:1],),
                    allocation=allocation,
                    return_report=True,
                )
                seconds = time.perf_counter() - t0
                with torch.no_grad():
                    logits = torch.cat([small(chunk) for chunk in x_test.split(250)])
                row = {
                    "model": name,
                    "flops_target": ratio,
                    "method": method,
                    "flops_kept": round(report.flops_after / report.flops_before, 4),
                    "params_kept": round(report.params_after / report.params_before, 4),
                    "layers_factorized": len(report.factorized),
                    "layers": len(report.layers),
                    "test_error": round(((logits - reference).norm() / reference.norm()).item(), 5),
                    "calibration_error": round(relative_error(small, calibration_reference, calibration), 5),
                    "top1_agreement": round(
                        (logits.argmax(1) == reference.argmax(1)).float().mean().item(), 4
                    ),
                    "accuracy": round((logits.argmax(1) == y_test).float().mean().item(), 4),
                    "base_accuracy": round(base_accuracy, 4),
                    "seconds": round(seconds, 2),
                }
                rows.append(row)
                print(
                    f"  {ratio:.2f} {method:13s} FLOPs {row['flops_kept']:.3f}  test err {row['test_error']:.4f}  "
                    f"calib err {row['calibration_error']:.4f}  agree {row['top1_agreement']:.3f}  "
                    f"acc {row['accuracy']:.3f}  ({seconds:.1f} s)",
                    flush=True,
                )
    _write(out, rows)
    print_ratios(rows)


def print_ratios(rows: list[dict]) -> None:
    """The target's figure: data-aware (error allocation) test error over uniform-rank SVD's."""
    print("\ndata-error / svd-uniform test error (target at 70% FLOPs: <= 0.5)")
    by_key = {(r["model"], r["flops_target"], r["method"]): r for r in rows}
    for (model, ratio, method), row in by_key.items():
        if method == "data-error":
            base = by_key[model, ratio, "svd-uniform"]["test_error"]
            print(f"  {model:24s} {ratio:.2f}  {row['test_error'] / base:.3f}")


def latency(models: list[str], batches: list[int], runs: int, aware: bool, out: Path) -> None:
    """The original and the model factorized to 70 % of the FLOPs timed side by side (`compare_latency`);
    with `aware`, also `factorize(..., latency=True)` at each batch (pairs that measure no faster there
    stay whole)."""
    import timm

    rows = []
    for name in models:
        model = timm.create_model(name, pretrained=False).eval()
        size = model.pretrained_cfg["input_size"]
        dag = td.build_from_unstructured_module(model, (torch.randn(1, *size),))
        small = td.factorize(dag, 0.7, example_inputs=(torch.randn(1, *size),))
        for batch in batches:
            x = torch.randn(batch, *size)
            candidates = {"original": dag, "factorized": small}
            if aware:
                start = time.perf_counter()
                candidates["latency-aware"], report = td.factorize(
                    dag, 0.7, example_inputs=(x,), latency=True, return_report=True
                )
                seconds = time.perf_counter() - start
                print(f"  {name} batch {batch}: factorize(latency=True) {seconds:.1f} s; {report.note}")
            measured = td.compare_latency(candidates, (x,), runs=runs if batch == 1 else max(5, runs // 4))
            row = {"model": name, "batch": batch}
            for key, latency in measured.latencies.items():
                row[f"{key}_ms"] = round(latency.median_ms, 3)
                if key != "original":
                    row[f"{key}_ratio"] = round(measured.ratio(key, "original"), 3)
            if aware:
                row["aware_factorized_layers"] = f"{len(report.factorized)}/{len(report.layers)}"
                row["aware_flops_ratio"] = round(report.flops_after / report.flops_before, 3)
            row |= {"runs": measured.latencies["original"].runs, "threads": torch.get_num_threads()}
            rows.append(row)
            print(f"  {name:24s} batch {batch:3d} (70% FLOPs):\n{measured.table('original')}", flush=True)
    _write(out, rows)


def pass_time(repeats: int, batch: int) -> None:
    import timm

    images, _ = _fmnist.load("train")
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = _fmnist.to_input(images[: 8 * batch], 224)
    dag = td.build_from_unstructured_module(model, (x[:1],))
    batches = [(chunk,) for chunk in x.split(batch)]
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, report = td.factorize(dag, 0.7, calibration=batches, example_inputs=(x[:1],), return_report=True)
        seconds.append(time.perf_counter() - t0)
    print(report.table(top=6))
    print(
        f"vit_base_patch16_224, 8 calibration batches of {batch}: factorize {statistics.median(seconds):.2f} s "
        f"(median of {repeats}; runs {', '.join(f'{s:.2f}' for s in seconds)})"
    )


def overfit(size: int) -> None:
    """Issue 25's case: torchvision ConvNeXt-T (random init), flops_ratio 0.7, calibration 4 batches of 2
    images: the classifier's reported error, and the model's relative output error on a calibration
    batch and on fresh inputs, data-aware and SVD."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None).eval()
    x = torch.randn(2, 3, size, size)
    dag = td.build_from_unstructured_module(model, (x,))
    batches = [(torch.randn(2, 3, size, size),) for _ in range(4)]
    fresh = torch.randn(8, 3, size, size)
    with torch.no_grad():
        reference, on_batch = dag(fresh), dag(*batches[0])
    for calibration, protect in ((batches, False), (batches, True), (None, False)):
        start = time.perf_counter()
        small, report = td.factorize(
            dag,
            0.7,
            calibration=calibration,
            example_inputs=(x,),
            protect_outputs=protect,
            return_report=True,
        )
        seconds = time.perf_counter() - start
        head = next(layer for layer in report.layers if layer.name.startswith("classifier"))
        with torch.no_grad():
            fresh_error = ((small(fresh) - reference).norm() / reference.norm()).item()
            batch_error = ((small(*batches[0]) - on_batch).norm() / on_batch.norm()).item()
        print(
            f"convnext_tiny {size}x{size} {report.method} (protect_outputs={protect}; "
            f"{report.note or 'no calibration'}): classifier rank {head.rank}/{head.full_rank} "
            f"reported error {head.error} ({head.reason or head.solution}); relative output error on "
            f"fresh inputs {fresh_error:.4f}, on calibration batch 0 {batch_error:.4f} ({seconds:.1f} s)"
        )


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--size", type=int, default=64, help="input size the models are trained at")
    parser.add_argument("--latency", action="store_true", help="measure CPU latency instead")
    parser.add_argument(
        "--latency-aware", action="store_true", help="with --latency: also factorize(..., latency=True)"
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--pass-time", action="store_true", help="time factorize() on vit_base_patch16_224")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overfit", type=int, nargs="?", const=224, help="issue 25's ConvNeXt-T case")
    parser.add_argument(
        "--calibration-batch", type=int, default=1, help="images per calibration batch (pass time)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.overfit:
        overfit(args.overfit)
    elif args.pass_time:
        pass_time(args.repeats, args.calibration_batch)
    elif args.latency:
        csv_name = "factorize_latency_aware.csv" if args.latency_aware else "factorize_latency.csv"
        latency(args.models, args.batches, args.runs, args.latency_aware, RESULTS / csv_name)
    else:
        quality(args.models, args.ratios, args.size, RESULTS / "factorize_quality.csv")


if __name__ == "__main__":
    main()
