"""Batches and the distillation loss: a batch's inputs and target, the logits of an output, and the
loss of the student's output against the teacher's (plus labels and matched features)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..core.errors import DagError
from .config import FinetuneConfig


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def unpack(batch: Any) -> tuple[tuple, dict, Any]:
    """(positional inputs, keyword inputs, target) of a batch (see `finetune`)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, dict):
        kwargs = dict(batch)
        return (), kwargs, kwargs.pop("labels", None)
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        inputs, target = batch
        return (tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)), {}, target
    raise TypeError(
        f"a batch must be a tensor, an (inputs, target) pair or a dict of inputs, got "
        f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
    )


def logits(out: Any) -> torch.Tensor:
    if isinstance(out, dict):
        if "logits" not in out:
            raise DagError(
                f"the output is a dict without 'logits' (keys {list(out)}); distillation needs one"
            )
        return out["logits"]
    if isinstance(out, (list, tuple)):
        return logits(out[0])
    return out


def distillation_loss(out: Any, expected: Any, target: Any, config: FinetuneConfig) -> torch.Tensor:
    """The distillation loss (plus the labels' and the features' where given) of one output."""
    features, temperature, alpha = config.features, config.temperature, config.alpha
    if features:  # tapped DAGs return (output, {name: value})
        (out, got), (expected, wanted) = out, expected
    student, teacher = logits(out), logits(expected)
    if student.shape != teacher.shape:
        raise DagError(
            f"the student's output {tuple(student.shape)} and the teacher's {tuple(teacher.shape)} "
            "differ in shape; distillation compares them element by element"
        )
    s = student.reshape(-1, student.shape[-1]).float() / temperature
    t = teacher.reshape(-1, teacher.shape[-1]).float() / temperature
    loss = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
    loss = loss * temperature**2
    if target is not None:
        loss = alpha * loss + (1 - alpha) * config.label_loss(student, target)
    for name in features:
        a, b = got[name], wanted[name]
        if a.shape != b.shape:
            raise DagError(
                f"feature '{name}': the student's value has shape {tuple(a.shape)}, the teacher's "
                f"{tuple(b.shape)}; match vertices whose width pruning kept"
            )
        loss = loss + config.feature_weight * F.mse_loss(a.float(), b.float()) / b.float().var().clamp_min(
            1e-8
        )
    return loss
