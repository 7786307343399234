"""`torch-dag finetune`: distill a compressed `.dag` from its original (data-parallel under torchrun)."""

from __future__ import annotations

import argparse
import os

import torch

from .. import finetuning, serde
from ..core.errors import DagError
from .models import check_runs, load_dag, load_or_convert
from .values import load_array, load_labels


def cmd_finetune(args: argparse.Namespace) -> None:
    inputs = load_array(args.data, "--data").float()
    tensors = [inputs]
    if args.labels is not None:
        tensors.append(load_labels(args.labels, len(inputs)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size * world > len(inputs):
        raise DagError(
            f"--batch-size {args.batch_size}: --data has {len(inputs)} samples, fewer than one batch"
            + (f" for each of {world} processes" if world > 1 else "")
            + f"; finetuning would run zero steps (the last incomplete batch is dropped): give at most "
            f"--batch-size {max(1, len(inputs) // world)}, or more data"
        )
    student = load_dag(args.student, "the student")
    teacher, _ = load_or_convert(args.teacher, None, "--teacher")
    for model, who in ((teacher, "--teacher"), (student, "the student")):
        check_runs(model, (inputs,), f"--data {args.data} for {who}")
    dataset = torch.utils.data.TensorDataset(*tensors)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=None if args.labels is not None else lambda b: torch.stack([item[0] for item in b]),
    )
    report = finetuning.finetune(
        student,
        teacher,
        loader,
        epochs=args.epochs,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        temperature=args.temperature,
        alpha=args.alpha,
        features=args.features,
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        serde.save(student, args.output)
        losses = ", ".join(f"{loss:.4f}" for loss in report.epoch_losses)
        print(
            f"finetuned {args.student} towards {args.teacher}: {report.steps} steps on {report.world_size} "
            f"process(es) in {report.seconds:.1f} s"
            + (f" (resumed at step {report.resumed_at})" if report.resumed_at else "")
            + f"; mean loss per epoch: {losses}; saved to {args.output}"
        )
