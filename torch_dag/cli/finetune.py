"""`torch-dag finetune`: distill a compressed `.dag` from its original (data-parallel under torchrun)."""

from __future__ import annotations

import argparse
import os

import torch

from .. import finetuning, serde
from .models import load_or_convert


def cmd_finetune(args: argparse.Namespace) -> None:
    import numpy as np

    student = serde.load(args.student)
    teacher, _ = load_or_convert(args.teacher, None)
    inputs = torch.from_numpy(np.load(args.data, allow_pickle=False)).float()
    tensors = [inputs]
    if args.labels is not None:
        labels = torch.from_numpy(np.load(args.labels, allow_pickle=False)).long()
        if len(labels) != len(inputs):
            raise SystemExit(f"--labels has {len(labels)} entries for {len(inputs)} inputs")
        tensors.append(labels)
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
