"""Training-aware pruning (`td.train_prune`) on the Fashion-MNIST CNN of `fmnist.py`, under the training
budget of its one-shot + finetune rows: those prune, then finetune one epoch (the 55k images outside the
validation split, batch 128: 429 steps) at the rate chosen there on validation (1e-3); here
`--train-share` of those steps train the gates (or the group lasso) with the weights, distilled from the
unpruned CNN with the labels, and the rest finetune the pruned model with `td.finetune` (same teacher,
labels, rate and batch), so every row has trained 429 steps of batch 128.

Also the gate overhead: seconds per training step of `train_prune` on the unpruned CNN (gates and group
lasso) over those of plain `td.finetune` of the same CNN on the same batches (the gated model is the
full model plus the gates).

    python benchmarks/quality/train_prune_fmnist.py            # resumable: results/quality/train_prune_fmnist.csv
    python benchmarks/quality/train_prune_fmnist.py --summary  # the rows, with fmnist.csv's one-shot rows
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
import warnings

import torch
from _common import RESULTS, Rows, _fmnist, flops
from fmnist import OUT, SEED, VALIDATION, accuracy, data, loader, trained

import torch_dag as td

CSV = RESULTS / "train_prune_fmnist.csv"
FIELDS = [
    "model",
    "experiment",
    "method",
    "target",
    "flops",
    "train_steps",
    "finetune_steps",
    "stage",
    "value",
    "seconds",
]
KEY = ["model", "experiment", "method", "target", "train_steps", "finetune_steps", "stage"]
LR = 1e-3  # the finetuning rate fmnist.py chose on its validation split for the CNN


def run(args: argparse.Namespace) -> None:
    _fmnist.require()
    torch.set_num_threads(args.threads)
    rows = Rows(CSV, FIELDS, KEY)
    x, y, x_test, y_test = data()
    x_tune, y_tune = x[:-VALIDATION], y[:-VALIDATION]
    example = x_test[:1]
    teacher = td.build_from_unstructured_module(trained("cnn", x, y), (example,))
    base_flops = flops(teacher, example)
    budget = len(loader(x_tune, y_tune, 128, SEED))  # one epoch: the one-shot rows' finetune
    print(
        f"cnn: test accuracy {accuracy(teacher, x_test, y_test):.2%}; training budget {budget} steps of 128"
    )
    if args.overhead:
        overhead(rows, teacher, loader(x_tune, y_tune, 128, SEED), args.overhead)
    for method, target in itertools.product(args.methods, args.targets):
        steps = round(budget * args.train_share)
        key = dict(model="cnn", experiment="train-prune", method=method, target=target, train_steps=steps)
        key["finetune_steps"] = budget - steps
        if rows.has(**key, stage="finetuned"):
            continue
        config = td.TrainPruneConfig(
            training=td.FinetuneConfig(lr=LR, progress=args.progress),
            pruning=td.pruning.PruneConfig(round_to=1),
        )
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned, report = td.train_prune(
                teacher, loader(x_tune, y_tune, 128, SEED), target, steps=steps, method=method,
                example_inputs=(example,), config=config, return_report=True,
            )  # fmt: skip
        seconds = time.perf_counter() - start
        ratio = round(flops(pruned, example) / base_flops, 4)
        print(report.table().splitlines()[0])
        if report.method == "gates":
            print(report.table().splitlines()[1])
        rows.add(
            {
                **key,
                "flops": ratio,
                "stage": "pruned",
                "value": accuracy(pruned, x_test, y_test),
                "seconds": round(seconds, 1),
            }
        )
        rest = list(itertools.islice(loader(x_tune, y_tune, 128, SEED + 1), budget - steps))
        tuned = td.finetune(pruned, teacher, rest, lr=LR, progress=False) if rest else None
        value = accuracy(pruned, x_test, y_test)
        rows.add(
            {
                **key,
                "flops": ratio,
                "stage": "finetuned",
                "value": value,
                "seconds": round(tuned.seconds if tuned else 0.0, 1),
            }
        )
        print(f"{method} at {target}: FLOPs {ratio}, test accuracy {rows.get(**key, stage='pruned')['value']} "
              f"after removal, {value:.4f} after {budget - steps} finetune steps", flush=True)  # fmt: skip


def overhead(rows: Rows, teacher: td.DagModule, batches, steps: int) -> None:
    """Seconds per step: plain finetuning of the unpruned CNN, and train_prune's training on it."""
    batches = list(itertools.islice(batches, steps))
    key = dict(
        model="cnn", experiment="overhead", target=1.0, train_steps=steps, finetune_steps=0, stage="per-step"
    )
    if not rows.has(**key, method="finetune"):
        student = copy.deepcopy(teacher)
        td.finetune(student, teacher, batches[:3], lr=LR, progress=False)  # warm up
        report = td.finetune(student, teacher, batches, lr=LR, progress=False)
        rows.add(
            {
                **key,
                "method": "finetune",
                "flops": 1.0,
                "value": report.seconds / report.steps,
                "seconds": round(report.seconds, 2),
            }
        )
    for method in ("gates", "group_lasso"):
        if rows.has(**key, method=method):
            continue
        config = td.TrainPruneConfig(training=td.FinetuneConfig(lr=LR, progress=False))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, report = td.train_prune(
                teacher, batches, 0.5, steps=steps, method=method, config=config, return_report=True
            )
        rows.add(
            {
                **key,
                "method": method,
                "flops": 1.0,
                "value": report.seconds / report.steps,
                "seconds": round(report.seconds, 2),
            }
        )
    plain = float(rows.get(**key, method="finetune")["value"])
    for method in ("gates", "group_lasso"):
        mine = float(rows.get(**key, method=method)["value"])
        print(
            f"{method}: {mine * 1e3:.1f} ms per step vs plain finetuning {plain * 1e3:.1f} ms: {100 * (mine / plain - 1):+.1f} %"
        )


def summarize() -> None:
    mine = Rows(CSV, FIELDS, KEY).all()
    if not mine:
        raise SystemExit(f"no rows in {CSV}")
    one_shot = [
        r for r in Rows(OUT, [], ["model", "experiment", "method", "target", "finetuned", "lr", "seed"], {"seed": str(SEED)}).all()
        if r["experiment"] == "prune" and r["finetuned"] == "True" and float(r["lr"]) == LR and r["seed"] == str(SEED)
    ]  # fmt: skip
    for target in sorted({r["target"] for r in mine if r["experiment"] == "train-prune"}, reverse=True):
        best = max(
            (r for r in one_shot if float(r["target"]) == float(target)),
            key=lambda r: float(r["accuracy"]),
            default=None,
        )
        if best is not None:
            print(
                f"target {target}: best one-shot + finetune epoch: {best['method']} {float(best['accuracy']):.2%} (FLOPs {best['flops']})"
            )
        for r in mine:
            if r["experiment"] == "train-prune" and r["target"] == target:
                gap = (
                    f" ({100 * (float(r['value']) - float(best['accuracy'])):+.2f}p)"
                    if best and r["stage"] == "finetuned"
                    else ""
                )
                print(
                    f"  {r['method']:12} {r['train_steps']:>4} + {r['finetune_steps']:>3} steps  {r['stage']:9} FLOPs {r['flops']}  {float(r['value']):.2%}{gap}"
                )
    for r in mine:
        if r["experiment"] == "overhead":
            print(
                f"overhead: {r['method']:12} {1e3 * float(r['value']):.1f} ms per step ({r['train_steps']} steps)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--methods", nargs="+", default=["gates", "group_lasso"], choices=["gates", "group_lasso"]
    )
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument(
        "--train-share", type=float, default=0.75, help="of the budget's steps, those that train_prune trains"
    )
    parser.add_argument("--overhead", type=int, default=40, help="steps timed for the overhead (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    if not args.summary:
        run(args)
    summarize()


if __name__ == "__main__":
    main()
