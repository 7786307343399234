"""Compression quality with real labels: Fashion-MNIST (60k train / 10k test, Debian's
`dataset-fashion-mnist`), a CNN trained here to convergence, then

- pruning to 50 % and 30 % of the FLOPs and one epoch of distillation finetuning (`td.finetune`, labels
  and the unpruned model as teacher), torch-dag vs Torch-Pruning under the identical protocol (same
  criterion, FLOPs, finetune), vs the pruned architecture trained from scratch as long as the original;
- factorization to 70 % of the FLOPs: data-aware vs truncated SVD vs uniform rank, before and after the
  same one-epoch finetune;
- one flexible model (levels at 30 / 50 / 100 % of the FLOPs) trained one epoch with the sandwich rule,
  each level against the separately pruned-and-finetuned model of the same FLOPs.

    sudo apt-get install dataset-fashion-mnist    # /usr/share/datasets/fashion-mnist
    python benchmarks/quality/fmnist.py           # resumable: rows in results/quality/fmnist.csv
    python benchmarks/quality/fmnist.py --summary

Test accuracy is on all 10k test images. Everything is seeded; the trained CNN is cached
(benchmarks/.cache, git-ignored).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn.functional as F
from _common import RESULTS, Rows, _fmnist, flops, plot, tp_prune
from safetensors.torch import load_file, save_file
from torch import nn

import torch_dag as td
from torch_dag.pruning import PruneConfig

OUT = RESULTS / "fmnist.csv"
FIELDS = ["model", "experiment", "method", "target", "flops", "finetuned", "accuracy", "seconds"]
KEY = ["model", "experiment", "method", "target", "finetuned"]


def cnn() -> nn.Module:
    """A small VGG-style CNN for 28 x 28 gray images (about 9 M multiply-adds)."""
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(*block(1, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2),
                         *block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels = _fmnist.load("train")
    test_images, test_labels = _fmnist.load("t10k")
    prepare = lambda im: ((im.float() / 255 - _fmnist.MEAN) / _fmnist.STD)[:, None]  # noqa: E731
    return prepare(images), labels, prepare(test_images), test_labels


def loader(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=True,
                                       drop_last=True, generator=torch.Generator().manual_seed(seed))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 2e-3, seed: int = 0,
          log=print) -> nn.Module:
    """Plain supervised training (AdamW, one-cycle schedule, batch 128)."""
    torch.manual_seed(seed)
    batches = loader(x, y, 128, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * len(batches))
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        for inputs, target in batches:
            loss = F.cross_entropy(model(inputs), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return sum((model(a).argmax(1) == b).sum().item() for a, b in zip(x.split(1000), y.split(1000))) / len(y)


def reinitialized(model: nn.Module) -> nn.Module:
    fresh = copy.deepcopy(model)
    torch.manual_seed(1)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters") and module is not fresh:
            module.reset_parameters()
    return fresh


def run(args: argparse.Namespace) -> None:
    _fmnist.require()
    torch.set_num_threads(args.threads)
    rows = Rows(OUT, FIELDS, KEY)
    x, y, x_test, y_test = data()
    example = x_test[:1]
    cache = _fmnist.CACHE / f"fmnist_cnn_{args.epochs}ep.safetensors"
    torch.manual_seed(0)
    model = cnn()
    if cache.exists():
        model.load_state_dict(load_file(cache))
    else:
        print(f"training the CNN for {args.epochs} epochs")
        train(model, x, y, args.epochs)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), cache)
    model.eval()
    teacher = td.build_from_unstructured_module(model, (example,))
    base_flops = flops(teacher, example)
    base = accuracy(teacher, x_test, y_test)
    rows.add(dict(model="cnn", experiment="base", method="unpruned", target=1.0, flops=1.0, finetuned=False,
                  accuracy=base, seconds=0))
    print(f"CNN: {base_flops / 1e6:.1f} MFLOPs, test accuracy {base:.2%}")
    calibration = [(x[i:i + 64],) for i in range(0, 256, 64)]

    def record(experiment: str, method: str, target: float, student: nn.Module, seconds: float = 0.0) -> None:
        ratio = flops(student, example) / base_flops
        row = dict(model="cnn", experiment=experiment, method=method, target=target, flops=round(ratio, 4),
                   finetuned=False, accuracy=accuracy(student, x_test, y_test), seconds=round(seconds, 2))
        rows.add(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        if experiment != "scratch":
            report = td.finetune(student, teacher, loader(x, y, 128, seed=2), epochs=1, lr=args.lr,
                                 progress=False)
            tuned = accuracy(student, x_test, y_test)
            rows.add({**row, "finetuned": True, "accuracy": tuned, "seconds": round(report.seconds, 1)})
            print(f"    after one finetune epoch: {tuned:.4f}", flush=True)

    for target in (0.5, 0.3):
        for criterion in args.criteria:
            if not rows.has(model="cnn", experiment="prune", method=f"torch-dag {criterion}", target=target,
                            finetuned=True):
                start = time.perf_counter()
                pruned = td.prune(teacher, target, (example,), calibration=calibration,
                                  config=PruneConfig(criterion=criterion, round_to=1))
                record("prune", f"torch-dag {criterion}", target, pruned, time.perf_counter() - start)
            if not rows.has(model="cnn", experiment="prune", method=f"torch-pruning {criterion}", target=target,
                            finetuned=True):
                start = time.perf_counter()
                pruned, _ = tp_prune(model, example, target, criterion, [b[0] for b in calibration],
                                     ignored=[model[-1]])
                record("prune", f"torch-pruning {criterion}", target, pruned, time.perf_counter() - start)
        if not rows.has(model="cnn", experiment="scratch", method="torch-dag l2 architecture", target=target,
                        finetuned=False):
            architecture = td.prune(teacher, target, (example,), config=PruneConfig(criterion="l2", round_to=1))
            start = time.perf_counter()
            scratch = train(reinitialized(architecture), x, y, args.epochs)
            record("scratch", "torch-dag l2 architecture", target, scratch, time.perf_counter() - start)

    for method, options in (("data-aware", dict(calibration=calibration)), ("svd", {}),
                            ("uniform rank", dict(calibration=calibration, allocation="uniform"))):
        if not rows.has(model="cnn", experiment="factorize", method=method, target=0.7, finetuned=True):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = time.perf_counter()
                small = td.factorize(teacher, 0.7, example_inputs=(example,), **options)
            record("factorize", method, 0.7, small, time.perf_counter() - start)

    if not rows.has(model="cnn", experiment="flex", method="flexible level", target=0.3, finetuned=True):
        flexible = td.make_flexible(teacher, example_inputs=(example,), flops_ratios=[0.3, 0.5, 1.0],
                                    calibration=calibration, config=td.flex.FlexConfig(round_to=1))
        report = td.finetune(flexible, teacher, loader(x, y, 128, seed=2), epochs=1, lr=args.lr, progress=False)
        for level, target in enumerate((0.3, 0.5, 1.0)):
            flexible.set_level_use(level)
            plain = flexible.make_base_copy()
            row = dict(model="cnn", experiment="flex", method="flexible level", target=target,
                       flops=round(flops(plain, example) / base_flops, 4), finetuned=True,
                       accuracy=accuracy(plain, x_test, y_test), seconds=round(report.seconds, 1))
            rows.add(row)
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def summarize() -> None:
    rows = Rows(OUT, FIELDS, KEY).all()
    if not rows:
        raise SystemExit(f"no rows in {OUT}")
    base = next(float(r["accuracy"]) for r in rows if r["experiment"] == "base")
    print(f"unpruned CNN test accuracy: {base:.2%}")
    print(f"{'experiment':10} {'method':28} {'target':>6} {'FLOPs':>6} {'compressed':>10} {'+1 epoch':>8} "
          f"{'final vs unpruned':>17}   (scratch: trained as long as the original; flex: after its one epoch)")
    by = {(r["experiment"], r["method"], r["target"], r["finetuned"]): r for r in rows}
    for (experiment, method, target, finetuned), r in sorted(by.items()):
        if experiment == "base" or (finetuned == "True" and (experiment, method, target, "False") in by):
            continue
        tuned = by.get((experiment, method, target, "True"))
        plain = by.get((experiment, method, target, "False"))
        final = float((tuned or plain)["accuracy"])
        cells = [f"{float(row['accuracy']):.2%}" if row else "-" for row in (plain, tuned)]
        print(f"{experiment:10} {method:28} {target:>6} {float(r['flops']):6.3f} {cells[0]:>10} {cells[1]:>8} "
              f"{100 * (final - base):+16.2f}p")
    final_rows = [r for r in rows if r["experiment"] in ("prune", "scratch", "flex")
                  and (r["finetuned"] == "True" or r["experiment"] == "scratch")]
    plot(final_rows, "flops", "accuracy", lambda r: f"{r['experiment']}: {r['method']}", OUT.with_suffix(".png"),
         "Fashion-MNIST CNN: test accuracy after one finetune epoch", "test accuracy", reference=base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of the CNN (and of scratch runs)")
    parser.add_argument("--criteria", nargs="+", default=["l2", "taylor"])
    parser.add_argument("--lr", type=float, default=1e-3, help="finetuning learning rate")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    if not args.summary:
        run(args)
    summarize()


if __name__ == "__main__":
    main()
