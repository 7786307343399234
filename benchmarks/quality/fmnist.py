"""Compression quality with real labels: Fashion-MNIST (60k train / 10k test, Debian's
`dataset-fashion-mnist`), a CNN trained here to convergence, then

- pruning to 50 % and 30 % of the FLOPs and one epoch of distillation finetuning (`td.finetune`, labels
  and the unpruned model as teacher), torch-dag vs Torch-Pruning under the identical protocol (same
  criterion, FLOPs, calibration batches, finetune), vs the pruned architecture trained from scratch as
  long as the original (torch-dag-plain: torch-dag without its compensation of the pruned layers);
- factorization to 70 % of the FLOPs: data-aware vs truncated SVD vs uniform rank, before and after the
  same one-epoch finetune;
- one flexible model (levels at 30 / 50 / 100 % of the FLOPs; channels ranked by l2, or by taylor) trained
  one epoch with the sandwich rule, each level against the separately pruned-and-finetuned model of the
  same FLOPs and criterion (CNN only); its rate is chosen from the same `--lrs` on the same validation
  split (mean validation accuracy of its levels); "compensated": made with
  `FlexConfig(compensate="lstsq")` on the calibration batches (shared weights re-solved for all levels);
  "recalibrated": then each level's batchnorm statistics re-estimated on the same batches
  (`td.recalibrate_batchnorm`); each level's accuracy is also recorded before any training.

On the ViT each tool prunes attention in two structures, so that each is compared like for like:
the same positions of every head (Torch-Pruning's default, its `num_heads` option, timm's attention
attributes updated after the step as its examples do; torch-dag-head-dim), and whole heads (torch-dag's
default; torch-pruning-heads: its `prune_num_heads`, the head ratio tied to the channel ratio and
bisected with it, Torch-Pruning having no rule of its own for sharing a FLOPs target between them).
MLP and embedding widths are pruned in both.

    sudo apt-get install dataset-fashion-mnist    # /usr/share/datasets/fashion-mnist
    python benchmarks/quality/fmnist.py               # resumable: rows in results/quality/fmnist.csv
    python benchmarks/quality/fmnist.py --model vit   # a small timm ViT: results/quality/fmnist_vit.csv
    python benchmarks/quality/fmnist.py --model vit --seeds 2 3 4 5 6   # pruned rows: finetuned 5 times
    python benchmarks/quality/fmnist.py --summary

Test accuracy is on all 10k test images. The finetuning learning rate is chosen on a validation split
(the last 5k training images, left out of every finetune): each rate of `--lrs` finetunes both tools'
l2 models at 50 % once, and the rate with the best mean validation accuracy serves every finetune.
(The CNN itself was trained on all 60k, so validation accuracies are optimistic; they only rank rates.)
The finetune's data order is seeded (seed 2); `--seeds` finetunes every pruned model once per seed and
the summary shows their mean and standard deviation. Everything is seeded; the trained models are
cached (benchmarks/.cache, git-ignored).
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS, Rows, _fmnist, flops, plot, timed, tp_prune
from safetensors.torch import load_file, save_file
from torch import nn

import torch_dag as td
from torch_dag.pruning import PruneConfig

OUT = RESULTS / "fmnist.csv"
FIELDS = [
    "model",
    "experiment",
    "method",
    "target",
    "flops",
    "finetuned",
    "lr",
    "seed",
    "accuracy",
    "seconds",
]
KEY = ["model", "experiment", "method", "target", "finetuned", "lr", "seed"]
SEED = 2  # the finetuning data order's seed; --seeds adds more for the pruned models
OLD = {"seed": str(SEED)}  # rows written before the seed column
VALIDATION = 5000  # the last training images: for choosing the finetuning learning rate


def cnn() -> nn.Module:
    """A small VGG-style CNN for 28 x 28 gray images (about 9 M multiply-adds)."""

    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def vit() -> nn.Module:
    """A small ViT for 28 x 28 gray images: 7 x 7 patches, width 96, 4 blocks of 4 heads (about 8 M
    multiply-adds)."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=7,
        in_chans=1,
        num_classes=10,
        embed_dim=96,
        depth=4,
        num_heads=4,
    )


def _tp_vit_options(model: nn.Module, ratio: float, whole_heads: bool = False) -> dict:
    """Torch-Pruning's arguments for timm attention: each qkv's head count; it prunes head dims, or
    with `whole_heads` whole heads (ranked globally, the same fraction as the other channels)."""
    import timm

    heads = {
        m.qkv: m.num_heads for m in model.modules() if isinstance(m, timm.models.vision_transformer.Attention)
    }
    if not whole_heads:
        return {"num_heads": heads}
    return {
        "num_heads": heads,
        "prune_num_heads": True,
        "prune_head_dims": False,
        "head_pruning_ratio": ratio,
    }


def _tp_vit_after(model: nn.Module, pruner) -> None:
    import timm

    for m in model.modules():
        if isinstance(m, timm.models.vision_transformer.Attention):
            m.num_heads = pruner.num_heads[m.qkv]
            if m.num_heads == 0:
                raise RuntimeError(f"Torch-Pruning removed every head of {m.qkv}")
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.head_dim * m.num_heads


# name: (factory, training epochs, training learning rate, the output layer, Torch-Pruning's options)
MODELS = {
    "cnn": (cnn, 6, 2e-3, lambda m: m[-1], {}),
    "vit": (vit, 20, 1e-3, lambda m: m.head, dict(options=_tp_vit_options, after=_tp_vit_after)),
}


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels = _fmnist.load("train")
    test_images, test_labels = _fmnist.load("t10k")
    prepare = lambda im: ((im.float() / 255 - _fmnist.MEAN) / _fmnist.STD)[:, None]  # noqa: E731
    return prepare(images), labels, prepare(test_images), test_labels


def loader(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float = 2e-3,
    seed: int = 0,
    log=print,
) -> nn.Module:
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


def trained(name: str, x: torch.Tensor, y: torch.Tensor, epochs: int | None = None) -> torch.nn.Module:
    """The `name` model trained `epochs` epochs (its default in MODELS) on all of `x`, `y`, in eval mode;
    cached (benchmarks/.cache) by name and epochs, so every quality script starts from the same weights."""
    factory, default_epochs, train_lr, *_ = MODELS[name]
    epochs = epochs or default_epochs
    cache = _fmnist.CACHE / f"fmnist_{name}_{epochs}ep.safetensors"
    torch.manual_seed(0)
    model = factory()
    if cache.exists():
        model.load_state_dict(load_file(cache))
    else:
        print(f"training the {name} for {epochs} epochs")
        train(model, x, y, epochs, lr=train_lr)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), cache)
    return model.eval()


def run(args: argparse.Namespace) -> None:
    _fmnist.require()
    torch.set_num_threads(args.threads)
    rows = Rows(csv_of(args.model), FIELDS, KEY, OLD)
    x, y, x_test, y_test = data()
    x_tune, y_tune, x_val, y_val = x[:-VALIDATION], y[:-VALIDATION], x[-VALIDATION:], y[-VALIDATION:]
    example = x_test[:1]
    name = args.model
    _, epochs, train_lr, output_layer, tp_options = MODELS[name]
    epochs = args.epochs or epochs
    model = trained(name, x, y, epochs)
    teacher = td.build_from_unstructured_module(model, (example,))
    base_flops = flops(teacher, example)
    base = accuracy(teacher, x_test, y_test)
    rows.add(
        dict(
            model=name,
            experiment="base",
            method="unpruned",
            target=1.0,
            flops=1.0,
            finetuned=False,
            lr=0,
            accuracy=base,
            seconds=0,
        )
    )
    print(f"{name}: {base_flops / 1e6:.1f} MFLOPs, test accuracy {base:.2%}")
    calibration = [(x[i : i + 64],) for i in range(0, 256, 64)]

    def pruned_by(tool: str, criterion: str, target: float) -> nn.Module:
        if tool.startswith("torch-pruning"):
            options = dict(tp_options)
            if tool == "torch-pruning-heads":
                options["options"] = functools.partial(options["options"], whole_heads=True)
            return tp_prune(
                model,
                example,
                target,
                criterion,
                [b[0] for b in calibration],
                ignored=[output_layer(model)],
                **options,
            )[0]
        config = PruneConfig(
            criterion=criterion,
            round_to=1,
            compensate="none" if tool == "torch-dag-plain" else "lstsq",
            attention="head_dim" if tool == "torch-dag-head-dim" else "heads",
        )
        return td.prune(teacher, target, (example,), calibration=calibration, config=config)

    def finetune(student: nn.Module, lr: float, seed: int = SEED):  # seed: the loader's shuffling
        return td.finetune(
            student, teacher, loader(x_tune, y_tune, 128, seed=seed), epochs=1, lr=lr, progress=False
        )

    validation = {}
    for lr in args.lrs:
        for tool in ("torch-dag", "torch-pruning"):
            key = dict(
                model=name, experiment="lr", method=f"{tool} l2", target=0.5, finetuned=True, lr=lr, seed=SEED
            )
            if not rows.has(**key):
                student = pruned_by(tool, "l2", 0.5)
                report = finetune(student, lr)
                rows.add(
                    {
                        **key,
                        "flops": round(flops(student, example) / base_flops, 4),
                        "accuracy": accuracy(student, x_val, y_val),
                        "seconds": round(report.seconds, 1),
                    }
                )
            validation.setdefault(lr, []).append(float(rows.get(**key)["accuracy"]))
    lr = max(args.lrs, key=lambda r: sum(validation[r]))
    print(
        "validation accuracy per finetuning rate: "
        + ", ".join(f"{r:g}: {sum(v) / len(v):.2%}" for r, v in validation.items())
        + f"; finetuning at {lr:g}"
    )

    def record(
        experiment: str,
        method: str,
        target: float,
        student: nn.Module,
        seconds: float = 0.0,
        seeds: Sequence[int] = (SEED,),
    ) -> None:
        """The compressed model's test accuracy, and after one finetune epoch per data-order seed."""
        ratio = flops(student, example) / base_flops
        row = dict(
            model=name,
            experiment=experiment,
            method=method,
            target=target,
            flops=round(ratio, 4),
            finetuned=False,
            lr=lr if experiment != "scratch" else 0,
            seed=SEED,
            accuracy=accuracy(student, x_test, y_test),
            seconds=round(seconds, 2),
        )
        rows.add(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        if experiment == "scratch":
            return
        for seed in seeds:
            if rows.has(**{**row, "finetuned": True, "seed": seed}):
                continue
            tuned_student = copy.deepcopy(student)
            report = finetune(tuned_student, lr, seed)
            tuned = accuracy(tuned_student, x_test, y_test)
            rows.add(
                {
                    **row,
                    "finetuned": True,
                    "seed": seed,
                    "accuracy": tuned,
                    "seconds": round(report.seconds, 1),
                }
            )
            print(f"    after one finetune epoch (seed {seed}): {tuned:.4f}", flush=True)

    def flexible_model(config: td.flex.FlexConfig, recalibrate: bool) -> td.flex.FlexDagModule:
        flexible = td.make_flexible(
            teacher,
            example_inputs=(example,),
            flops_ratios=[0.3, 0.5, 1.0],
            calibration=calibration,
            config=config,
        )
        if recalibrate:
            td.recalibrate_batchnorm(flexible, calibration)
        return flexible

    def record_levels(
        flexible: td.flex.FlexDagModule, method: str, finetuned: bool, rate: float, seconds: float
    ) -> None:
        for level, target in enumerate((0.3, 0.5, 1.0)):
            flexible.set_level_use(level)
            plain = flexible.make_base_copy()
            row = dict(
                model=name,
                experiment="flex",
                method=method,
                target=target,
                flops=round(flops(plain, example) / base_flops, 4),
                finetuned=finetuned,
                lr=rate,
                seed=SEED,
                accuracy=accuracy(plain, x_test, y_test),
                seconds=round(seconds, 1),
            )
            if finetuned:
                rows.add({**row, "experiment": "flex-lr", "accuracy": accuracy(plain, x_val, y_val)})
            rows.add(row)
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    for tool in args.tools:
        for target in args.targets:
            for criterion in args.criteria:
                method = f"{tool} {criterion}"
                if not all(
                    rows.has(
                        model=name,
                        experiment="prune",
                        method=method,
                        target=target,
                        finetuned=True,
                        lr=lr,
                        seed=seed,
                    )
                    for seed in args.seeds
                ):
                    student, seconds = timed(pruned_by, tool, criterion, target)
                    record("prune", method, target, student, seconds, args.seeds)
        if tool != "torch-dag":
            continue
        for target in args.targets if args.scratch else ():
            if not rows.has(
                model=name,
                experiment="scratch",
                method="torch-dag l2 architecture",
                target=target,
                finetuned=False,
                lr=0,
                seed=SEED,
            ):
                architecture = td.prune(
                    teacher, target, (example,), config=PruneConfig(criterion="l2", round_to=1)
                )
                start = time.perf_counter()
                scratch = train(reinitialized(architecture), x, y, epochs, lr=train_lr)
                record("scratch", "torch-dag l2 architecture", target, scratch, time.perf_counter() - start)

        for method, options in (
            ("data-aware", dict(calibration=calibration)),
            ("svd", {}),
            ("uniform rank", dict(calibration=calibration, allocation="uniform")),
        ):
            if not rows.has(
                model=name,
                experiment="factorize",
                method=method,
                target=0.7,
                finetuned=True,
                lr=lr,
                seed=SEED,
            ):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    small, seconds = timed(td.factorize, teacher, 0.7, example_inputs=(example,), **options)
                record("factorize", method, 0.7, small, seconds)

        variants = (
            ("", "none", False),
            (" compensated", "lstsq", False),
            (" compensated recalibrated", "lstsq", True),
        )
        for criterion, (suffix, compensate, recalibrate) in itertools.product(
            ("l2", "taylor") if name == "cnn" else (), variants
        ):
            method = "flexible level" + ("" if criterion == "l2" else f" {criterion}") + suffix
            config = td.flex.FlexConfig(criterion=criterion, round_to=1, compensate=compensate)
            if not rows.has(model=name, experiment="flex", method=method, target=0.3, finetuned=False, lr=0):
                record_levels(
                    flexible_model(config, recalibrate), method, False, 0, 0.0
                )  # before any training
            for flex_lr in args.lrs:  # the flexible model's own rate, chosen on validation like the others'
                if not rows.has(
                    model=name, experiment="flex", method=method, target=0.3, finetuned=True, lr=flex_lr
                ):
                    flexible = flexible_model(config, recalibrate)
                    record_levels(flexible, method, True, flex_lr, finetune(flexible, flex_lr).seconds)


def csv_of(name: str) -> Path:
    """Each model's rows in a file of its own (two models can run at once)."""
    return OUT if name == "cnn" else OUT.with_name(f"fmnist_{name}.csv")


def summarize() -> None:
    done = [name for name in MODELS if csv_of(name).exists()]
    if not done:
        raise SystemExit(f"no rows in {OUT}")
    for name in done:
        summarize_model(name, Rows(csv_of(name), FIELDS, KEY, OLD).all())


def summarize_model(name: str, rows: list[dict]) -> None:
    base = next(float(r["accuracy"]) for r in rows if r["experiment"] == "base")
    print(f"unpruned {name} test accuracy: {base:.2%}")
    validation: dict[str, list[float]] = {}
    for r in rows:
        if r["experiment"] == "lr":
            validation.setdefault(r["lr"], []).append(float(r["accuracy"]))
    if validation:
        lr = max(validation, key=lambda k: sum(validation[k]))
        print(
            "finetuning rate chosen on the validation split (mean of both tools' l2 models at 50 %): "
            + ", ".join(f"{float(k):g}: {sum(v) / len(v):.2%}" for k, v in validation.items())
            + f" -> {float(lr):g}"
        )
        flex_validation: dict[tuple[str, str], list[float]] = {}
        for r in rows:
            if r["experiment"] == "flex-lr":
                flex_validation.setdefault((r["method"], r["lr"]), []).append(float(r["accuracy"]))
        flex_lr = {}
        for (method, rate), values in sorted(flex_validation.items()):
            best = flex_lr.get(method)
            if best is None or sum(values) > sum(flex_validation[method, best]):
                flex_lr[method] = rate
        for method, best in flex_lr.items():
            print(
                f"{method}: its rate chosen on validation (mean of its levels): "
                + ", ".join(
                    f"{float(k):g}: {sum(v) / len(v):.2%}"
                    for (m, k), v in flex_validation.items()
                    if m == method
                )
                + f" -> {float(best):g}"
            )

        def kept(r: dict) -> bool:
            if r["experiment"] in ("lr", "flex-lr"):
                return False
            if r["experiment"] == "flex" and r["finetuned"] == "True" and r["method"] in flex_lr:
                return float(r["lr"]) == float(flex_lr[r["method"]])
            return float(r["lr"]) in (0.0, float(lr))

        rows = [r for r in rows if kept(r)]
    print(
        f"{'experiment':10} {'method':34} {'target':>6} {'FLOPs':>6} {'compressed':>10} {'+1 epoch':>16} "
        f"{'final vs unpruned':>17}   (scratch: trained as long as the original; flex: after its one epoch; "
        f"+1 epoch over several seeds: mean +-std (seeds))"
    )
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["experiment"], r["method"], r["target"], r["finetuned"]), []).append(r)

    def cell(group: list[dict] | None) -> str:
        if not group:
            return "-"
        values = [float(r["accuracy"]) for r in group]
        if len(values) == 1:
            return f"{values[0]:.2%}"
        return f"{statistics.mean(values):.2%} +-{100 * statistics.stdev(values):.2f} ({len(values)})"

    for (experiment, method, target, finetuned), group in sorted(by.items()):
        if experiment == "base" or (finetuned == "True" and (experiment, method, target, "False") in by):
            continue
        tuned = by.get((experiment, method, target, "True"))
        plain = by.get((experiment, method, target, "False"))
        final = statistics.mean(float(r["accuracy"]) for r in tuned or plain)
        print(
            f"{experiment:10} {method:34} {target:>6} {float(group[0]['flops']):6.3f} {cell(plain):>10} "
            f"{cell(tuned):>16} {100 * (final - base):+16.2f}p"
        )

    def after(row: dict) -> bool:
        return row["finetuned"] == "True" or row["experiment"] == "scratch"

    plot(
        [r for r in rows if r["experiment"] in ("prune", "scratch", "flex", "factorize")],
        "flops",
        "accuracy",
        lambda r: f"{r['experiment']}: {r['method']}",
        csv_of(name).with_suffix(".png"),
        f"Fashion-MNIST {name}, test accuracy",
        "test accuracy",
        reference=base,
        sharey=False,
        panel=lambda r: (
            "after one finetune epoch (scratch: trained anew)" if after(r) else "before finetuning"
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="cnn")
    parser.add_argument(
        "--epochs", type=int, help="training epochs of the model and of scratch runs (default: cnn 6, vit 20)"
    )
    parser.add_argument("--criteria", nargs="+", default=["l2", "taylor"])
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[1e-3, 3e-4, 1e-4],
        help="finetuning learning rates to choose from on the validation split",
    )
    parser.add_argument(
        "--tools",
        nargs="+",
        default=["torch-dag", "torch-pruning", "torch-dag-plain"],
        choices=[
            "torch-dag",
            "torch-pruning",
            "torch-dag-plain",
            "torch-dag-head-dim",
            "torch-pruning-heads",
        ],
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[SEED],
        help="finetuning data-order seeds of the pruned models (one row each; the summary shows "
        "their mean and spread)",
    )
    parser.add_argument(
        "--targets", type=float, nargs="+", default=[0.5, 0.3], help="FLOPs ratios to prune to"
    )
    parser.add_argument(
        "--no-scratch",
        dest="scratch",
        action="store_false",
        help="skip training the pruned architectures from scratch (the longest runs)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    if not args.summary:
        run(args)
    summarize()


if __name__ == "__main__":
    main()
