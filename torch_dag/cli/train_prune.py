"""`torch-dag train-prune`: learn which channels to remove while training on the user's data
(`td.train_prune`), then remove them; prints the same table as `torch-dag prune`."""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch

from .. import serde
from ..core.errors import DagError
from ..core.options import choices
from ..finetuning import FinetuneConfig, Optimizer
from ..finetuning.train_prune import Method, TrainPruneConfig, train_prune
from ..latency import LatencyTable
from ..pruning import PruneConfig
from ..pruning.groups import AttentionMode
from .models import check_runs, load_or_convert
from .values import FRACTION, integer, load_array, load_labels, number


def add_train_prune_parser(sub: argparse._SubParsersAction) -> None:
    learn = sub.add_parser(
        "train-prune",
        help="learn channel gates (or a group lasso) on data while training, then remove the closed channels",
    )
    learn.add_argument("source", help="a .dag file, timm:NAME or package.module:factory")
    target = learn.add_mutually_exclusive_group(required=True)
    target.add_argument("--flops-ratio", type=FRACTION, help="fraction of the FLOPs to keep, in (0, 1]")
    target.add_argument("--params-ratio", type=FRACTION, help="fraction of the parameters to keep, in (0, 1]")
    target.add_argument("--kmapp", type=number(above=0.0), help="target kmapp (FLOPs per input pixel / 1000)")
    target.add_argument(
        "--latency-ratio", type=FRACTION, help="fraction of the latency to keep (needs --latency-table)"
    )
    learn.add_argument("--latency-table", type=Path, help="a table from `torch-dag latency-table`")
    learn.add_argument("--data", type=Path, required=True, help="a .npy array of model inputs (N x ...)")
    learn.add_argument(
        "--labels", type=Path, help="a .npy array of N class labels (default: distillation only)"
    )
    learn.add_argument(
        "--teacher", help="a .dag file, timm:NAME or package.module:factory (default: the source)"
    )
    learn.add_argument("--steps", type=integer(1), default=1000, help="optimizer steps (--data is cycled)")
    learn.add_argument("--method", choices=choices(Method), default="gates", help="gates or group lasso")
    learn.add_argument("--batch-size", type=integer(1), default=32, help="per process")
    learn.add_argument("--lr", type=number(above=0.0), default=1e-3, help="the weights' peak learning rate")
    learn.add_argument("--gate-lr", type=number(above=0.0), default=0.1, help="the gates' learning rate")
    learn.add_argument("--optimizer", choices=choices(Optimizer), default="adamw", help="the optimizer")
    learn.add_argument("--block", type=integer(1), default=1, help="channel classes per gate")
    learn.add_argument("--round-to", type=integer(1), help="kept widths multiples of this (default: 8)")
    learn.add_argument(
        "--attention", choices=choices(AttentionMode), default="heads", help="heads go whole, or head dims"
    )
    learn.add_argument(
        "--protect", nargs="*", default=[], metavar="VERTEX", help="vertices whose channels stay"
    )
    learn.add_argument(
        "--checkpoint", type=Path, help="a checkpoint folder: written as training goes, resumed from"
    )
    learn.add_argument(
        "--checkpoint-every", type=integer(0), default=0, help="steps between checkpoints (0: at the end)"
    )
    learn.add_argument("--report", action="store_true", help="also list every channel group and layer")
    learn.add_argument("-o", "--output", type=Path, required=True)
    learn.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    learn.set_defaults(run=cmd_train_prune)


def cmd_train_prune(args: argparse.Namespace) -> None:
    if (args.latency_ratio is None) != (args.latency_table is None):
        raise DagError(
            "--latency-ratio and --latency-table go together: give both, or a FLOPs / params target"
        )
    table = LatencyTable.load(args.latency_table) if args.latency_table is not None else None
    dag, inputs = load_or_convert(args.source, None)
    data = _loader(args, dag)
    teacher = load_or_convert(args.teacher, None, "--teacher")[0] if args.teacher else None
    training = FinetuneConfig(
        lr=args.lr,
        optimizer=args.optimizer,
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
    )
    config = TrainPruneConfig(
        method=args.method,
        training=training,
        pruning=PruneConfig(round_to=args.round_to, attention=args.attention),
        block=args.block,
        gate_lr=args.gate_lr,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():  # the report says which rounding was used, and why a target was missed
        warnings.simplefilter("ignore")
        pruned, report = train_prune(
            dag,
            data,
            args.flops_ratio,
            teacher,
            args.steps,
            latency_table=table,
            params_ratio=args.params_ratio,
            kmapp=args.kmapp,
            latency_ratio=args.latency_ratio,
            example_inputs=inputs,
            protected=args.protect,
            config=config,
            return_report=True,
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    serde.save(pruned, args.output)
    text = report.table() if args.report else "\n".join(report.table().splitlines()[:3])
    print(
        f"{text}\ntrained and pruned {args.source} in {time.perf_counter() - start:.1f} s; saved to {args.output}"
    )


def _loader(args: argparse.Namespace, dag: torch.nn.Module) -> torch.utils.data.DataLoader:
    """Batches of --data (with --labels), checked to run on the model before any work."""
    inputs = load_array(args.data, "--data").float()
    tensors = [inputs]
    if args.labels is not None:
        tensors.append(load_labels(args.labels, len(inputs)))
    if args.batch_size > len(inputs):
        raise DagError(
            f"--batch-size {args.batch_size}: --data has {len(inputs)} samples, fewer than one batch; give "
            f"at most --batch-size {len(inputs)}, or more data"
        )
    check_runs(dag, (inputs,), f"--data {args.data}")
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*tensors),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=None if args.labels is not None else lambda b: torch.stack([item[0] for item in b]),
    )
