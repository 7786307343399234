"""Architecture search against one-shot pruning on Fashion-MNIST (the CNN of fmnist.py, trained there).

1. The trained CNN becomes a searchable DAG: its channel groups flexible (channels ordered by the same
   criterion pruning uses), each group's width a channel mutable over the kept fractions 1/g .. g/g
   (`--grid` g, 8 by default).
2. The supernet trains `--supernet-epochs` epochs on the finetuning split (`td.nas.train_supernet`: the
   largest, the smallest and two random sub-networks per batch, the largest distilled from the trained
   CNN with the labels, the others from the largest). With 0 epochs every sub-network is the trained
   CNN cut to the most important channels of each group (one-shot pruning at those widths), and the
   search picks the widths by validation accuracy after batchnorm re-estimation (EagleEye's recipe).
3. `td.nas.search` (evolution, `--budget` candidates) at 50 % and 30 % of the FLOPs: each candidate's
   batchnorm statistics re-estimated on the calibration batches fmnist.py uses, scored by accuracy on
   `--score-samples` images of the validation split. The search's wall time is recorded.
4. The best sub-network is finetuned exactly as fmnist.py finetunes its pruned models (one epoch of
   `td.finetune` from the trained CNN, labels, learning rate 1e-3, data order seed 2), and its test
   accuracy compared with one-shot pruning of the same CNN to the same FLOPs under the same finetune
   (torch-dag, the `--criterion`; fmnist.py's rows for the other tools).

    python benchmarks/quality/nas_fmnist.py            # resumable: rows in results/quality/nas_fmnist.csv
    python benchmarks/quality/nas_fmnist.py --summary

The supernet is cached (benchmarks/.cache, git-ignored) by its settings. ViT: not run (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from _common import RESULTS, Rows, _fmnist, flops
from fmnist import SEED, VALIDATION, accuracy, data, loader, trained

import torch_dag as td
from torch_dag.pruning import PruneConfig

OUT = RESULTS / "nas_fmnist.csv"
FIELDS = ["model", "experiment", "method", "target", "flops", "finetuned", "accuracy", "seconds", "detail"]
KEY = ["model", "experiment", "method", "target", "finetuned"]
LR = 1e-3  # the finetuning rate fmnist.py chose on its validation split


def supernet(teacher: td.DagModule, example: torch.Tensor, calibration: list, args, tune) -> td.DagModule:
    """The searchable CNN, its supernet trained (cached)."""
    grid = "" if args.grid == 8 else f"_grid{args.grid}"
    cache = _fmnist.CACHE / f"nas_fmnist_cnn_{args.criterion}_{args.supernet_epochs}ep{grid}.dag"
    if cache.exists():
        return td.load(cache)
    config = td.flex.FlexConfig(criterion=args.criterion, round_to=1)
    sdag = td.make_flexible(
        teacher,
        levels=[0.25, 0.5, 0.75, 1.0],
        example_inputs=(example,),
        calibration=calibration,
        config=config,
    )
    td.nas.channel_grid(sdag, [k / args.grid for k in range(1, args.grid + 1)])
    if args.supernet_epochs:
        report = td.nas.train_supernet(
            sdag, tune, epochs=args.supernet_epochs, lr=LR, teacher=copy.deepcopy(teacher), seed=SEED
        )
        print(f"supernet: {report.steps} steps in {report.seconds:.0f} s, losses {report.epoch_losses}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    td.save(sdag, cache)
    return sdag


def run(args: argparse.Namespace) -> None:
    _fmnist.require()
    torch.set_num_threads(args.threads)
    rows = Rows(OUT, FIELDS, KEY)
    x, y, x_test, y_test = data()
    x_tune, y_tune, x_val, y_val = x[:-VALIDATION], y[:-VALIDATION], x[-VALIDATION:], y[-VALIDATION:]
    example = x_test[:1]
    teacher = td.build_from_unstructured_module(trained("cnn", x, y), (example,))
    base_flops = flops(teacher, example)
    calibration = [(x[i : i + 64],) for i in range(0, 256, 64)]  # fmnist.py's
    base = dict(model="cnn", experiment="base", method="unpruned", target=1.0, finetuned=False)
    if not rows.has(**base):
        rows.add({**base, "flops": 1.0, "accuracy": accuracy(teacher, x_test, y_test), "seconds": 0})

    def finetuned(student: td.DagModule, row: dict) -> None:
        """fmnist.py's finetune (one epoch, labels and the trained CNN, seed 2), then test accuracy."""
        if rows.has(**{**row, "finetuned": True}):
            return
        report = td.finetune(
            student, teacher, loader(x_tune, y_tune, 128, seed=SEED), epochs=1, lr=LR, progress=False
        )
        tuned = accuracy(student, x_test, y_test)
        rows.add({**row, "finetuned": True, "accuracy": tuned, "seconds": round(report.seconds, 1)})
        print(f"  {row['method']} at {row['target']}: after one finetune epoch {tuned:.4f}", flush=True)

    for target in args.targets:  # the baseline on the same weights: one-shot pruning
        row = dict(model="cnn", experiment="prune", method=f"torch-dag {args.criterion}", target=target)
        if not rows.has(**row, finetuned=True):
            config = PruneConfig(criterion=args.criterion, round_to=1)
            start = time.perf_counter()
            pruned = td.prune(teacher, target, (example,), calibration=calibration, config=config)
            ratio = flops(pruned, example) / base_flops
            row = {**row, "flops": round(ratio, 4), "seconds": round(time.perf_counter() - start, 2)}
            rows.add({**row, "finetuned": False, "accuracy": accuracy(pruned, x_test, y_test)})
            finetuned(pruned, row)

    tune = loader(x_tune, y_tune, 128, seed=SEED)
    sdag = supernet(teacher, example, calibration, args, tune)
    score = td.nas.accuracy_score(
        list(zip(x_val[: args.score_samples].split(500), y_val[: args.score_samples].split(500)))
    )
    for target in args.targets:
        grid = "" if args.grid == 8 else f" grid {args.grid}"
        method = f"nas {args.criterion} {args.supernet_epochs}ep{grid} evolution"
        row = dict(model="cnn", experiment="search", method=method, target=target)
        if rows.has(**row, finetuned=True):
            continue
        front = td.nas.search(
            sdag,
            score,
            {"flops_ratio": target},
            budget=args.budget,
            example_inputs=(example,),
            calibration=calibration,
            predictor=args.predictor,
            seed=SEED,
        )
        best = front.best
        subnet = td.nas.export_subnet(sdag, best.choice)
        td.recalibrate_batchnorm(subnet, calibration)
        ratio = flops(subnet, example) / base_flops
        detail = json.dumps({"choice": best.choice, "validation": best.score, **front.stats})
        row = {**row, "flops": round(ratio, 4), "seconds": round(front.seconds, 1), "detail": detail}
        rows.add({**row, "finetuned": False, "accuracy": accuracy(subnet, x_test, y_test)})
        print(
            f"search at {target}: {len(front.evaluated)} candidates in {front.seconds:.0f} s; best {best.choice} "
            f"FLOPs {ratio:.3f}, validation {best.score:.4f}",
            flush=True,
        )
        finetuned(subnet, row)


def summarize() -> None:
    rows = Rows(OUT, FIELDS, KEY).all()
    if not rows:
        raise SystemExit(f"no rows in {OUT}")
    print(
        f"{'experiment':10} {'method':34} {'target':>6} {'FLOPs':>6} {'finetuned':>9} {'accuracy':>8} {'seconds':>8}"
    )
    for r in rows:
        print(
            f"{r['experiment']:10} {r['method']:34} {r['target']:>6} {float(r['flops']):6.3f} {r['finetuned']:>9} "
            f"{float(r['accuracy']):8.2%} {r['seconds']:>8}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--criterion", default="taylor", choices=["l2", "taylor"])
    parser.add_argument("--supernet-epochs", type=int, default=1)
    parser.add_argument("--grid", type=int, default=8, help="each group's widths: multiples of 1/grid")
    parser.add_argument("--budget", type=int, default=1000, help="candidates each search scores")
    parser.add_argument(
        "--score-samples", type=int, default=500, help="validation images scoring a candidate"
    )
    parser.add_argument("--predictor", choices=["ridge"], default=None)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    if not args.summary:
        run(args)
    summarize()


if __name__ == "__main__":
    main()
